"""Ingest against a real SeaweedFS (never a mock): every file decoded before anything is uploaded, the empty-mask
choice. Images are real battery-weld files copied into tmp_path (the `small_weld` fixture), damaged there."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ssn_platform.datasets import DatasetReader
from ssn_platform.ingest import ingest
from ssn_platform.manifest import Manifest, canonical_json
from supersimplenet.samples import DataError

JOB = Path(__file__).resolve().parents[2] / "jobs" / "ingest.py"


def _keys(client, bucket: str) -> dict[str, str]:
    """key -> ETag of every object in the bucket."""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        out.update({o["Key"]: o["ETag"] for o in page.get("Contents", [])})
    return out


def _manifest(client, bucket: str, uri: str) -> Manifest:
    key = uri.removeprefix(f"s3://{bucket}/")
    return Manifest.from_json(client.get_object(Bucket=bucket, Key=key)["Body"].read())


@pytest.mark.stack
def test_truncated_jpeg_bmp_and_png_are_all_named_and_the_bucket_gets_no_new_object(
    small_weld, damage, s3_settings, s3_client, bucket
):
    before = ingest(small_weld, product="weld", bucket=bucket, settings=s3_settings, progress=False)
    stored = _keys(s3_client, bucket)
    train = sorted((small_weld / "train/good").iterdir())
    jpeg = damage.truncate(damage.reencode(train[0], "JPEG", ".jpg"))
    bmp = damage.truncate(damage.reencode(train[1], "BMP", ".bmp"))
    png = damage.truncate(sorted((small_weld / "test/good").iterdir())[0])
    with pytest.raises(DataError) as info:
        ingest(small_weld, product="weld", bucket=bucket, settings=s3_settings, progress=False)
    message = str(info.value)
    assert "nothing was uploaded" in message
    for bad in (jpeg, bmp, png):
        assert f"unreadable image: {bad}" in message
    assert "image file is truncated" in message
    assert _keys(s3_client, bucket) == stored  # no object, manifest or latest pointer moved
    assert (
        s3_client.get_object(Bucket=bucket, Key="datasets/weld/latest")["Body"].read() == f"{before.version}\n".encode()
    )


@pytest.mark.stack
def test_an_empty_mask_is_refused_by_default_naming_the_files_and_the_option(
    small_weld, damage, s3_settings, s3_client, bucket
):
    masks = [damage.blank_mask(m) for m in sorted((small_weld / "ground_truth/defective").iterdir())[:2]]
    with pytest.raises(DataError) as info:
        ingest(small_weld, product="weld", bucket=bucket, settings=s3_settings, progress=False)
    message = str(info.value)
    for mask in masks:
        assert f"empty mask for a defective image: {mask}" in message
    assert "--empty-masks" in message and "'label-only'" in message and "'drop'" in message
    assert _keys(s3_client, bucket) == {}


@pytest.mark.stack
def test_label_only_publishes_the_images_without_their_masks_and_records_the_choice(
    small_weld, damage, s3_settings, s3_client, bucket, tmp_path
):
    mask = damage.blank_mask(sorted((small_weld / "ground_truth/defective").iterdir())[0])
    image = f"test/defective/{mask.name}"
    result = ingest(
        small_weld, product="weld", bucket=bucket, settings=s3_settings, progress=False, empty_masks="label-only"
    )
    assert (result.empty_masks, result.empty_mask_images) == ("label-only", (image,))
    manifest = _manifest(s3_client, bucket, result.uri)
    assert manifest.empty_masks == {"policy": "label-only", "images": [image]}
    (record,) = [r for r in manifest.records if r["image"] == image]
    assert (record["label"], record["mask"], record["segmented"]) == (1, None, False)
    assert not any(k.endswith(f"ground_truth/defective/{mask.name}") for k in _keys(s3_client, bucket))
    # read back through the node cache: the training view of that image is defective and not segmented
    _, samples = DatasetReader(result.uri, cache_dir=tmp_path / "cache", settings=s3_settings).materialize()
    (sample,) = [s for s in samples if s.image == image]
    assert (sample.label, sample.mask, sample.segmented) == (1, None, False)


@pytest.mark.stack
def test_drop_leaves_the_images_out_logs_how_many_and_is_another_version(
    small_weld, damage, s3_settings, s3_client, bucket, caplog
):
    masks = [damage.blank_mask(m) for m in sorted((small_weld / "ground_truth/defective").iterdir())[1:]]
    with caplog.at_level(logging.WARNING, logger="ssn_platform.ingest"):
        dropped = ingest(
            small_weld, product="weld", bucket=bucket, settings=s3_settings, progress=False, empty_masks="drop"
        )
    assert "2 defective image(s) with an empty mask dropped" in caplog.text
    manifest = _manifest(s3_client, bucket, dropped.uri)
    assert dropped.samples == 6 and len(manifest.records) == 6
    assert manifest.empty_masks == {"policy": "drop", "images": sorted(f"test/defective/{m.name}" for m in masks)}
    label_only = ingest(
        small_weld, product="weld", bucket=bucket, settings=s3_settings, progress=False, empty_masks="label-only"
    )
    assert label_only.version != dropped.version and label_only.samples == 8


@pytest.mark.stack
def test_the_empty_mask_choice_is_part_of_the_dataset_version(small_weld, s3_settings, s3_client, bucket):
    import hashlib

    default = ingest(small_weld, product="weld", bucket=bucket, settings=s3_settings, progress=False)
    label_only = ingest(
        small_weld, product="weld", bucket=bucket, settings=s3_settings, progress=False, empty_masks="label-only"
    )
    assert label_only.version != default.version  # same files, no empty mask: the choice alone differs
    # the default hashes the records alone, so versions ingested before the choice existed stay valid
    records = sorted(_manifest(s3_client, bucket, default.uri).records, key=lambda r: r["image"])
    assert default.version == hashlib.sha256(canonical_json(records)).hexdigest()[:16]
    doc = json.loads(
        s3_client.get_object(Bucket=bucket, Key=default.uri.removeprefix(f"s3://{bucket}/"))["Body"].read()
    )
    del doc["empty_masks"]  # a manifest written before the field existed reads back as "error"
    assert Manifest.from_json(json.dumps(doc)).empty_masks == {"policy": "error", "images": []}
    with pytest.raises(ValueError, match="empty_masks must be one of"):
        ingest(small_weld, product="weld", bucket=bucket, settings=s3_settings, progress=False, empty_masks="skip")


@pytest.mark.stack
def test_the_ingest_job_names_the_empty_mask_option_and_applies_it(small_weld, damage, s3_stack, s3_client, bucket):
    damage.blank_mask(sorted((small_weld / "ground_truth/defective").iterdir())[0])
    env = {**os.environ, **s3_stack.client_env()}
    cmd = [
        sys.executable,
        str(JOB),
        "--source",
        str(small_weld),
        "--product",
        "weld",
        "--bucket",
        bucket,
        "--no-progress",
    ]
    refused = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--empty-masks" in refused.stderr, refused.stderr
    assert _keys(s3_client, bucket) == {}
    kept = subprocess.run([*cmd, "--empty-masks", "label-only"], env=env, capture_output=True, text=True, timeout=300)
    assert kept.returncode == 0, kept.stderr
    assert "1 defective image(s) with an empty mask kept as defective without a mask" in kept.stderr
    assert kept.stdout.strip().startswith(f"s3://{bucket}/datasets/weld/")
