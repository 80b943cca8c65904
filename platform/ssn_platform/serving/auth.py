"""The inspection endpoint's check of API keys: who may inspect which product.

The keys file and its format are `ssn_platform.apikeys` (digests only; `python -m ssn_platform.apikeys` makes a
key). A replica reads the file `ServeSettings.api_keys_file` names, else the environment's `SSN_SERVE_KEYS_FILE`.

A request presents `Authorization: Bearer <key>` (or `X-API-Key: <key>`). No key, or one the file does not hold:
401 with `WWW-Authenticate: Bearer`; a key of other products: 403. `/healthz` and `/readyz` stay open (probes);
`/v1/products` needs a valid key. With no keys file configured every request that needs a key is refused (401
naming the setting): the endpoint is never open by accident. Digests are compared in constant time.

Rotation without a restart: the file is read again when its modification time or size changes (a `stat` at most
once per second per replica), so adding the new key, moving the line to it, then deleting the old key never
interrupts the line. A file that cannot be read or parsed keeps the last good set and is logged.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from pathlib import Path
from typing import Mapping

import yaml

from ssn_platform.apikeys import KEYS_FILE_ENV, ApiKey, digest, parse_keys
from ssn_platform.serving.requests import ApiError

log = logging.getLogger("ssn.serve.auth")


class ApiKeys:
    """The keys file of a replica, read again when it changes (see the module docstring)."""

    def __init__(self, path: str | None, *, recheck_s: float = 1.0) -> None:
        self.path = Path(path) if path else None
        self._recheck_s = recheck_s
        self._lock = threading.Lock()
        self._keys: list[ApiKey] = []
        self._stamp: tuple[float, int] | None = None
        self._checked = 0.0
        if self.path is not None:
            self._reload(force=True)

    @classmethod
    def from_settings(cls, api_keys_file: str | None) -> "ApiKeys":
        return cls(api_keys_file or os.environ.get(KEYS_FILE_ENV) or None)

    def _reload(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < self._recheck_s:
            return
        with self._lock:
            self._checked = now
            try:
                stat = self.path.stat()
                stamp = (stat.st_mtime, stat.st_size)
                if stamp == self._stamp:
                    return
                self._keys = parse_keys(self.path.read_text(), str(self.path))
                self._stamp = stamp
                log.info("API keys: %d key(s) from %s", len(self._keys), self.path)
            except (OSError, ValueError, yaml.YAMLError) as error:
                log.error("API keys: keeping the last good set (%d key(s)): %s", len(self._keys), error)

    def check(self, headers: Mapping[str, str], product: str | None = None) -> ApiKey:
        """The key the request presents, if it may inspect `product` (any product when None); else ApiError."""
        if self.path is None:
            raise ApiError(
                401,
                "unauthorized",
                f"no API keys are configured on this endpoint (ServeSettings."
                f"api_keys_file or {KEYS_FILE_ENV}): every request is refused",
                headers={"WWW-Authenticate": "Bearer"},
            )
        presented = presented_key(headers)
        if not presented:
            raise ApiError(
                401,
                "unauthorized",
                "missing API key: send 'Authorization: Bearer <key>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        self._reload()
        wanted = digest(presented)
        match = None
        for key in self._keys:  # every entry compared, in constant time each
            if hmac.compare_digest(key.sha256, wanted):
                match = key
        if match is None:
            raise ApiError(401, "unauthorized", "unknown API key", headers={"WWW-Authenticate": "Bearer"})
        if product is not None and not match.allows(product):
            log.warning("API key %r refused for product %r", match.name, product)
            raise ApiError(403, "forbidden", f"this API key may not inspect product {product!r}")
        return match


def presented_key(headers: Mapping[str, str]) -> str:
    authorization = headers.get("authorization") or ""
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return (headers.get("x-api-key") or "").strip()
