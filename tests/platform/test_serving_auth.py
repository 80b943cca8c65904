"""API keys of the inspection endpoint (ssn_platform.apikeys, ssn_platform.serving.auth), without a server;
test_serving.py has the HTTP."""

import os
import stat

import pytest
import yaml

from ssn_platform.apikeys import digest, main, new_key, parse_keys


def api_keys(*args, **kwargs):
    # ssn_platform.serving imports Ray (the package exposes build_app), which must not load at collection time
    from ssn_platform.serving.auth import ApiKeys

    return ApiKeys(*args, **kwargs)


def write(path, entries):
    path.write_text(yaml.safe_dump({"keys": entries}))


def status_of(keys, headers, product=None):
    from ssn_platform.serving.requests import ApiError

    try:
        keys.check(headers, product)
    except ApiError as error:
        return error.status
    return 200


def test_a_key_opens_its_products_only_and_is_held_as_a_digest(tmp_path):
    line_key, line = new_key("line-3", ["battery-weld"])
    admin_key, admin = new_key("admin", ["*"])
    assert line["sha256"] == digest(line_key) and line_key not in str(line)
    write(tmp_path / "keys.yaml", [line, admin])
    keys = api_keys(str(tmp_path / "keys.yaml"))
    bearer = {"authorization": f"Bearer {line_key}"}
    assert status_of(keys, bearer, "battery-weld") == 200
    assert status_of(keys, bearer, "elpv") == 403
    assert status_of(keys, {"x-api-key": admin_key}, "elpv") == 200
    assert status_of(keys, {}, "elpv") == 401
    assert status_of(keys, {"authorization": "Bearer " + line_key[:-1]}, "battery-weld") == 401
    assert status_of(keys, {"authorization": f"Basic {line_key}"}, "battery-weld") == 401
    assert status_of(keys, bearer) == 200  # any product: GET /v1/products


def test_no_keys_file_refuses_every_request(monkeypatch):
    monkeypatch.delenv("SSN_SERVE_KEYS_FILE", raising=False)
    from ssn_platform.serving.auth import ApiKeys
    from ssn_platform.serving.requests import ApiError

    keys = ApiKeys.from_settings(None)
    with pytest.raises(ApiError, match="no API keys are configured") as refused:
        keys.check({"authorization": "Bearer anything"}, "battery-weld")
    assert refused.value.status == 401 and refused.value.headers == {"WWW-Authenticate": "Bearer"}


def test_keys_rotate_when_the_file_changes_and_a_broken_file_keeps_the_last_good_set(tmp_path):
    old_key, old = new_key("old", ["*"])
    new, new_entry = new_key("new", ["*"])
    path = tmp_path / "keys.yaml"
    write(path, [old])
    keys = api_keys(str(path), recheck_s=0.0)
    assert status_of(keys, {"x-api-key": old_key}, "p") == 200 and status_of(keys, {"x-api-key": new}, "p") == 401
    write(path, [old, new_entry])
    assert status_of(keys, {"x-api-key": new}, "p") == 200
    write(path, [new_entry])
    assert status_of(keys, {"x-api-key": old_key}, "p") == 401
    path.write_text("keys: [not a mapping]\n# and longer than before, so the change is seen")
    assert status_of(keys, {"x-api-key": new}, "p") == 200  # the last good set


@pytest.mark.parametrize(
    "entry, culprit",
    [
        ({"sha256": "0" * 64, "products": ["*"]}, "'name' is required"),
        ({"name": "a", "sha256": "my-plain-key", "products": ["*"]}, "never the key"),
        ({"name": "a", "sha256": "0" * 64, "products": []}, "'products'"),
    ],
)
def test_a_bad_keys_file_names_the_entry(entry, culprit):
    with pytest.raises(ValueError, match=rf"keys.yaml: keys\[0\].*{culprit}"):
        parse_keys(yaml.safe_dump({"keys": [entry]}), "keys.yaml")


def test_the_command_appends_a_digest_and_writes_the_key_privately(tmp_path):
    keys_file, key_file = tmp_path / "keys.yaml", tmp_path / "key"
    assert main(["--name", "a", "--keys-file", str(keys_file), "--key-out", str(key_file)]) == 0
    assert (
        main(["--name", "b", "--products", "elpv", "--keys-file", str(keys_file), "--key-out", str(tmp_path / "key-b")])
        == 0
    )
    entries = parse_keys(keys_file.read_text(), "keys.yaml")
    assert [(k.name, sorted(k.products)) for k in entries] == [("a", ["*"]), ("b", ["elpv"])]
    assert entries[0].sha256 == digest(key_file.read_text())
    assert key_file.read_text() not in keys_file.read_text()
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600 and stat.S_IMODE(os.stat(keys_file).st_mode) == 0o600
