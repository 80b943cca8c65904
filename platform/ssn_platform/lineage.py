"""The MLflow run of a training job and its lineage: which run a job writes to, and what it was trained from.

* Run. `open_mlflow_run` finds the job's run by its run name (tag `RUN_TAG`, ``ssn.run_name``) in the job's
  experiment, or creates it with the job's params, its ``config.yaml`` and the lineage tags. A run name submitted
  again continues its run (`ssn_platform.training.run_training` resumes from its checkpoints) only when nothing it
  trains has changed: `RESUBMIT_MAY_CHANGE` lists what may (how it runs, never what it trains), and any other
  differing param is refused by name with its old and new value. Params the old run never logged are not compared.
* Dataset. `pin_dataset` resolves the job's dataset once, on the driver, to one version's manifest, so that every
  worker (and every restart) trains on the data the run records.
* Lineage tags (`lineage_tags`): the recipe fingerprint (`recipe_fingerprint`, ``ssn.recipe``: the model and train
  sections without `RECIPE_EXCLUDED_TRAIN_FIELDS`, the weights and the dataset version), the dataset URI, manifest
  and version, the git commit and the backbone. Training runs, multi-seed evaluations and searches carry them; a
  promotion that requires seeds matches a version to its evaluation by ``ssn.recipe``. The fingerprint cannot see
  what is outside the job config (the library's code, the cluster), only the git commit tag records that.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import yaml
from mlflow import MlflowClient
from mlflow.entities import Param

from supersimplenet.config import to_dict
from ssn_platform.datasets import DatasetReader
from ssn_platform.jobconfig import JobConfig
from ssn_platform.services import PlatformError, experiment_id, git_sha

RUN_TAG = "ssn.run_name"


# What a resubmitted run_name may change: how it runs (workers, retries, loader processes, what it logs), never
# what it trains (the data, the weights, the model and train sections, where its checkpoints are).
RESUBMIT_MAY_CHANGE = (
    "scaling.",
    "max_failures",
    "train.num_workers",
    "train.eval_every",
    "register",
    "overlays",
    "experiment",
    "validation",
    "validate_every",
    "synthetic_recipe",
    "checkpoint_every",
)


def _check_resubmission(job: JobConfig, run_name: str, logged: dict[str, str]) -> None:
    """A run_name submitted again continues its run only with the settings it started with; otherwise a
    PlatformError names every differing key (the old and the new value)."""
    differing = [
        f"{key}: {logged[key]!r} -> {value!r}"
        for key, value in sorted(job.logged_params().items())
        if key in logged and logged[key] != value and not key.startswith(RESUBMIT_MAY_CHANGE)
    ]
    if differing:
        raise PlatformError(
            f"run_name {run_name!r} exists with other settings; resubmitting it continues that run, "
            "so these must not change (use another run_name for a new run): " + "; ".join(differing)
        )


def open_mlflow_run(job: JobConfig, run_name: str) -> tuple[str, str]:
    """The MLflow run of this job: found by its run name tag (resume) or created. Returns (run_id, status)."""
    client = MlflowClient()
    experiment = experiment_id(client, job.experiment_name)
    found = client.search_runs([experiment], filter_string=f"tags.`{RUN_TAG}` = '{run_name}'", max_results=1)
    if found:
        _check_resubmission(job, run_name, found[0].data.params)
        return found[0].info.run_id, found[0].info.status
    run = client.create_run(experiment, run_name=run_name, tags={RUN_TAG: run_name, "ssn.product": job.product})
    run_id = run.info.run_id
    params = job.logged_params()
    params["run_name"] = run_name
    client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "config.yaml"
        path.write_text(yaml.safe_dump({**job.to_dict(), "run_name": run_name}, sort_keys=False))
        client.log_artifact(run_id, str(path))
    for key, value in lineage_tags(job).items():
        client.set_tag(run_id, key, value)
    return run_id, "RUNNING"


# Fields of the train section that change one run of a recipe, not the recipe: the seed, the loader's processes and
# how often the step is evaluated. Two runs with equal fingerprints differ only in these (and in the cluster).
RECIPE_EXCLUDED_TRAIN_FIELDS = ("seed", "num_workers", "eval_every")


def recipe_fingerprint(job: JobConfig, dataset_version: str) -> str:
    """sha256 (16 hex digits) of what a trained model's quality depends on: the model section, the train section
    without `RECIPE_EXCLUDED_TRAIN_FIELDS`, the backbone weights and the dataset version. A multi-seed evaluation
    (`ssn_platform.evaluation.evaluate_seeds`) and a registered version trained from the same recipe carry the same
    tag ``ssn.recipe``, which is how `ssn_platform.promotion.promote(require_seeds=...)` finds the one for the other.
    """
    train = {k: v for k, v in to_dict(job.train).items() if k not in RECIPE_EXCLUDED_TRAIN_FIELDS}
    recipe = {"model": to_dict(job.model), "train": train, "weights": job.weights, "dataset_version": dataset_version}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]


def pin_dataset(job: JobConfig) -> JobConfig:
    """The job with its dataset resolved once, on the driver, to the manifest of one version: a ``latest`` pointer
    or product prefix would otherwise be resolved again by every worker at every restart, and a worker that
    restarts after a new ingest would train on other data than the run records."""
    reader = DatasetReader(job.dataset)
    pinned = f"s3://{reader.bucket}/{reader.prefix}/manifest.json"
    return job if pinned == job.dataset else replace(job, dataset=pinned)


def lineage_tags(job: JobConfig) -> dict[str, str]:
    reader = DatasetReader(job.dataset)
    return {
        "ssn.recipe": recipe_fingerprint(job, reader.version),
        "ssn.dataset.uri": job.dataset,
        "ssn.dataset.manifest": f"s3://{reader.bucket}/{reader.prefix}/manifest.json",
        # the version is the content hash of the manifest's records
        "ssn.dataset.version": reader.version,
        "ssn.git_sha": git_sha(),
        "ssn.backbone": job.model.backbone,
    }
