"""API keys of the inspection endpoint: the keys file, making keys, and a local client's header (no Ray, no web
framework: the local stack and clients use it; `ssn_platform.serving.auth` checks requests against it).

The keys file (YAML) holds SHA-256 digests, never keys:

    keys:
      - name: line-3-camera          # who holds the key: named in logs, never the key itself
        sha256: 9f86d081884c7d65...  # of the key
        products: [battery-weld]     # or ["*"]: every product

    python -m ssn_platform.apikeys --name line-3 --products battery-weld --keys-file keys.yaml   # prints the key once

Keys are random 32-byte tokens (`secrets.token_urlsafe`), so one SHA-256 is the right hash (a slow password hash
protects guessable secrets, which these are not).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import yaml

KEYS_FILE_ENV = "SSN_SERVE_KEYS_FILE"  # the endpoint's keys file (digests)
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


def client_headers() -> dict[str, str]:
    """The `Authorization` header of a local client: the key in the file `SSN_SERVE_API_KEY_FILE` names."""
    path = os.environ.get(KEY_FILE_ENV)
    if not path:
        raise RuntimeError(f'{KEY_FILE_ENV} is not set: eval "$(infra/local/stack env)" names the local stack\'s key')
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
