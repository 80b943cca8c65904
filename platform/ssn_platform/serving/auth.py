"""API keys of the inspection endpoint: who may inspect which product.

Keys live in a YAML file on the replica's node (`ServeSettings.api_keys_file`, else the environment's
`SSN_SERVE_KEYS_FILE`), as SHA-256 digests, never in clear:

    keys:
      - name: line-3-camera          # who holds the key: named in logs, never the key itself
        sha256: 9f86d081884c7d65...  # of the key; `python -m ssn_platform.serving.auth --name line-3` makes a pair
        products: [battery-weld]     # or ["*"]: every product

A request presents `Authorization: Bearer <key>` (or `X-API-Key: <key>`). No key, or one the file does not hold:
401 with `WWW-Authenticate: Bearer`; a key of other products: 403. `/healthz` and `/readyz` stay open (probes);
`/v1/products` needs a valid key. With no keys file configured every request that needs a key is refused (401
naming the setting): the endpoint is never open by accident.

Rotation without a restart: the file is read again when its modification time or size changes (a `stat` at most
once per second per replica), so adding the new key, moving the line to it, then deleting the old key never
interrupts the line. A file that cannot be read or parsed keeps the last good set and is logged.

Keys are random 32-byte tokens (`secrets.token_urlsafe`), so one SHA-256 is the right hash (a slow password hash
protects guessable secrets, which these are not); digests are compared in constant time.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import yaml

from ssn_platform.serving.requests import ApiError

log = logging.getLogger("ssn.serve.auth")
KEYS_FILE_ENV = "SSN_SERVE_KEYS_FILE"
KEY_FILE_ENV = "SSN_SERVE_API_KEY_FILE"  # a client's own key (the local stack writes one, 0600)
ALL_PRODUCTS = "*"
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ApiKey:
    name: str
    sha256: str
    products: frozenset[str]

    def allows(self, product: str) -> bool:
        return ALL_PRODUCTS in self.products or product in self.products


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def parse_keys(text: str, source: str) -> list[ApiKey]:
    """The keys of a keys file's text; a ValueError names the file and the entry at fault."""
    data = yaml.safe_load(text) or {}
    entries = data.get("keys") if isinstance(data, Mapping) else None
    if not isinstance(entries, list):
        raise ValueError(f"{source}: expected a mapping with a list 'keys'")
    keys = []
    for index, entry in enumerate(entries):
        where = f"{source}: keys[{index}]"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where} is not a mapping")
        name, sha, products = entry.get("name"), str(entry.get("sha256", "")).lower(), entry.get("products")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: 'name' is required")
        if not _DIGEST.match(sha):
            raise ValueError(f"{where} ({name}): 'sha256' must be 64 hex digits (the key's digest, never the key)")
        if not isinstance(products, list) or not products or not all(isinstance(p, str) and p for p in products):
            raise ValueError(f"{where} ({name}): 'products' must be a non-empty list of product names or '*'")
        keys.append(ApiKey(name, sha, frozenset(products)))
    return keys


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
            raise ApiError(401, "unauthorized", f"no API keys are configured on this endpoint (ServeSettings."
                                                f"api_keys_file or {KEYS_FILE_ENV}): every request is refused",
                           headers={"WWW-Authenticate": "Bearer"})
        presented = presented_key(headers)
        if not presented:
            raise ApiError(401, "unauthorized", "missing API key: send 'Authorization: Bearer <key>'",
                           headers={"WWW-Authenticate": "Bearer"})
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


def client_headers() -> dict[str, str]:
    """The `Authorization` header of a local client: the key in the file `SSN_SERVE_API_KEY_FILE` names."""
    path = os.environ.get(KEY_FILE_ENV)
    if not path:
        raise RuntimeError(f"{KEY_FILE_ENV} is not set: eval \"$(infra/local/stack env)\" names the local stack's key")
    return {"Authorization": "Bearer " + Path(path).read_text().strip()}


def new_key(name: str, products: list[str]) -> tuple[str, dict]:
    """A fresh key and the keys-file entry that admits it."""
    key = secrets.token_urlsafe(32)
    return key, {"name": name, "sha256": digest(key), "products": products}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Make an API key: prints the key once, appends its digest.")
    parser.add_argument("--name", required=True, help="who holds the key (logged, never the key)")
    parser.add_argument("--products", nargs="+", default=[ALL_PRODUCTS], help="products it may inspect (default *)")
    parser.add_argument("--keys-file", required=True, help="the keys file to append to (created mode 0600)")
    parser.add_argument("--key-out", help="write the key to this file (mode 0600) instead of printing it")
    args = parser.parse_args(argv)
    key, entry = new_key(args.name, args.products)
    path = Path(args.keys_file)
    existing = parse_keys(path.read_text(), str(path)) if path.is_file() else []
    entries = [{"name": k.name, "sha256": k.sha256, "products": sorted(k.products)} for k in existing] + [entry]
    tmp = path.with_name(f".{path.name}.tmp")
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as handle:
        yaml.safe_dump({"keys": entries}, handle, sort_keys=False)
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one
    if args.key_out:
        with os.fdopen(os.open(args.key_out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as handle:
            handle.write(key)
    else:
        print(key)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
