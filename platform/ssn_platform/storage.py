"""S3 access for the platform: settings from the environment, a retrying boto3 client, safe keys, clear errors.

Works unchanged against AWS S3 and any S3-compatible store (the local stack runs SeaweedFS):

* ``SSN_S3_ENDPOINT`` (or boto3's own ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``) selects the endpoint; unset
  means AWS S3 itself.
* Credentials: none is read here from the process environment or passed to a client; boto3 and pyarrow find them
  through the AWS SDKs' chains in each process (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_SHARED_CREDENTIALS_FILE,
  roles), so nothing we pickle holds a key; Ray workers use their node's (infra/local/README.md, docs/cluster.md),
  never a runtime_env. Only ``S3Settings.from_env(env)`` of a mapping of its own carries keys, and is not picklable.
* ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` (default ``us-east-1``).
* ``SSN_S3_ADDRESSING_STYLE``: ``path`` (default when an endpoint is set), ``virtual`` or ``auto`` (default for AWS).

Errors are translated into :class:`StorageError` subclasses whose messages name the endpoint and the object
(``s3://bucket/key``) but never a secret.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import boto3
import botocore.exceptions as bexc
from botocore.config import Config

from ssn_platform.s3keys import BUCKET_RE, format_s3_uri, validate_key

__all__ = [
    "S3Settings",
    "StorageError",
    "CredentialsError",
    "ObjectNotFoundError",
    "BucketNotFoundError",
    "EndpointError",
    "IntegrityError",
    "make_client",
    "translate_error",
    "is_transient",
    "call_with_retries",
    "head_object",
    "object_exists",
    "put_bytes",
    "get_bytes",
    "download_to",
    "ensure_bucket",
    "sha256_file",
    "SHA256_METADATA_KEY",
]

#: user metadata key (``x-amz-meta-sha256``) holding the hex sha256 of an object's content
SHA256_METADATA_KEY = "sha256"
_DEFAULT_REGION = "us-east-1"
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "InvalidClientTokenId",
    "AuthorizationHeaderMalformed",
}
# Answers worth another try that botocore's retry handler does not retry itself (it already retries 5xx answers,
# throttling and request timeouts ``max_attempts`` times: retrying those again would multiply the wait before a
# persistent server error reaches the user, e.g. 8 x 10 attempts of a full SeaweedFS's InternalError).
_RETRY_BEYOND_BOTOCORE_CODES = {
    "BadDigest",  # the body was cut on the way in
    "IncompleteBody",
}

T = TypeVar("T")


# --------------------------------------------------------------------------------------------- errors
class StorageError(RuntimeError):
    """An object-storage operation failed; the message says which endpoint/object and why (never a secret)."""


class CredentialsError(StorageError):
    """The endpoint rejected the credentials (or none were found)."""


class ObjectNotFoundError(StorageError, FileNotFoundError):
    """The object does not exist."""


class BucketNotFoundError(StorageError):
    """The bucket does not exist."""


class EndpointError(StorageError):
    """The endpoint could not be reached (after retries)."""


class IntegrityError(StorageError):
    """Content does not match its recorded sha256 / size."""


# --------------------------------------------------------------------------------------------- settings
def _env(env: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        value = env.get(name)
        if value:
            return value
    return None


@dataclasses.dataclass(frozen=True)
class S3Settings:
    """Where and how to reach S3. Explicit credentials only (see above): not in ``repr``, never pickled."""

    endpoint_url: str | None = None
    access_key_id: str | None = dataclasses.field(default=None, repr=False)
    secret_access_key: str | None = dataclasses.field(default=None, repr=False)
    session_token: str | None = dataclasses.field(default=None, repr=False)
    region: str = _DEFAULT_REGION
    addressing_style: str = "path"
    max_attempts: int = 10
    retry_mode: str = "standard"
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    max_pool_connections: int = 32

    def __post_init__(self) -> None:
        if self.addressing_style not in {"path", "virtual", "auto"}:
            raise ValueError(f"addressing_style must be path, virtual or auto, not {self.addressing_style!r}")
        if self.retry_mode not in {"standard", "adaptive", "legacy"}:
            raise ValueError(f"retry_mode must be standard, adaptive or legacy, not {self.retry_mode!r}")
        if self.endpoint_url is not None and not re.match(r"^https?://[^/\s]+/?$", self.endpoint_url):
            raise ValueError(f"S3 endpoint must look like http(s)://host[:port], got {self.endpoint_url!r}")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> S3Settings:
        """Read settings from ``env`` (default ``os.environ``, whose credentials the SDKs read); overrides win."""
        env = os.environ if env is None else env
        endpoint = _env(env, "SSN_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
        style = _env(env, "SSN_S3_ADDRESSING_STYLE") or ("path" if endpoint else "auto")
        values: dict[str, Any] = dict(
            endpoint_url=endpoint.rstrip("/") if endpoint else None,
            region=_env(env, "AWS_REGION", "AWS_DEFAULT_REGION") or _DEFAULT_REGION,
            addressing_style=style,
        )
        if env is not os.environ:  # a mapping of its own: no SDK chain sees its keys
            values.update(
                access_key_id=_env(env, "AWS_ACCESS_KEY_ID"),
                secret_access_key=_env(env, "AWS_SECRET_ACCESS_KEY"),
                session_token=_env(env, "AWS_SESSION_TOKEN"),
            )
        if _env(env, "SSN_S3_MAX_ATTEMPTS"):
            values["max_attempts"] = int(env["SSN_S3_MAX_ATTEMPTS"])
        if _env(env, "SSN_S3_RETRY_MODE"):
            values["retry_mode"] = env["SSN_S3_RETRY_MODE"]
        values.update(overrides)
        return cls(**values)

    @property
    def endpoint_label(self) -> str:
        """Human-readable endpoint for messages."""
        return self.endpoint_url or f"AWS S3 ({self.region})"

    def client_env(self) -> dict[str, str]:
        """Non-secret environment variables that reproduce these settings in another process (e.g. runtime_env)."""
        out = {"AWS_REGION": self.region, "SSN_S3_ADDRESSING_STYLE": self.addressing_style}
        if self.endpoint_url:
            out["SSN_S3_ENDPOINT"] = self.endpoint_url
        return out

    def __getstate__(self) -> dict[str, Any]:
        if self.access_key_id or self.secret_access_key or self.session_token:
            raise TypeError(
                "S3Settings with explicit credentials cannot be pickled (nor copied): the pickle would "
                "carry the secret; build them with S3Settings.from_env() where they are used"
            )
        return dict(self.__dict__)


def make_client(settings: S3Settings | None = None) -> Any:
    """A boto3 S3 client with retries (exponential backoff with jitter) and timeouts.

    The client object carries the settings as ``client.ssn_settings`` so helpers can word their errors.
    """
    settings = settings or S3Settings.from_env()
    config = Config(
        region_name=settings.region,
        signature_version="s3v4",
        # total_max_attempts counts the first try too (botocore's "max_attempts" would add one)
        retries={"mode": settings.retry_mode, "total_max_attempts": settings.max_attempts},
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        max_pool_connections=settings.max_pool_connections,
        s3={"addressing_style": settings.addressing_style},
        # Checksums only where the API requires them: S3-compatible stores vary in their support for the
        # newer flexible-checksum trailers, and objects carry our own sha256 anyway.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    session = boto3.session.Session(
        aws_access_key_id=settings.access_key_id,
        aws_secret_access_key=settings.secret_access_key,
        aws_session_token=settings.session_token,
        region_name=settings.region,
    )
    client = session.client("s3", endpoint_url=settings.endpoint_url, config=config)
    client.ssn_settings = settings  # type: ignore[attr-defined]
    return client


def _settings_of(client: Any) -> S3Settings | None:
    return getattr(client, "ssn_settings", None)


def _endpoint_of(client: Any) -> str:
    settings = _settings_of(client)
    if settings is not None:
        return settings.endpoint_label
    try:
        return str(client.meta.endpoint_url)
    except Exception:  # noqa: BLE001 - pragma: no cover - defensive
        return "the S3 endpoint"


# --------------------------------------------------------------------------------------------- errors and retries
def _client_error_code(exc: bexc.ClientError) -> tuple[str, int | None]:
    err = exc.response.get("Error", {}) if hasattr(exc, "response") else {}
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") if hasattr(exc, "response") else None
    return str(err.get("Code", "")), status


def is_transient(exc: BaseException, *, server_errors: bool = False) -> bool:
    """True for errors worth retrying after botocore's own retries: connection trouble (a server restarting takes
    longer than botocore's budget), cut streams and bodies, failed verification. Not 5xx answers or throttling:
    botocore has already retried those ``max_attempts`` times, unless `server_errors` (idempotent reads: a
    restarted SeaweedFS answers InternalError until its filer and volumes are back, longer than botocore waits)."""
    if isinstance(exc, StorageError):
        return isinstance(exc, (EndpointError, IntegrityError)) and getattr(exc, "transient", False)
    if isinstance(
        exc,
        (
            bexc.ConnectionError,  # EndpointConnectionError, ConnectionClosedError, Read/ConnectTimeoutError
            bexc.HTTPClientError,
            bexc.ResponseStreamingError,
            bexc.IncompleteReadError,
            ConnectionError,
            TimeoutError,
        ),
    ):
        return True
    if isinstance(exc, bexc.ClientError):
        code, status = _client_error_code(exc)
        return code in _RETRY_BEYOND_BOTOCORE_CODES or (server_errors and status is not None and status >= 500)
    name = type(exc).__name__
    return name in {"ProtocolError", "IncompleteRead", "ReadTimeoutError", "NewConnectionError"}


def translate_error(
    exc: BaseException, *, client: Any = None, bucket: str | None = None, key: str | None = None, action: str = ""
) -> StorageError:
    """Turn a boto/botocore exception into a StorageError with a message that names endpoint and object."""
    if isinstance(exc, StorageError):
        return exc
    endpoint = _endpoint_of(client) if client is not None else "the S3 endpoint"
    target = format_s3_uri(bucket, key or "") if bucket else "S3"
    doing = f" while trying to {action}" if action else ""
    if isinstance(exc, bexc.NoCredentialsError):
        return CredentialsError(
            f"no S3 credentials found{doing} {target}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or "
            f'AWS_SHARED_CREDENTIALS_FILE (for the local stack: eval "$(infra/local/stack env)")'
        )
    if isinstance(exc, bexc.ClientError):
        code, status = _client_error_code(exc)
        if code in _CREDENTIAL_CODES:
            return CredentialsError(
                f"S3 credentials were rejected by {endpoint} ({code}){doing} {target}; "
                "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
            )
        if code in {"AccessDenied", "403", "Forbidden", "AllAccessDisabled"}:
            return CredentialsError(
                f"access denied by {endpoint}{doing} {target}: the S3 credentials were rejected or lack "
                "permission for it; check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket policy"
            )
        if code == "NoSuchBucket" or (code == "404" and bucket and not key):
            return BucketNotFoundError(f"bucket s3://{bucket} does not exist at {endpoint}{doing}")
        if code in {"NoSuchKey", "404", "NotFound"}:
            return ObjectNotFoundError(f"{target} does not exist (at {endpoint}){doing}")
        msg = exc.response.get("Error", {}).get("Message", "") if hasattr(exc, "response") else ""
        text = f"S3 error {code or status}{doing} {target} at {endpoint}: {msg}".rstrip(": ")
        if status is not None and status >= 500:
            tries = 1 + int(exc.response.get("ResponseMetadata", {}).get("RetryAttempts", 0))
            text += f" (the same answer {tries} times; the server's log says why)" if tries > 1 else ""
        return StorageError(text)
    if isinstance(exc, (bexc.ConnectionError, bexc.HTTPClientError, ConnectionError, TimeoutError)):
        return EndpointError(f"cannot reach S3 endpoint {endpoint}{doing} {target}: {type(exc).__name__}")
    if isinstance(exc, (bexc.ResponseStreamingError, bexc.IncompleteReadError)):
        return EndpointError(f"the connection to {endpoint} broke{doing} {target}: {type(exc).__name__}")
    return StorageError(f"S3 operation failed{doing} {target} at {endpoint}: {type(exc).__name__}: {exc}")


def call_with_retries(
    fn: Callable[[], T],
    *,
    client: Any = None,
    bucket: str | None = None,
    key: str | None = None,
    action: str = "",
    attempts: int = 8,
    base_delay: float = 0.5,
    max_delay: float = 10.0,
    server_errors: bool = False,
) -> T:
    """Run ``fn`` retrying transient failures with exponential backoff and full jitter.

    botocore already retries each request (5xx answers and throttling included); this outer loop covers what it
    cannot: a server down for longer than botocore's budget (restarting), a response body cut half-way and content
    that fails verification; with `server_errors` (reads) also 5xx answers. Anything else is raised at once,
    translated into :class:`StorageError`.
    """
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            if attempt == attempts - 1 or not is_transient(exc, server_errors=server_errors):
                raise translate_error(exc, client=client, bucket=bucket, key=key, action=action) from exc
            time.sleep(random.uniform(0.5, 1.0) * min(max_delay, base_delay * (2**attempt)))
    raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------------------------- object helpers
def sha256_file(path: str | os.PathLike[str], *, chunk_size: int = 1 << 20) -> tuple[str, int]:
    """(hex sha256, size in bytes) of a local file."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def head_object(client: Any, bucket: str, key: str) -> dict[str, Any] | None:
    """HEAD an object: its response dict, or None when it does not exist. Other errors raise StorageError."""
    validate_key(key)

    def _head() -> dict[str, Any] | None:
        try:
            return client.head_object(Bucket=bucket, Key=key)
        except bexc.ClientError as exc:
            code, status = _client_error_code(exc)
            if code in {"404", "NoSuchKey", "NotFound"} or status == 404:
                return None
            raise

    return call_with_retries(_head, client=client, bucket=bucket, key=key, action="read")


def object_exists(client: Any, bucket: str, key: str) -> bool:
    return head_object(client, bucket, key) is not None


def put_bytes(
    client: Any,
    bucket: str,
    key: str,
    data: bytes,
    *,
    content_type: str = "application/octet-stream",
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Upload ``data``; records its sha256 in the object's metadata. Returns the sha256."""
    validate_key(key)
    digest = hashlib.sha256(data).hexdigest()
    meta = {SHA256_METADATA_KEY: digest, **(metadata or {})}
    call_with_retries(
        lambda: client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type, Metadata=meta),
        client=client,
        bucket=bucket,
        key=key,
        action="write",
    )
    return digest


def get_bytes(client: Any, bucket: str, key: str, *, expected_sha256: str | None = None) -> bytes:
    """Download a whole (small) object; verifies ``expected_sha256`` when given (retrying a bad transfer)."""
    validate_key(key)

    def _get() -> bytes:
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        try:
            data = body.read()
        finally:
            body.close()
        if expected_sha256 is not None:
            got = hashlib.sha256(data).hexdigest()
            if got != expected_sha256:
                err = IntegrityError(
                    f"{format_s3_uri(bucket, key)}: sha256 {got} does not match the expected {expected_sha256}"
                )
                err.transient = True  # type: ignore[attr-defined]
                raise err
        return data

    return call_with_retries(_get, client=client, bucket=bucket, key=key, action="read", server_errors=True)


def download_to(
    client: Any,
    bucket: str,
    key: str,
    dest: str | os.PathLike[str],
    *,
    expected_sha256: str | None = None,
    expected_size: int | None = None,
    chunk_size: int = 1 << 20,
    attempts: int = 8,
    fsync: bool = False,
) -> tuple[str, int]:
    """Stream an object into ``dest`` (overwritten), hashing on the fly. Returns (sha256, size).

    A transfer that breaks off or yields content different from ``expected_sha256``/``expected_size`` is retried
    from scratch with backoff; if the stored object itself is wrong, IntegrityError names it. ``fsync`` forces the
    data to disk before returning (the dataset cache does without: it verifies every entry on use instead).
    """
    validate_key(key)

    def _download() -> tuple[str, int]:
        h = hashlib.sha256()
        size = 0
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        try:
            with open(dest, "wb") as f:
                for chunk in body.iter_chunks(chunk_size):
                    h.update(chunk)
                    f.write(chunk)
                    size += len(chunk)
                if fsync:
                    f.flush()
                    os.fsync(f.fileno())
        finally:
            body.close()
        digest = h.hexdigest()
        if (expected_size is not None and size != expected_size) or (
            expected_sha256 is not None and digest != expected_sha256
        ):
            err = IntegrityError(
                f"{format_s3_uri(bucket, key)}: got {size} bytes with sha256 {digest}, expected "
                f"{expected_size} bytes with sha256 {expected_sha256}"
            )
            err.transient = True  # type: ignore[attr-defined]
            raise err
        return digest, size

    try:
        return call_with_retries(
            _download, client=client, bucket=bucket, key=key, action="read", attempts=attempts, server_errors=True
        )
    except IntegrityError as exc:
        raise IntegrityError(f"{exc} (after {attempts} attempts: the stored object is corrupt)") from exc


def ensure_bucket(client: Any, bucket: str) -> bool:
    """Create ``bucket`` if it does not exist. Returns True when it was created."""
    if not BUCKET_RE.match(bucket):
        raise ValueError(f"invalid bucket name {bucket!r}")

    def _exists() -> bool:
        try:
            client.head_bucket(Bucket=bucket)
            return True
        except bexc.ClientError as exc:
            code, status = _client_error_code(exc)
            if code in {"404", "NoSuchBucket", "NotFound"} or status == 404:
                return False
            raise

    if call_with_retries(_exists, client=client, bucket=bucket, action="check"):
        return False

    def _create() -> None:
        settings = _settings_of(client)
        kwargs: dict[str, Any] = {"Bucket": bucket}
        if settings is not None and settings.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": settings.region}
        try:
            client.create_bucket(**kwargs)
        except bexc.ClientError as exc:
            code, _ = _client_error_code(exc)
            if code not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                raise

    call_with_retries(_create, client=client, bucket=bucket, action="create")
    return True
