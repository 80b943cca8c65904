"""The batch inspection job (`jobs/score.py`, Ray Data) on the real local stack.

Real images (ELPV solar cells and weld seams) in a real S3 bucket are scored by a registered, calibrated champion;
the table equals what the endpoint answers for the same bytes over HTTP, bad images land in the errors partition,
and a rerun scores only what is new.
"""

from __future__ import annotations

import base64
import io
import os
import uuid
from pathlib import Path

import numpy as np
import pytest
import requests

pytestmark = [pytest.mark.stack, pytest.mark.heavy]

REPO = Path(__file__).resolve().parents[2]
ELPV_CELLS = {"normal": 4, "defective": 4}
WINDOW = 150  # drift windows: PSI's own noise on two samples of n is about 9 * 2 / n (0.12 here), under its limit


def elpv_test_cells() -> dict[str, bytes]:
    """A few ELPV cells of each label from the registry package, as PNG bytes named like the quickstart's export."""
    from PIL import Image

    from supersimplenet.elpv import load_elpv

    images, probabilities = load_elpv()
    out = {}
    for label, probability in (("normal", 0.0), ("defective", 1.0)):
        for index in np.flatnonzero(probabilities == probability)[-ELPV_CELLS[label] :]:
            buffer = io.BytesIO()
            Image.fromarray(images[index]).save(buffer, format="PNG")
            out[f"{label}/cell_{index:04d}.png"] = buffer.getvalue()
    return out


def table_rows(uri: str):
    """The job's table as {status: {image: row}} (read with pyarrow, as a user would)."""
    import pyarrow.dataset as pads

    from ssn_platform.s3keys import parse_s3_uri
    from ssn_platform.services import storage_filesystem

    bucket, key = parse_s3_uri(uri)
    table = pads.dataset(
        f"{bucket}/{key}", filesystem=storage_filesystem(), format="parquet", partitioning="hive"
    ).to_table()
    out: dict[str, dict[str, dict]] = {"ok": {}, "error": {}}
    for row in table.to_pylist():
        out[row["status"]].setdefault(row["image"], row)
    return out, table.num_rows


@pytest.fixture(scope="module")
def champion(live_stack, weld_val_dataset, random_head_model, serve_champion):
    """A product whose champion is a calibrated Lite0 (seeded random heads), served by the inspection app."""
    with serve_champion(
        live_stack, weld_val_dataset, random_head_model(3), "score", {"torch_threads": 2, "refresh_s": 5.0}
    ) as (product, version, base, _):
        yield {"product": product, "version": version, "base": base, "dataset": weld_val_dataset}


def test_the_batch_job_scores_a_prefix_like_the_endpoint_lists_bad_images_and_scores_only_new_ones_on_rerun(
    champion, weld_root
):
    from ssn_platform.apikeys import client_headers
    from ssn_platform.scoring import ScoreSettings, score_images_job
    from ssn_platform.storage import ensure_bucket, make_client

    s3_client = make_client()  # the live stack's S3 (its environment)
    bucket = "line-" + uuid.uuid4().hex[:8]
    ensure_bucket(s3_client, bucket)
    objects = {f"elpv/{name}": data for name, data in elpv_test_cells().items()}
    weld = sorted((weld_root / "test" / "defective").iterdir())[:3]
    objects.update({f"weld/{path.name}": path.read_bytes() for path in weld})
    good = dict(objects)
    objects["bad/truncated.png"] = good[next(iter(good))][:300]  # a real PNG cut short
    objects["bad/not-an-image.png"] = b"this is a text file with an image name"
    objects["notes.txt"] = b"not an image: not listed"
    for key, data in objects.items():
        s3_client.put_object(Bucket=bucket, Key=f"day-1/{key}", Body=data)

    settings = ScoreSettings(
        product=champion["product"],
        input=f"s3://{bucket}/day-1/",
        masks=True,
        output=f"s3://{bucket}/results",
        batch_size=4,
    )
    summary = score_images_job(settings, progress=False)

    assert (summary.version, summary.listed, summary.scored, summary.errors, summary.skipped) == (
        champion["version"],
        len(good) + 2,
        len(good),
        2,
        0,
    )
    rows, _ = table_rows(summary.table)
    assert set(rows["ok"]) == {f"s3://{bucket}/day-1/{key}" for key in good}
    assert sorted(row["relative_path"] for row in rows["error"].values()) == [
        "bad/not-an-image.png",
        "bad/truncated.png",
    ]
    reasons = {row["relative_path"]: row["error"] for row in rows["error"].values()}
    assert reasons["bad/truncated.png"].startswith("invalid_image: cannot decode the image"), reasons
    assert reasons["bad/not-an-image.png"].startswith("unsupported_image: "), reasons
    assert all(row["score"] is None and row["is_anomalous"] is None for row in rows["error"].values())

    # the endpoint answers the same bytes with the same score, decision and defect area
    for key, data in good.items():
        row = rows["ok"][f"s3://{bucket}/day-1/{key}"]
        answer = requests.post(
            f"{champion['base']}/v1/products/{champion['product']}/inspect",
            data=data,
            headers={"Content-Type": "image/png", **client_headers()},
            timeout=120,
        ).json()
        assert abs(row["score"] - answer["score"]) <= 1e-5, key
        assert (row["is_anomalous"], row["model_version"], row["threshold"]) == (
            answer["is_anomalous"],
            answer["model_version"],
            answer["threshold"],
        )
        assert abs(row["defect_area_percent"] - answer["defect_area_percent"]) <= 1e-3
        assert (row["regions_total"], [(r["x0"], r["y0"], r["x1"], r["y1"]) for r in row["regions"]]) == (
            answer["regions_total"],
            [(r["x0"], r["y0"], r["x1"], r["y1"]) for r in answer["regions"]],
        )
        assert (row["image_width"], row["image_height"]) == (answer["image_width"], answer["image_height"])
        mask_bucket, _, mask_key = row["mask"][len("s3://") :].partition("/")
        assert mask_key == f"results/{champion['product']}/v{champion['version']}/masks/" + str(
            Path(key).with_suffix(".png")
        )
        assert s3_client.get_object(Bucket=mask_bucket, Key=mask_key)["Body"].read()[:8] == b"\x89PNG\r\n\x1a\n"
    scores = [row["score"] for row in rows["ok"].values()]
    assert len(set(scores)) == len(scores)  # real, different images: no constant output
    assert any(row["regions_total"] > 0 for row in rows["ok"].values())  # the threshold leaves regions to compare

    # the map, mask and regions at the image's own size (a weld seam is 120 x 256; the model's map is 72 x 128)
    from PIL import Image

    key = next(k for k in good if k.startswith("weld/"))
    width, height = Image.open(io.BytesIO(good[key])).size
    answer = requests.post(
        f"{champion['base']}/v1/products/{champion['product']}/inspect",
        data=good[key],
        params={"map_resolution": "original", "return_mask": "true", "return_map": "true"},
        headers={"Content-Type": "image/png", **client_headers()},
        timeout=120,
    ).json()
    assert (answer["map_resolution"], answer["map_width"], answer["map_height"]) == ("original", width, height)
    for field in ("mask_png", "anomaly_map_png"):
        assert Image.open(io.BytesIO(base64.b64decode(answer[field]))).size == (width, height)
    assert all(0 <= r["x0"] < r["x1"] <= width and 0 <= r["y0"] < r["y1"] <= height for r in answer["regions"])
    if answer["regions_total"] == len(answer["regions"]):  # every region listed: their areas make up the mask
        assert sum(r["area_pixels"] for r in answer["regions"]) == pytest.approx(
            answer["defect_area_percent"] / 100 * width * height
        )

    # new images arrive; the rerun scores only them, and the failed ones again
    extra = sorted((weld_root / "test" / "good").iterdir())[:2]
    for path in extra:
        s3_client.put_object(Bucket=bucket, Key=f"day-1/weld/{path.name}", Body=path.read_bytes())
    again = score_images_job(settings, progress=False)
    assert (again.listed, again.scored, again.errors, again.skipped) == (len(good) + 4, 2, 2, len(good))
    rows_after, total = table_rows(again.table)
    assert set(rows_after["ok"]) == set(rows["ok"]) | {f"s3://{bucket}/day-1/weld/{p.name}" for p in extra}
    assert total == len(good) + 2 + 2 + 2  # no image scored twice; each run's errors are its own rows

    from mlflow import MlflowClient

    run = MlflowClient().get_run(again.mlflow_run_id)
    assert run.data.metrics["scored"] == 2 and run.data.metrics["skipped"] == len(good)
    assert run.data.tags["ssn.score.version"] == champion["version"]


def test_a_dataset_versions_test_split_is_scored_with_an_explicit_version(champion):
    from ssn_platform.datasets import DatasetReader
    from ssn_platform.scoring import ScoreSettings, score_images_job

    reader = DatasetReader(champion["dataset"])
    test = [r for r in reader.manifest.records if r["split"] == "test"]
    settings = ScoreSettings(
        product=champion["product"],
        version=champion["version"],
        input=champion["dataset"],
        dataset=True,
        split="test",
        output=f"s3://ssn/scores-test-{uuid.uuid4().hex[:6]}",
        limit=5,
    )
    summary = score_images_job(settings, progress=False)
    assert (summary.listed, summary.scored, summary.errors) == (len(test), 5, 0)
    rows, _ = table_rows(summary.table)
    assert {row["relative_path"] for row in rows["ok"].values()} <= {r["image"] for r in test}


def test_scoring_refuses_a_version_without_threshold_and_bad_settings_name_the_field(
    champion, register_version, random_head_model
):
    from ssn_platform.scoring import ScoreSettings, score_images_job
    from ssn_platform.services import PlatformError

    uncalibrated = register_version(champion["product"], champion["dataset"], random_head_model(4), {})
    with pytest.raises(PlatformError, match=rf"version {uncalibrated} has no calibrated threshold.*calibrate"):
        score_images_job(
            ScoreSettings(product=champion["product"], version=uncalibrated, input="s3://ssn/datasets/"), progress=False
        )
    for kwargs, field in (
        ({"input": "ssn/x"}, "input"),
        ({"actors": 0}, "actors"),
        ({"version": "v1"}, "version"),
        ({"split": "test"}, "split"),
        ({"product": "../x"}, "product"),
    ):
        with pytest.raises(PlatformError, match=rf"score settings: {field}"):
            ScoreSettings(**{"product": "p", "input": "s3://bucket/x/", **kwargs})


def test_ray_job_submit_score_smoke_trains_calibrates_scores_and_resumes(live_stack):
    import json
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "job",
            "submit",
            "--working-dir",
            str(REPO),
            "--",
            "python",
            "jobs/score.py",
            "--smoke-test",
            "--no-progress",
        ],
        cwd=REPO,
        env={**os.environ, "SSN_GIT_SHA": "test"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{"product": "smoke"')]
    assert lines, proc.stdout[-4000:]
    summary = json.loads(lines[-1])
    assert (summary["listed"], summary["scored"], summary["errors"], summary["skipped"]) == (4, 4, 0, 0)
    assert summary["table"].startswith("s3://ssn/scores/smoke/v")


def elpv_normal_cells(count: int, part: int) -> list[tuple[str, "np.ndarray"]]:
    """Part `part` (0, 1, ...) of `count` normal ELPV cells (name, uint8 array) drawn at random: the package orders
    its cells by module type, so consecutive cells are not samples of one population."""
    from supersimplenet.elpv import load_elpv

    images, probabilities = load_elpv()
    chosen = np.random.default_rng(20261203).permutation(np.flatnonzero(probabilities == 0.0))
    return [(f"cell_{i:04d}.png", images[i]) for i in chosen[part * count : (part + 1) * count]]


def png(array) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_drift_is_flagged_for_brighter_blurred_cells_not_for_clean_ones_and_shown_by_the_products_listing(champion):
    from PIL import Image, ImageEnhance, ImageFilter

    from ssn_platform.apikeys import client_headers
    from ssn_platform.drift import check_drift
    from ssn_platform.scoring import ScoreSettings, score_images_job
    from ssn_platform.storage import ensure_bucket, make_client

    client = make_client()
    bucket = "drift-" + uuid.uuid4().hex[:8]
    ensure_bucket(client, bucket)
    reference, clean = elpv_normal_cells(WINDOW, 0), elpv_normal_cells(WINDOW, 1)
    for name, array in reference:
        client.put_object(Bucket=bucket, Key=f"day-0/{name}", Body=png(array))
    for name, array in clean:
        client.put_object(Bucket=bucket, Key=f"day-1/{name}", Body=png(array))
        shifted = ImageEnhance.Brightness(Image.fromarray(array)).enhance(1.4).filter(ImageFilter.GaussianBlur(2))
        client.put_object(Bucket=bucket, Key=f"day-2/{name}", Body=png(np.asarray(shifted)))
    summary = score_images_job(ScoreSettings(product=champion["product"], input=f"s3://{bucket}/"), progress=False)
    assert (summary.scored, summary.errors) == (3 * WINDOW, 0)

    def check(day: str):
        return check_drift(
            champion["product"],
            summary.table,
            window_prefix=f"s3://{bucket}/{day}/",
            reference_prefix=f"s3://{bucket}/day-0/",
        )

    stable = check("day-1")
    assert (stable.status, stable.window_size, stable.reference_size) == ("stable", WINDOW, WINDOW), stable
    drifting = check("day-2")
    assert drifting.status == "drifting" and drifting.psi >= 0.25 and drifting.ks_pvalue < 0.01, drifting

    # the endpoint's listing shows the last check (a registry tag; no restart, no reload)
    products = requests.get(f"{champion['base']}/v1/products", headers=client_headers(), timeout=60).json()
    mine = next(p for p in products["products"] if p["product"] == champion["product"])
    assert mine["drift"]["status"] == "drifting" and mine["drift"]["psi"] == pytest.approx(drifting.psi, rel=1e-6)

    from mlflow import MlflowClient

    run = MlflowClient().get_run(drifting.mlflow_run_id)
    assert run.data.tags["ssn.drift.status"] == "drifting" and run.data.metrics["window_size"] == WINDOW


def test_the_replica_exports_per_product_prometheus_metrics_through_ray(champion, weld_root, live_stack):
    import time

    import ray

    from ssn_platform.apikeys import client_headers

    body = sorted((weld_root / "test" / "good").iterdir())[0].read_bytes()
    url = f"{champion['base']}/v1/products/{champion['product']}/inspect"
    for _ in range(3):
        assert (
            requests.post(
                url, data=body, timeout=120, headers={"Content-Type": "image/png", **client_headers()}
            ).status_code
            == 200
        )
    assert (
        requests.post(
            url, data=b"not an image", timeout=60, headers={"Content-Type": "image/png", **client_headers()}
        ).status_code
        == 415
    )
    if not ray.is_initialized():
        from test_serving import ray_address

        ray.init(address=ray_address(live_stack))
    port = ray.nodes()[0]["MetricsExportPort"]
    wanted = [
        "ray_ssn_inspections_total{",
        f'product="{champion["product"]}"',
        "ray_ssn_inspection_score_bucket",
        "ray_ssn_inspection_latency_ms_bucket",
        'code="unsupported_image"',
        "ray_ssn_inspection_stage_ms_bucket",
        'stage="decode"',
        'stage="model"',
    ]
    deadline, text = time.monotonic() + 180, ""
    while time.monotonic() < deadline:  # the agent exports what the replica reported at its last interval
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
        if all(w in text for w in wanted):
            break
        time.sleep(2)
    assert all(w in text for w in wanted), [w for w in wanted if w not in text]
    counts = [
        line
        for line in text.splitlines()
        if line.startswith("ray_ssn_inspections_total{") and f'product="{champion["product"]}"' in line
    ]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in counts) >= 3


def test_each_registered_version_has_a_model_card_as_registry_description_and_artifact(champion):
    from mlflow import MlflowClient

    client = MlflowClient()
    name, version = f"ssn-{champion['product']}", champion["version"]
    model_version = client.get_model_version(name, version)
    description = model_version.description or ""
    assert description.startswith(f"# Model card: {name} version {version}"), description[:200]
    threshold = float(model_version.tags["threshold"])
    assert f"threshold {threshold:.6g}, method `{model_version.tags['threshold_method']}`" in description
    assert "| test |" in description and "weights `sha256:" not in description  # the test model's provenance
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        local = client.download_artifacts(model_version.run_id, f"model_card/v{version}/model_card.md", directory)
        assert open(local, encoding="utf-8").read() == description
