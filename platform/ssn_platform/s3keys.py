"""Object keys and s3:// URIs: validation that keeps every key a safe relative path, joining and parsing.

Pure string functions (no boto3), shared by the S3 client helpers (`ssn_platform.storage`), the dataset manifest
and reader, ingest, tuned settings and training.
"""

from __future__ import annotations

import re

__all__ = ["validate_key", "join_key", "parse_s3_uri", "format_s3_uri"]

_MAX_KEY_BYTES = 1024
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")  # an S3 bucket name


def validate_key(key: str, *, what: str = "key") -> str:
    """Return ``key`` if it is a safe relative object key, else raise ValueError naming it.

    Rejected: empty keys, absolute paths, backslashes, empty segments (``a//b``, trailing ``/``), ``.`` and
    ``..`` segments, control characters, a leading ``~`` segment and keys longer than 1024 UTF-8 bytes. Safe keys
    map onto safe relative file paths, which the dataset reader relies on.
    """
    if not isinstance(key, str):
        raise ValueError(f"{what} must be a string, got {type(key).__name__}: {key!r}")
    problems = []
    if not key:
        problems.append("it is empty")
    else:
        if key.startswith("/"):
            problems.append("it is absolute")
        if "\\" in key:
            problems.append("it contains a backslash")
        if any(ord(c) < 32 or ord(c) == 127 for c in key):
            problems.append("it contains control characters")
        segments = key.split("/")
        if any(s == "" for s in segments) and not key.startswith("/"):
            problems.append("it has an empty path segment")
        if any(s in {".", ".."} for s in segments):
            problems.append("it has a '.' or '..' segment")
        if segments[0] == "~" or segments[0].startswith("~"):
            problems.append("it starts with '~'")
        if re.match(r"^[A-Za-z]:", key):
            problems.append("it starts with a drive letter")
        if len(key.encode("utf-8")) > _MAX_KEY_BYTES:
            problems.append(f"it is longer than {_MAX_KEY_BYTES} bytes")
    if problems:
        raise ValueError(f"unsafe {what} {key!r}: " + ", ".join(problems))
    return key


def join_key(*parts: str) -> str:
    """Join key parts with ``/`` and validate the result.

    A single trailing ``/`` on a non-final part is tolerated (``join_key("datasets/x/", "a.png")``); anything
    else that would escape or create empty segments raises ValueError naming the offending key.
    """
    if not parts:
        raise ValueError("join_key needs at least one part")
    cleaned = []
    for i, part in enumerate(parts):
        if not isinstance(part, str):
            raise ValueError(f"key part must be a string, got {type(part).__name__}: {part!r}")
        if i < len(parts) - 1 and part.endswith("/") and not part.endswith("//"):
            part = part[:-1]
        cleaned.append(part)
    return validate_key("/".join(cleaned))


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/key`` into ``(bucket, key)``.

    The key may be empty (``s3://bucket`` or ``s3://bucket/``); one trailing ``/`` (a prefix) is dropped. The key is
    validated with :func:`validate_key`; the bucket must be a valid S3 bucket name.
    """
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not BUCKET_RE.match(bucket) or ".." in bucket:
        raise ValueError(f"invalid bucket name {bucket!r} in {uri!r}")
    if key.endswith("/") and not key.endswith("//"):
        key = key[:-1]
    if key:
        try:
            validate_key(key)
        except ValueError as exc:
            raise ValueError(f"unsafe key in {uri!r}: {exc}") from None
    return bucket, key


def format_s3_uri(bucket: str, key: str = "") -> str:
    return f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
