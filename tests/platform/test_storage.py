"""Storage layer and datasets against a real SeaweedFS (never a mock): ingest, read back, failures."""

from __future__ import annotations

import dataclasses
import filecmp
import json
import multiprocessing
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from ssn_platform import storage
from ssn_platform.cache import _cache_lock, _file_lock, cache_limit_bytes, feature_store, prune_cache
from ssn_platform.datasets import DatasetReader, select_split
from supersimplenet.samples import Sample
from ssn_platform.ingest import ingest
from ssn_platform.manifest import SCHEMA, DatasetError, Manifest, compute_version
from ssn_platform.s3keys import join_key, parse_s3_uri, validate_key
from ssn_platform.storage import CredentialsError, ObjectNotFoundError, S3Settings, StorageError

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------------------ pure functions
@pytest.mark.parametrize(
    "key",
    [
        "",
        "/etc/passwd",
        "../x",
        "a/../../b",
        "a/./b",
        ".",
        "..",
        "a//b",
        "a/",
        "a\\b",
        "..\\x",
        "a/\x00b",
        "a/b\nc",
        "~/x",
        "C:/x",
        "x" * 1025,
    ],
)
def test_unsafe_keys_are_rejected_with_the_key_named(key: str) -> None:
    with pytest.raises(ValueError) as info:
        validate_key(key)
    assert repr(key) in str(info.value)


@pytest.mark.parametrize(
    "key", ["a", "a/b.png", "train/good/000.png", "a b/c-d_e.f", "ünï/cödé.png", "..a/b..", "x" * 1024]
)
def test_safe_keys_pass(key: str) -> None:
    assert validate_key(key) == key


def test_join_key_and_parse_uri() -> None:
    assert join_key("datasets/", "p", "v1", "objects/a.png") == "datasets/p/v1/objects/a.png"
    with pytest.raises(ValueError, match=r"\.\./x"):
        join_key("datasets", "../x")
    with pytest.raises(ValueError):
        join_key("datasets//", "x")
    assert parse_s3_uri("s3://ssn/datasets/p/") == ("ssn", "datasets/p")
    assert parse_s3_uri("s3://ssn") == ("ssn", "")
    for bad in ["http://ssn/x", "s3://UPPER/x", "s3://ab/x", "s3://ssn/a/../b", "s3://ssn//x", "s3://ssn/a\\b"]:
        with pytest.raises(ValueError):
            parse_s3_uri(bad)


def test_settings_from_env_and_secret_not_in_repr() -> None:
    s = S3Settings.from_env(
        {"SSN_S3_ENDPOINT": "http://127.0.0.1:9/", "AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "SEKRIT"}
    )
    assert s.endpoint_url == "http://127.0.0.1:9"
    assert s.addressing_style == "path" and s.region == "us-east-1"
    assert "SEKRIT" not in repr(s) and "AK" not in repr(s)
    aws = S3Settings.from_env({"AWS_REGION": "eu-west-1"})
    assert aws.endpoint_url is None and aws.addressing_style == "auto" and aws.region == "eu-west-1"
    assert S3Settings.from_env({"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:1"}).endpoint_url == "http://127.0.0.1:1"
    client = storage.make_client(s)
    assert client.meta.config.retries["total_max_attempts"] == 10
    assert client.meta.config.s3["addressing_style"] == "path"


def test_manifest_with_escaping_key_is_rejected() -> None:
    rec = {
        "image": "../../etc/x.png",
        "image_key": "objects/../../etc/x.png",
        "image_sha256": "0" * 64,
        "image_bytes": 1,
        "mask": None,
        "mask_key": None,
        "mask_sha256": None,
        "mask_bytes": None,
        "label": 0,
        "split": "train",
        "segmented": True,
        "defect_type": "",
    }
    doc = {
        "schema": SCHEMA,
        "schema_version": 1,
        "product": "p",
        "version": compute_version([rec]),
        "layout": {},
        "records": [rec],
    }
    with pytest.raises(DatasetError, match=r"\.\./\.\./etc/x\.png"):
        Manifest.from_json(json.dumps(doc))


# ------------------------------------------------------------------------------------------------ helpers
def _same_samples(a, b) -> None:
    key = lambda s: s.image  # noqa: E731
    assert sorted(a, key=key) == sorted(b, key=key)


def _assert_identical_tree(view: Path, source: Path, samples) -> None:
    for s in samples:
        for rel in (s.image, s.mask):
            if rel is None:
                continue
            assert filecmp.cmp(view / rel, source / rel, shallow=False), rel


def _bucket_keys(client, bucket: str) -> list[str]:
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


# ------------------------------------------------------------------------------------------------ round trips
@pytest.mark.stack
@pytest.mark.parametrize("dataset", ["weld", "mpdd"])
def test_round_trip_byte_identical(dataset, weld_root, mpdd_root, s3_settings, s3_client, bucket, tmp_path):
    from supersimplenet.layouts import read_layout
    from supersimplenet.loading import DefectDataset

    source, layout = {"weld": (weld_root, "mvtec"), "mpdd": (mpdd_root, "folder")}[dataset]
    result = ingest(source, product=dataset, layout=layout, bucket=bucket, settings=s3_settings, progress=False)
    assert result.uploaded == result.objects > 0 and result.skipped == 0 and result.manifest_written
    assert result.uri == f"s3://{bucket}/datasets/{dataset}/{result.version}/manifest.json"
    keys = _bucket_keys(s3_client, bucket)
    assert f"datasets/{dataset}/{result.version}/manifest.json" in keys
    assert f"datasets/{dataset}/latest" in keys

    # re-ingest: nothing uploaded, same version, manifest untouched
    again = ingest(source, product=dataset, layout=layout, bucket=bucket, settings=s3_settings, progress=False)
    assert (again.version, again.uploaded, again.bytes_uploaded, again.manifest_written) == (
        result.version,
        0,
        0,
        False,
    )
    assert again.skipped == result.objects

    reader = DatasetReader(f"s3://{bucket}/datasets/{dataset}", cache_dir=tmp_path / "cache", settings=s3_settings)
    root, samples = reader.materialize()
    assert reader.version == result.version
    expected = read_layout(source, layout)
    _same_samples(samples, expected)  # labels, splits, masks, defect types intact
    _assert_identical_tree(root, source, samples)
    assert reader.manifest.layout["name"] == layout
    assert sum(s.mask is not None for s in samples) == sum(s.mask is not None for s in expected) > 0
    assert {s.label for s in samples} == {0, 1}
    # the view is hard links into the content-addressed cache
    first = next(s for s in samples if s.mask is not None and s.label == 1)
    rec = next(r for r in reader.manifest.records if r["image"] == first.image)
    assert os.path.samestat((root / first.image).stat(), reader.object_path(rec["image_sha256"]).stat())

    # a second materialize is served by the cache
    warm = DatasetReader(result.uri, cache_dir=tmp_path / "cache", settings=s3_settings)
    root2, _ = warm.materialize()
    assert root2 == root and warm.stats.downloaded == 0 and warm.stats.cache_hits > 0

    # a pinned version is served from the node's cache even with the S3 endpoint unreachable
    offline = dataclasses.replace(s3_settings, endpoint_url="http://127.0.0.1:9", max_attempts=1)
    cached = DatasetReader(result.uri, cache_dir=tmp_path / "cache", settings=offline)
    assert cached.materialize()[0] == root and cached.stats.downloaded == 0

    # what the model package's training consumes
    ds = DefectDataset(root=root, samples=samples, image_size=(32, 32), mean=MEAN, std=STD)
    item = ds[[s.image for s in samples].index(first.image)]
    assert item["image"].shape == (3, 32, 32) and item["mask"].max() == 1.0


@pytest.fixture
def weld_ingested(weld_root, s3_settings, bucket):
    return ingest(weld_root, product="weld", bucket=bucket, settings=s3_settings, progress=False)


@pytest.mark.stack
def test_corrupted_cache_entry_is_detected_and_repaired(weld_ingested, weld_root, s3_settings, tmp_path):
    cache = tmp_path / "cache"
    root, samples = DatasetReader(weld_ingested.uri, cache_dir=cache, settings=s3_settings).materialize()
    victim = next(s for s in samples if s.mask is not None)
    rec_path = root / victim.image
    # corrupt the cache entry behind the view (same inode: the view sees it too), and delete another one
    os.chmod(rec_path, 0o644)
    with open(rec_path, "r+b") as f:
        f.seek(10)
        f.write(b"\xde\xad\xbe\xef")
    assert not filecmp.cmp(rec_path, weld_root / victim.image, shallow=False)
    other = next(s for s in samples if s.image != victim.image)
    reader = DatasetReader(weld_ingested.uri, cache_dir=cache, settings=s3_settings)
    other_sha = next(r["image_sha256"] for r in reader.manifest.records if r["image"] == other.image)
    os.chmod(reader.object_path(other_sha), 0o644)
    reader.object_path(other_sha).unlink()

    root2, samples2 = reader.materialize()
    assert reader.stats.repaired == 1 and reader.stats.downloaded == 2
    _assert_identical_tree(root2, weld_root, samples2)


@pytest.mark.stack
def test_s3_server_restarted_in_the_middle_of_a_read(mpdd_root, s3_stack, s3_settings, bucket, tmp_path):
    result = ingest(mpdd_root, product="mpdd", bucket=bucket, settings=s3_settings, progress=False)
    events: dict[str, float] = {}
    download_times: list[float] = []
    errors: list[BaseException] = []
    restarter: list[threading.Thread] = []

    def restart_later() -> None:
        try:
            time.sleep(1.5)  # clients see connection refused meanwhile
            events["restarting"] = time.monotonic()
            s3_stack.run("up", "s3", timeout=120)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def on_download(key: str, size: int) -> None:
        download_times.append(time.monotonic())
        if len(download_times) == 20:
            s3_stack.kill_s3()
            events["killed"] = time.monotonic()
            restarter.append(threading.Thread(target=restart_later, daemon=True))
            restarter[0].start()

    reader = DatasetReader(
        result.uri, cache_dir=tmp_path / "cache", settings=s3_settings, workers=4, on_download=on_download
    )
    root, samples = reader.materialize()
    restarter[0].join(timeout=120)
    assert not errors, errors
    after_kill = [t for t in download_times if t > events["killed"]]
    assert len(after_kill) > 40, "too few downloads after the kill to prove anything"
    # apart from transfers already in flight at the kill (at most one per worker), nothing could be downloaded
    # while the server was down: the reads waited for the restart
    assert sorted(after_kill)[4] > events["restarting"]
    assert reader.stats.downloaded == len({sha for sha, _ in reader.manifest.objects().values()})
    _assert_identical_tree(root, mpdd_root, samples)


@pytest.mark.stack
def test_the_stack_holds_many_buckets(s3_client, drop_bucket):
    """Every SeaweedFS bucket takes a volume of its own; the stack sets the volume count instead of SeaweedFS's
    default derived from the free disk space (a dozen on a nearly full disk: the 13th bucket could not be written)."""
    from ssn_platform.storage import ensure_bucket, get_bytes, put_bytes

    names = [f"many-{i:02d}-{os.getpid()}" for i in range(40)]
    try:
        for name in names:
            ensure_bucket(s3_client, name)
            put_bytes(s3_client, name, "x", name.encode())
        assert [get_bytes(s3_client, name, "x") for name in names] == [name.encode() for name in names]
    finally:
        for name in names:
            drop_bucket(name)


@pytest.mark.stack
def test_a_persistent_server_error_is_raised_after_botocore_retries_only(make_stack, tmp_path):
    """A server that keeps answering 500 (a SeaweedFS with no volume left for a new bucket: a real failure, caused
    here with a one-volume server) fails the write after botocore's attempts, not after our retries of its
    retries, and the error names the object and the endpoint."""
    from ssn_platform.storage import ensure_bucket, make_client, put_bytes

    stack = make_stack(tmp_path / "state", {"SSN_WEED_MAX_VOLUMES": "1"})
    stack.start("s3", timeout=120)
    try:
        settings = dataclasses.replace(S3Settings.from_env(stack.client_env()), max_attempts=3)
        client = make_client(settings)
        sent: list[str] = []
        client.meta.events.register("before-send.s3.PutObject", lambda **kw: sent.append(kw["request"].url))
        ensure_bucket(client, "first")
        put_bytes(client, "first", "a.bin", b"takes the only volume")
        ensure_bucket(client, "second")
        sent.clear()
        with pytest.raises(StorageError) as info:
            put_bytes(client, "second", "b.bin", b"no volume left")
        assert len(sent) == 3, sent
        msg = str(info.value)
        assert "s3://second/b.bin" in msg and settings.endpoint_url in msg and "InternalError" in msg
        assert "3 times" in msg
        assert not isinstance(info.value, CredentialsError | ObjectNotFoundError)
    finally:
        stack.run("down", check=False, timeout=120)


@pytest.mark.stack
def test_wrong_credentials_give_a_clear_error(weld_root, weld_ingested, s3_settings, bucket, tmp_path):
    bad_secret = "definitely-not-the-secret-0123456789"
    wrong = dataclasses.replace(s3_settings, secret_access_key=bad_secret, max_attempts=2)
    with pytest.raises(CredentialsError) as info:
        ingest(weld_root, product="weld2", bucket=bucket, settings=wrong, progress=False)
    msg = str(info.value)
    assert "rejected" in msg and s3_settings.endpoint_url in msg
    assert bad_secret not in msg and s3_settings.secret_access_key not in msg

    unknown = dataclasses.replace(s3_settings, access_key_id="NOSUCHKEY0000", max_attempts=2)
    with pytest.raises(CredentialsError, match="rejected"):
        DatasetReader(weld_ingested.uri, cache_dir=tmp_path / "c", settings=unknown).materialize()


@pytest.mark.stack
def test_missing_key_is_named(weld_ingested, s3_settings, s3_client, bucket, tmp_path):
    reader = DatasetReader(weld_ingested.uri, cache_dir=tmp_path / "cache", settings=s3_settings)
    rel_key = sorted(reader.manifest.objects())[3]
    key = f"{reader.prefix}/{rel_key}"
    s3_client.delete_object(Bucket=bucket, Key=key)
    with pytest.raises(ObjectNotFoundError) as info:
        reader.materialize()
    assert f"s3://{bucket}/{key}" in str(info.value)

    with pytest.raises(StorageError, match=f"s3://{bucket}/nope/x.png"):
        storage.get_bytes(s3_client, bucket, "nope/x.png")
    with pytest.raises(DatasetError, match=f"s3://{bucket}/datasets/nothing"):
        _ = DatasetReader(f"s3://{bucket}/datasets/nothing", cache_dir=tmp_path / "c", settings=s3_settings).manifest


@pytest.mark.stack
def test_folder_with_one_bad_image_uploads_nothing(weld_root, s3_settings, s3_client, bucket, tmp_path):
    from supersimplenet.samples import DataError

    copy = tmp_path / "weld"
    shutil.copytree(weld_root, copy)
    bad = sorted((copy / "test" / "defective").iterdir())[2]
    bad.write_bytes(bad.read_bytes()[:40])  # truncated PNG
    with pytest.raises(DataError) as info:
        ingest(copy, product="weld", bucket=bucket, settings=s3_settings, progress=False)
    assert str(bad) in str(info.value)
    assert "nothing was uploaded" in str(info.value)
    assert _bucket_keys(s3_client, bucket) == []


@pytest.mark.stack
def test_escaping_keys_in_a_stored_manifest_are_rejected(s3_settings, s3_client, bucket, tmp_path):
    rec = {
        "image": "a/../../../outside.png",
        "image_key": "objects/a/../../../outside.png",
        "image_sha256": "0" * 64,
        "image_bytes": 1,
        "mask": None,
        "mask_key": None,
        "mask_sha256": None,
        "mask_bytes": None,
        "label": 0,
        "split": "train",
        "segmented": True,
        "defect_type": "",
    }
    version = compute_version([rec])
    doc = {"schema": SCHEMA, "schema_version": 1, "product": "evil", "version": version, "layout": {}, "records": [rec]}
    s3_client.put_object(Bucket=bucket, Key=f"datasets/evil/{version}/manifest.json", Body=json.dumps(doc).encode())
    with pytest.raises(DatasetError, match="outside.png"):
        DatasetReader(
            f"s3://{bucket}/datasets/evil/{version}", cache_dir=tmp_path / "c", settings=s3_settings
        ).materialize()
    assert not (tmp_path / "outside.png").exists()


def _concurrent_reader(uri: str, cache_dir: str, env: dict, barrier) -> dict:
    from ssn_platform.datasets import DatasetReader as Reader
    from ssn_platform.storage import S3Settings as Settings

    reader = Reader(uri, cache_dir=cache_dir, settings=Settings.from_env(env), workers=4)
    reader.manifest  # noqa: B018 - fetch before the race so the race is about objects
    barrier.wait(timeout=120)
    root, samples = reader.materialize()
    return {
        "downloaded": reader.stats.downloaded,
        "hits": reader.stats.cache_hits,
        "root": str(root),
        "samples": len(samples),
    }


@pytest.mark.stack
def test_concurrent_readers_download_each_object_once(weld_ingested, weld_root, s3_stack, tmp_path):
    ctx = multiprocessing.get_context("spawn")
    n = 4
    env = s3_stack.client_env()
    with ctx.Manager() as manager:
        barrier = manager.Barrier(n)
        with ctx.Pool(n) as pool:
            results = pool.starmap(_concurrent_reader, [(weld_ingested.uri, str(tmp_path / "cache"), env, barrier)] * n)
    reader = DatasetReader(weld_ingested.uri, cache_dir=tmp_path / "cache", settings=S3Settings.from_env(env))
    unique = len({sha for sha, _ in reader.manifest.objects().values()})
    assert sum(r["downloaded"] for r in results) == unique, results
    assert all(r["downloaded"] + r["hits"] == unique for r in results), results
    assert len({r["root"] for r in results}) == 1
    root, samples = reader.materialize()
    assert reader.stats.downloaded == 0
    _assert_identical_tree(root, weld_root, samples)
    # no temp files left behind
    assert not list((tmp_path / "cache").rglob("*.part")) and not list((tmp_path / "cache").rglob("*.tmp"))


@pytest.mark.stack
def test_ingest_job_smoke_test(s3_stack, tmp_path):
    import subprocess
    import sys

    env = {**os.environ, **s3_stack.client_env()}
    cmd = [
        sys.executable,
        str(Path(__file__).resolve().parents[2] / "jobs" / "ingest.py"),
        "--smoke-test",
        "--bucket",
        "ssn",
        "--no-progress",
    ]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    uri = first.stdout.strip()
    assert uri.startswith("s3://ssn/datasets/smoke/") and uri.endswith("/manifest.json")
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and second.stdout.strip() == uri
    assert "uploaded 0 " in second.stderr
    assert env["AWS_SECRET_ACCESS_KEY"] not in first.stderr + second.stderr


# ------------------------------------------------------------------------------------------------ cache bound
@pytest.mark.parametrize("raw,expected", [("", None), ("2", 2 << 30), ("0.5", 1 << 29), (" 1 ", 1 << 30)])
def test_cache_limit_from_the_environment(raw, expected):
    assert cache_limit_bytes({"SSN_CACHE_MAX_GB": raw}) == expected


@pytest.mark.parametrize("raw", ["abc", "0", "-1", "nan", "inf", "1GB"])
def test_a_bad_cache_limit_names_the_variable(raw):
    with pytest.raises(ValueError) as info:
        cache_limit_bytes({"SSN_CACHE_MAX_GB": raw})
    assert "SSN_CACHE_MAX_GB" in str(info.value) and repr(raw) in str(info.value)


_HOLDER = """
import sys
from ssn_platform.datasets import DatasetReader
root, _ = DatasetReader(sys.argv[1], cache_dir=sys.argv[2]).materialize()
print(root, flush=True)
sys.stdin.readline()  # keeps using the view until told
"""


def _start_holder(uri: str, cache: Path, env: dict[str, str]):
    """A live process that materialized ``uri`` into ``cache`` and keeps using it: (process, view root)."""
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, uri, str(cache)],
        env={**os.environ, **env},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    root = proc.stdout.readline().strip()
    assert root, proc.stderr.read()
    return proc, Path(root)


def _release(proc) -> None:
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert proc.wait(timeout=60) == 0


def _unique_bytes(reader: DatasetReader) -> int:
    return sum(dict(reader.manifest.objects().values()).values())


def _cache_bytes(cache: Path) -> int:
    return sum(p.stat().st_size for p in (cache / "objects").glob("*/*") if not p.name.startswith("."))


@pytest.mark.stack
def test_cache_pruning_deletes_idle_views_and_keeps_views_in_use(
    weld_root, mpdd_root, s3_stack, s3_settings, bucket, tmp_path
):
    weld = ingest(weld_root, product="weld", bucket=bucket, settings=s3_settings, progress=False)
    mpdd = ingest(mpdd_root, product="mpdd", bucket=bucket, settings=s3_settings, progress=False)
    env = s3_stack.client_env()
    cache = tmp_path / "cache"
    weld_bytes = _unique_bytes(DatasetReader(weld.uri, cache_dir=cache, settings=s3_settings))
    mpdd_bytes = _unique_bytes(DatasetReader(mpdd.uri, cache_dir=cache, settings=s3_settings))

    # weld: materialized by a process that has ended (idle); mpdd: by a process still using it, which spells the
    # cache folder through a symlink (the same views, the same locks)
    _release(_start_holder(weld.uri, cache, env)[0])
    (tmp_path / "cache-link").symlink_to(cache)
    holder, mpdd_root_view = _start_holder(mpdd.uri, tmp_path / "cache-link", env)
    assert mpdd_root_view.is_relative_to(cache)
    try:
        assert _cache_bytes(cache) == weld_bytes + mpdd_bytes
        # another process mid-materialize holds the cache lock: pruning waits for no one and does nothing
        with _file_lock(_cache_lock(cache), shared=True):
            busy = prune_cache(cache, 0)
        assert busy.busy and _cache_bytes(cache) == weld_bytes + mpdd_bytes

        stats = prune_cache(cache, 0)
        assert (stats.views_deleted, stats.views_in_use) == (1, 1), stats
        assert stats.bytes_before == weld_bytes + mpdd_bytes and stats.bytes_after == mpdd_bytes
        assert _cache_bytes(cache) == mpdd_bytes
        assert not (cache / "views" / bucket / "datasets" / "weld").exists()
        # the view in use is whole and still the exact data
        _assert_identical_tree(
            mpdd_root_view,
            mpdd_root,
            Manifest.from_json(
                (cache / "manifests" / bucket / Path(*parse_s3_uri(mpdd.uri)[1].split("/"))).read_bytes()
            ).samples(),
        )
    finally:
        _release(holder)
    # a view without a use marker (built before markers existed) is pruned too
    for marker in (cache / "locks" / "views").glob("*.use"):
        marker.unlink()
    stats = prune_cache(cache, 0)  # its user has ended
    assert (stats.views_deleted, stats.bytes_after) == (1, 0) and _cache_bytes(cache) == 0
    assert not any((cache / "views").iterdir())

    # materialized again after pruning: downloaded again, identical
    again = DatasetReader(weld.uri, cache_dir=cache, settings=s3_settings)
    root, samples = again.materialize()
    assert again.stats.downloaded == len(dict(again.manifest.objects().values()))
    _assert_identical_tree(root, weld_root, samples)


@pytest.mark.stack
def test_materialize_keeps_the_cache_to_its_bound(
    weld_root, mpdd_root, s3_stack, s3_settings, bucket, tmp_path, monkeypatch
):
    weld = ingest(weld_root, product="weld", bucket=bucket, settings=s3_settings, progress=False)
    mpdd = ingest(mpdd_root, product="mpdd", bucket=bucket, settings=s3_settings, progress=False)
    cache = tmp_path / "cache"
    weld_bytes = _unique_bytes(DatasetReader(weld.uri, cache_dir=cache, settings=s3_settings))
    mpdd_bytes = _unique_bytes(DatasetReader(mpdd.uri, cache_dir=cache, settings=s3_settings))
    bound_gib = (max(weld_bytes, mpdd_bytes) + 1024) / (1 << 30)  # room for one of the two
    monkeypatch.setenv("SSN_CACHE_MAX_GB", repr(bound_gib))

    _release(_start_holder(mpdd.uri, cache, s3_stack.client_env())[0])  # mpdd: used once, long ago
    reader = DatasetReader(weld.uri, cache_dir=cache, settings=s3_settings)
    assert reader.max_cache_bytes == int(bound_gib * (1 << 30))
    root, samples = reader.materialize()
    assert reader.last_prune.views_deleted == 1 and _cache_bytes(cache) == weld_bytes
    _assert_identical_tree(root, weld_root, samples)

    # this process still uses the weld view: materializing mpdd cannot evict it, so the cache stays above its
    # bound (a warning) and both views are whole
    second = DatasetReader(mpdd.uri, cache_dir=cache, settings=s3_settings)
    root2, samples2 = second.materialize()
    assert second.last_prune.views_in_use == 2 and second.last_prune.views_deleted == 0  # weld's and its own
    assert _cache_bytes(cache) == weld_bytes + mpdd_bytes
    _assert_identical_tree(root, weld_root, samples)
    _assert_identical_tree(root2, mpdd_root, samples2)


def test_select_split_takes_records_or_samples_and_names_the_splits_present_when_one_is_missing():
    records = [{"image": "a.png", "split": "train"}, {"image": "b.png", "split": "val"}]
    samples = [Sample("a.png", None, 0, "train", False), Sample("c.png", None, 1, "test", False)]
    assert select_split(records, "val", "d", "hint") == [records[1]]
    assert select_split(samples, "test", "d", "hint") == [samples[1]]
    with pytest.raises(
        ValueError, match=r"s3://b/x \(v1\) has no 'test' split \(splits present: \['train', 'val'\]\); do X"
    ):
        select_split(records, "test", "s3://b/x (v1)", "do X", ValueError)


def test_the_feature_store_lives_in_the_node_cache_bounded_by_its_variable_and_zero_turns_it_off(tmp_path):
    store = feature_store({"SSN_CACHE_DIR": str(tmp_path)})
    assert store.root == tmp_path / "features" and store.max_bytes == 4 * 2**30
    assert feature_store({"SSN_CACHE_DIR": str(tmp_path), "SSN_FEATURE_STORE_MAX_GB": "0.5"}).max_bytes == 2**29
    assert feature_store({"SSN_FEATURE_STORE_MAX_GB": "0"}) is None
    for raw in ("lots", "-1", "inf"):
        with pytest.raises(ValueError, match="SSN_FEATURE_STORE_MAX_GB"):
            feature_store({"SSN_FEATURE_STORE_MAX_GB": raw})
