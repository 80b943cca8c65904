"""Registration on the live stack's MLflow (ssn_platform.registry): one version per training run, however often its
finalisation runs."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.stack, pytest.mark.heavy]


def test_a_retried_registration_of_a_run_finds_its_version_instead_of_adding_one(weld_dataset, random_head_model):
    from mlflow import MlflowClient

    from supersimplenet.config import to_dict
    from ssn_platform.jobconfig import build_job_config
    from ssn_platform.registry import log_and_register

    model = random_head_model(3)
    job = build_job_config(
        {
            "product": "weld-idempotent",
            "dataset": weld_dataset,
            "model": to_dict(model.config),
            "train": {"epochs": 1, "batch_size": 8},
            "scaling": {"num_workers": 1},
        }
    )
    client = MlflowClient()
    experiment_id = client.create_experiment(f"{job.experiment_name}-registry-test")
    run_id = client.create_run(experiment_id).info.run_id

    first = log_and_register(job, model, run_id=run_id, metrics={"image_auroc": 0.5}, provenance="test")
    # the finalisation runs again (a worker restarted after the registration): same version, tags rewritten
    again = log_and_register(job, model, run_id=run_id, metrics={"image_auroc": 0.75}, provenance="test")
    assert again == first
    versions = client.search_model_versions(f"name = '{job.registered_model_name}'")
    assert [v.version for v in versions] == [first]
    assert client.get_model_version(job.registered_model_name, first).tags["test_image_auroc"] == "0.750000"
    assert client.get_run(run_id).data.tags["ssn.model_version"] == first

    # another run is another version
    other_run = client.create_run(experiment_id).info.run_id
    other = log_and_register(job, model, run_id=other_run, metrics={}, provenance="test")
    assert int(other) == int(first) + 1
