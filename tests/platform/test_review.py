"""The review-and-relabel loop in a real browser: headless Chromium (the OS package) driven by Playwright.

The endpoint keeps inspected weld seams for review; an operator signs in with the product's API key, paints a
defect on one image and marks it defective, marks another normal, and publishes: the product's next dataset
version holds both, with their labels and the painted mask.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest
import requests

pytestmark = [pytest.mark.stack, pytest.mark.heavy]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def reviewed(live_stack, weld_val_dataset, random_head_model, serve_champion):
    settings = {"torch_threads": 2, "refresh_s": 5.0, "review_bucket": "ssn", "review_band": 1.0, "review_sample": 1.0}
    with serve_champion(live_stack, weld_val_dataset, random_head_model(5), "review", settings) as (
        product,
        _,
        base,
        samples,
    ):
        yield {"product": product, "base": base, "dataset": weld_val_dataset, "samples": samples}


def test_an_operator_labels_two_kept_images_in_chromium_and_the_next_dataset_version_holds_them(reviewed, weld_root):
    from playwright.sync_api import sync_playwright

    from ssn_platform.apikeys import client_headers
    from ssn_platform.datasets import DatasetReader
    from ssn_platform.review import ReviewStore

    product, base = reviewed["product"], reviewed["base"]
    images = [
        *sorted((weld_root / "test" / "defective").iterdir())[:2],
        *sorted((weld_root / "test" / "good").iterdir())[:1],
    ]
    for path in images:
        answer = requests.post(
            f"{base}/v1/products/{product}/inspect",
            data=path.read_bytes(),
            timeout=120,
            headers={"Content-Type": "image/png", **client_headers()},
        )
        assert answer.status_code == 200, answer.text
    store = ReviewStore("ssn", product)
    deadline = time.monotonic() + 120
    while len(store.items()) < len(images) and time.monotonic() < deadline:  # kept after the answer, in the pool
        time.sleep(0.5)
    kept = store.items()
    assert len(kept) == len(images)

    # nobody reviews without the product's key
    assert requests.get(f"{base}/review/{product}", timeout=30).status_code == 401
    assert (
        requests.post(
            f"{base}/review/{product}/items/{kept[0]['id']}/label", json={"label": "normal"}, timeout=30
        ).status_code
        == 401
    )

    key = client_headers()["Authorization"].split(" ", 1)[1]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{base}/review/{product}")
            page.fill("input[name=key]", "not-the-key")
            page.click("button[type=submit]")
            assert "may not review" in page.content()
            page.fill("input[name=key]", key)
            page.click("button[type=submit]")
            page.wait_for_selector(".item")
            assert page.locator(".item").count() == len(images)

            first, second = page.locator(".item").nth(0), page.locator(".item").nth(1)
            first.locator("img.image").evaluate("img => img.complete || new Promise(r => img.onload = r)")
            box = first.locator("canvas").bounding_box()
            page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.4)
            page.mouse.down()
            page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.5, steps=8)
            page.mouse.up()
            first.locator("button[data-label=defective]").click()
            second.locator("button[data-label=normal]").click()
            page.wait_for_function("document.querySelectorAll('.item.labelled').length === 2")
            assert first.locator(".label").inner_text() == "defective (painted)"
            page.click("#publish")
            page.wait_for_function("document.getElementById('result').textContent.startsWith('Published')")
            result = page.locator("#result").inner_text()
        finally:
            browser.close()
    assert "+1 normal" in result and "+1 defective" in result and "split val" in result, result

    ids = {item["id"]: item["label"]["label"] for item in store.items() if item["label"]}
    assert sorted(ids.values()) == ["defective", "normal"]
    reader = DatasetReader(f"s3://ssn/datasets/{product}/latest")
    records = {r["image"]: r for r in reader.manifest.records}
    assert len(records) == reviewed["samples"] + 2
    for item_id, label in ids.items():
        record = records[f"review/{item_id}.png"]
        assert (record["label"], record["split"]) == (int(label == "defective"), "val")
        assert (record["mask"] is not None) == (label == "defective")  # the painted defect travelled with it
    root, samples = reader.materialize()
    painted = next(s for s in samples if s.mask and s.image.startswith("review/"))
    import numpy as np
    from PIL import Image

    mask = np.asarray(Image.open(root / painted.mask).convert("L"))
    with Image.open(root / painted.image) as image:
        assert mask.shape == (image.height, image.width) and 0 < (mask > 0).mean() < 0.5


def test_ray_job_submit_runs_the_deploy_job_and_the_drift_job(reviewed):
    """`jobs/deploy.py` through the Ray job API replaces the app with serve.yaml's settings plus overrides; the
    review page answers from the new one. The drift job's smoke test runs through it too (exit 0: stable)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from ssn_platform.apikeys import client_headers

    repo = Path(__file__).resolve().parents[2]

    def submit(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "ray.scripts.scripts",
                "job",
                "submit",
                "--working-dir",
                str(repo),
                "--",
                "python",
                *command,
            ],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=900,
            env={**os.environ, "SSN_GIT_SHA": "test"},
        )

    port = os.environ["SSN_SERVE_PORT"]
    proc = submit("jobs/deploy.py", "--port", port, "--set", "review_bucket=ssn", "--set", "torch_threads=2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    answer = json.loads([line for line in proc.stdout.splitlines() if line.startswith('{"app"')][-1])
    assert answer["app"] == "ssn" and answer["url"].startswith("http://127.0.0.1:")
    page = requests.get(f"{reviewed['base']}/review/{reviewed['product']}", headers=client_headers(), timeout=60)
    assert page.status_code == 200 and "Publish labels" in page.text

    proc = submit("jobs/drift.py", "--smoke-test")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith('{"product": "smoke"')][-1])
    assert result["status"] == "stable" and result["psi"] == 0.0
