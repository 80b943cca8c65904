"""Pinned lineage of a training job on the live stack (ssn_platform.lineage, ssn_platform.training): the dataset is
resolved once on the driver, and a run_name submitted again continues its run only with the settings it started
with."""

from __future__ import annotations

import uuid

import pytest

pytestmark = [pytest.mark.stack, pytest.mark.heavy]


def _job(dataset: str, *, model: dict | None = None, train: dict | None = None, **top):
    from ssn_platform.jobconfig import build_job_config

    return build_job_config(
        {
            "product": "battery-weld",
            "dataset": dataset,
            "model": {"backbone": "efficientnet_lite0", "image_size": [128, 72], **(model or {})},
            "train": {"epochs": 1, "batch_size": 8, **(train or {})},
            "scaling": {"num_workers": 1},
            **top,
        }
    )


def test_latest_is_pinned_to_the_manifest_of_one_version_before_any_worker_sees_it(weld_dataset):
    from ssn_platform.lineage import pin_dataset

    product_prefix = weld_dataset.rsplit("/", 2)[0]  # s3://ssn/datasets/battery-weld: its `latest`
    job = _job(product_prefix)
    pinned = pin_dataset(job)
    assert pinned.dataset == weld_dataset and pinned.dataset.endswith("/manifest.json")
    assert pinned.model == job.model and pinned.train == job.train
    assert pin_dataset(pinned) is pinned  # a pinned job stays as it is


def test_a_resubmitted_run_name_with_other_settings_is_refused_naming_each_key(weld_dataset):
    from ssn_platform.lineage import open_mlflow_run
    from ssn_platform.training import PlatformError, run_training

    run_name = f"lineage-{uuid.uuid4().hex[:6]}"
    job = _job(weld_dataset, run_name=run_name)
    run_id, status = open_mlflow_run(job, run_name)
    assert status == "RUNNING"
    # how it runs may change (workers, retries): the same run
    assert open_mlflow_run(_job(weld_dataset, run_name=run_name, max_failures=5), run_name)[0] == run_id
    # what it trains may not: refused before anything starts, naming every differing key with both values
    changed = _job(weld_dataset, run_name=run_name, train={"seed": 7}, model={"perlin_threshold": 0.5})
    with pytest.raises(PlatformError) as error:
        run_training(changed)
    message = str(error.value)
    assert run_name in message and "train.seed: '42' -> '7'" in message
    assert "model.perlin_threshold: '0.2' -> '0.5'" in message and "max_failures" not in message
