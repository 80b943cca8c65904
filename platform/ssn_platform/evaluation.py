"""Evaluation of SuperSimpleNet models: several seeds of one job (mean ± std), or one registered version.

`evaluate_seeds(job, seeds)` trains one run per seed with `ssn_platform.training.run_training` (train.seed and run
name `<base>-seed<k>` overridden, never registered), each a child of one MLflow parent run (``mlflow.parentRunId``),
collects every seed's test metrics from its run (``test_*`` and ``evaluation/breakdown.json``, which the training
job's test step writes with `write_breakdown`) and logs ``<metric>_mean`` and ``<metric>_std`` (population std) on
the parent. `evaluate_version(...)` scores the test split of a dataset version with a registered model through the
one inference path (`supersimplenet.train.predict`) and logs the metrics on a parent run of its own.

Both report, besides `compute_metrics` of the model's reported image score: AUROC and AP of every image score
(``image_auroc_<head|map_max|combined>``, ``ap_det_<...>``: `supersimplenet.train.Predictions.score_metrics`), of every
defect class against all normal test images (``class.<defect_type>.*``, `Sample.defect_type`), pixel metrics where
the test split has masks, and a histogram (20 bins over [0, 1]) of the reported score of normal and defective
images. Artifacts ``evaluation.md`` and ``evaluation.json``; tags ``ssn.evaluate.*``. That arithmetic and the tables
are pure functions in `ssn_platform.evaluation_metrics`; this module scores, trains and logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import re
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from supersimplenet.backbones import get_preset
from supersimplenet.loading import DefectDataset
from supersimplenet.train import eval_loader, predict, unwrap
from ssn_platform.datasets import DatasetReader, materialize_split, select_split
from ssn_platform.evaluation_metrics import (
    aggregate,
    check_seeds,
    finite,
    jsonable,
    markdown,
    ordered,
    sum_histograms,
    summarize,
)
from ssn_platform.lineage import lineage_tags, open_mlflow_run
from ssn_platform.names import registered_model_name
from ssn_platform.registry import load_model
from ssn_platform.services import PlatformError, check_mlflow, connect_ray, experiment_id as _experiment_id

log = logging.getLogger(__name__)

BREAKDOWN_FILE = "breakdown.json"  # written by the training job's test step into its `evaluation/` artifacts
BREAKDOWN_ARTIFACT = f"evaluation/{BREAKDOWN_FILE}"
TAG = "ssn.evaluate."
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[A-Za-z0-9_-]+))$")


# ---------------------------------------------------------------------------------------------------------
# Scoring (the one inference path) and the training job's hook
# ---------------------------------------------------------------------------------------------------------
def summarize_dataset(model, dataset, predictions, *, overall: bool = True) -> dict:
    """`summarize` of `predictions` (`supersimplenet.train.predict` of `model` on the `DefectDataset` `dataset`)."""
    samples = [dataset.samples[i] for i in np.asarray(predictions.indices)]
    return summarize(predictions, samples, image_score=unwrap(model).config.image_score, overall=overall)


def write_breakdown(out_dir: Path, model, dataset, predictions) -> dict[str, Any]:
    """The training job's test step hook: `summarize_dataset` without the overall metrics (the run logs them as
    ``test_*``), written to ``<out_dir>/breakdown.json``."""
    summary = summarize_dataset(model, dataset, predictions, overall=False)
    (Path(out_dir) / BREAKDOWN_FILE).write_text(json.dumps(jsonable(summary), indent=2))
    return summary


def score_samples(model, root: Path, samples: Sequence, *, batch_size: int = 16) -> dict[str, Any]:
    """`summarize_dataset` of a model on `samples`, scored as the training job's test step scores."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = get_preset(model.config.backbone)
    dataset = DefectDataset(
        root=root, samples=samples, image_size=model.config.image_size, mean=preset.mean, std=preset.std
    )
    predictions = predict(model.to(device), eval_loader(dataset, batch_size=batch_size), device=device)
    return summarize_dataset(model, dataset, predictions)


TEST_SPLIT_HINT = "ingest it with test images or pass another dataset"


def require_test_split(samples: Sequence, where: str) -> list:
    """The test-split samples (objects with `.split`, or manifest records); PlatformError naming `where` if none."""
    return select_split(list(samples), "test", where, TEST_SPLIT_HINT, PlatformError)


# ---------------------------------------------------------------------------------------------------------
# MLflow: reports and parent runs
# ---------------------------------------------------------------------------------------------------------
@dataclass
class EvaluationReport:
    """What an evaluation logged: `metrics` are the parent run's metrics (``<metric>_mean``/``_std`` for seeds)."""

    mode: str  # "seeds" or "version"
    title: str
    parent_run_id: str
    experiment: str
    subject: dict[str, Any]
    metrics: dict[str, float]
    image_score: str | None = None
    histogram: dict[str, list] | None = None
    classes: dict[str, int] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)  # seeds: {seed, run_name, run_id, metrics}
    aggregate: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def markdown(self) -> str:
        return markdown(self.to_dict())

    def summary(self) -> dict[str, Any]:
        """The job's last output line."""
        return jsonable(
            {
                "mode": self.mode,
                "evaluation_run_id": self.parent_run_id,
                "experiment": self.experiment,
                "runs": [r["run_id"] for r in self.runs],
                "metrics": self.metrics,
            }
        )


@contextlib.contextmanager
def _parent_run(client, experiment_id: str, name: str, tags: dict[str, str]) -> Iterator[str]:
    """A parent run that ends FINISHED, or FAILED when the block raises."""
    run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    try:
        yield run_id
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")


def _log_report(client, report: EvaluationReport) -> None:
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, 0) for k, v in report.metrics.items() if finite(v)]
    for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
        client.log_batch(report.parent_run_id, metrics=metrics[start : start + 1000])
    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / "evaluation.md").write_text(report.markdown(), encoding="utf-8")
        (Path(directory) / "evaluation.json").write_text(json.dumps(jsonable(report.to_dict()), indent=2))
        client.log_artifacts(report.parent_run_id, directory)


def _seed_run(client, seed: int, result) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A seed's {seed, run_name, run_id, metrics} (its ``test_*`` metrics over its breakdown's) and its breakdown
    (None for runs trained before the training job wrote one)."""
    if not result.metrics:
        raise PlatformError(f"run {result.run_name} ({result.mlflow_run_id}) logged no test metrics")
    breakdown = None
    if BREAKDOWN_ARTIFACT in {a.path for a in client.list_artifacts(result.mlflow_run_id, "evaluation")}:
        with tempfile.TemporaryDirectory() as directory:
            path = mlflow.artifacts.download_artifacts(
                run_id=result.mlflow_run_id, artifact_path=BREAKDOWN_ARTIFACT, dst_path=directory
            )
            breakdown = json.loads(Path(path).read_text())
    metrics = {k: (math.nan if v is None else v) for k, v in (breakdown or {}).get("metrics", {}).items()}
    return {
        "seed": seed,
        "run_name": result.run_name,
        "run_id": result.mlflow_run_id,
        "metrics": {**metrics, **result.metrics},
    }, breakdown


def train_seeds(jobs: Sequence, *, parallel: int, train: Callable[[Any], Any]) -> list:
    """`train(job)` for every job, `parallel` at a time in threads; results in the jobs' order. On a failure the
    jobs not yet started are cancelled, the running ones finish, and the first failure (in job order) is raised."""
    if parallel <= 1 or len(jobs) == 1:
        return [train(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=min(parallel, len(jobs)), thread_name_prefix="ssn-seed") as pool:
        futures = [pool.submit(train, job) for job in jobs]
        try:
            return [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def evaluate_seeds(
    job, seeds: Iterable[Any], *, parallel: int = 1, address: str | None = None, config_path: str | None = None
) -> EvaluationReport:
    """Trains `job` once per seed (run `<base>-seed<k>`, not registered), each run a child of one MLflow parent
    run in the job's experiment, and logs the seeds' mean and population std of every test metric on it.

    `base` is `job.run_name` or a fresh name; evaluating the same base again reuses the seeds' finished runs."""
    from ssn_platform.training import run_training  # noqa: PLC0415 (import cycle: training imports this module)

    seeds = check_seeds(seeds)
    if parallel < 1:
        raise PlatformError(f"--parallel must be >= 1, got {parallel}")
    check_mlflow()
    reader = DatasetReader(job.dataset)
    n_test = len(require_test_split(reader.manifest.records, f"{job.dataset} (dataset version {reader.version})"))
    base = job.run_name or f"{job.product}-eval-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    jobs = _seed_jobs(job, seeds, base)
    client = MlflowClient()
    tags = _seeds_tags(job, seeds, base, parallel, config_path, dataset_version=reader.version, n_test=n_test)
    with _parent_run(client, _experiment_id(client, job.experiment_name), base, tags) as parent_id:
        _nest_seed_runs(client, parent_id, seeds, jobs)
        if parallel > 1:
            _connect_for_parallel_seeds(job, parallel, len(jobs), address)
        results = train_seeds(jobs, parallel=parallel, train=lambda j: run_training(j, address=address))
        runs, breakdowns = _collect_seed_runs(client, parent_id, seeds, results)
        report = _seeds_report(
            job, base, seeds, parent_id, runs, breakdowns, config_path, dataset_version=reader.version, n_test=n_test
        )
        _log_report(client, report)
    return report


def _seed_jobs(job, seeds: list[int], base: str) -> list:
    """One job per seed: train.seed set, run name ``<base>-seed<k>``, never registered."""
    return [
        dataclasses.replace(
            job, run_name=f"{base}-seed{seed}", register=False, train=dataclasses.replace(job.train, seed=seed)
        )
        for seed in seeds
    ]


def _seeds_tags(
    job, seeds: list[int], base: str, parallel: int, config_path: str | None, *, dataset_version: str, n_test: int
) -> dict[str, str]:
    """The parent run's tags: ``ssn.evaluate.*`` (mode, seeds, base run name, config, data) and the job's lineage."""
    return {
        "ssn.product": job.product,
        f"{TAG}mode": "seeds",
        f"{TAG}seeds": " ".join(map(str, seeds)),
        f"{TAG}base_run_name": base,
        f"{TAG}config": config_path or "",
        f"{TAG}parallel": str(parallel),
        f"{TAG}dataset": job.dataset,
        f"{TAG}dataset_version": dataset_version,
        f"{TAG}n_test_images": str(n_test),
        **lineage_tags(job),
    }


def _nest_seed_runs(client, parent_id: str, seeds: list[int], jobs: Sequence) -> None:
    """Creates (or finds) every seed's run before any trains, as a child of the parent run (tagged with its seed),
    so that each is nested under the parent while it trains."""
    for seed, seed_job in zip(seeds, jobs):
        child_id, _ = open_mlflow_run(seed_job, seed_job.run_name)
        client.set_tag(child_id, "mlflow.parentRunId", parent_id)
        client.set_tag(child_id, f"{TAG}seed", str(seed))


def _connect_for_parallel_seeds(job, parallel: int, n_jobs: int, address: str | None) -> None:
    """Connects to Ray once, before the threads race to initialise it, and warns when the runs that train at once
    need more CPUs than the cluster has now (they wait for room, or an autoscaler)."""
    import ray  # noqa: PLC0415 (Ray reads its settings on first import)

    connect_ray(address)
    need = min(parallel, n_jobs) * job.scaling.num_workers * job.scaling.cpus_per_worker
    if need > ray.cluster_resources().get("CPU", 0):
        log.warning(
            "--parallel %d: the runs need %g CPUs at once, more than the cluster has now; they wait "
            "for room (or an autoscaler)",
            parallel,
            need,
        )


def _collect_seed_runs(client, parent_id: str, seeds: list[int], results: Sequence) -> tuple[list, list]:
    """Every seed's run (`_seed_run`) and the breakdowns the runs logged; the runs without one (trained before the
    training job wrote it) are warned about and tagged on the parent, as are the runs' ids."""
    runs, breakdowns = zip(*(_seed_run(client, seed, result) for seed, result in zip(seeds, results)))
    missing = [run["run_name"] for run, breakdown in zip(runs, breakdowns) if breakdown is None]
    breakdowns = [b for b in breakdowns if b is not None]
    if missing:
        log.warning(
            "runs without %s (trained before the training job wrote it): %s", BREAKDOWN_ARTIFACT, ", ".join(missing)
        )
        client.set_tag(parent_id, f"{TAG}breakdown_missing", " ".join(missing))
    client.set_tag(parent_id, f"{TAG}runs", " ".join(r["run_id"] for r in runs))
    return list(runs), breakdowns


def _seeds_report(
    job,
    base: str,
    seeds: list[int],
    parent_id: str,
    runs: list[dict[str, Any]],
    breakdowns: list[dict[str, Any]],
    config_path: str | None,
    *,
    dataset_version: str,
    n_test: int,
) -> EvaluationReport:
    """The seeds' report: ``<metric>_mean`` and ``<metric>_std`` of every metric, the first breakdown's image score
    and classes, and the histogram of all seeds' test images pooled (the job's image score and no histogram when
    no run logged a breakdown)."""
    stats = aggregate([r["metrics"] for r in runs])
    metrics = {}
    for key in ordered(stats):
        metrics[f"{key}_mean"], metrics[f"{key}_std"] = stats[key]["mean"], stats[key]["std"]
    return EvaluationReport(
        mode="seeds",
        title=f"{base} ({len(seeds)} seeds)",
        parent_run_id=parent_id,
        experiment=job.experiment_name,
        metrics=metrics,
        runs=runs,
        aggregate=stats,
        subject={
            "config": config_path,
            "dataset": job.dataset,
            "dataset_version": dataset_version,
            "seeds": " ".join(map(str, seeds)),
            "test images per seed": n_test,
            "std": "population (numpy.std, ddof 0) over the seeds where the metric is defined",
        },
        image_score=breakdowns[0]["image_score"] if breakdowns else job.model.image_score,
        histogram=sum_histograms([b["histogram"] for b in breakdowns]) if breakdowns else None,
        classes=breakdowns[0].get("classes", {}) if breakdowns else {},
    )


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/<name>/<version>`` or ``models:/<name>@<alias>`` -> (name, version, alias)."""
    match = _MODEL_URI.match(uri or "")
    if not match:
        raise PlatformError(f"model URI {uri!r} is not models:/<name>/<version> or models:/<name>@<alias>")
    return match["name"], match["version"], match["alias"]


def _resolve_version(client, product: str | None, version: str | None, model_uri: str | None):
    if model_uri:
        name, version, alias = parse_model_uri(model_uri)
    elif product and version:
        name, alias = registered_model_name(product), None
    else:
        raise PlatformError("name the model: --product and --version, or --model-uri models:/...")
    try:
        if alias:
            return name, client.get_model_version_by_alias(name, alias)
        return name, client.get_model_version(name, str(version))
    except MlflowException as error:
        what = f"alias {alias!r}" if alias else f"version {version}"
        raise PlatformError(f"{name} {what} does not exist: {error.message}") from None


def evaluate_version(
    *,
    product: str | None = None,
    version: str | None = None,
    model_uri: str | None = None,
    dataset: str | None = None,
    experiment: str | None = None,
    batch_size: int = 16,
) -> EvaluationReport:
    """Scores the test split of `dataset` (default: the dataset version the model was trained on, tag
    ``ssn.dataset.manifest`` of its training run, else the version's ``dataset`` tag) with a registered version and
    logs the metrics on a parent run (experiment `experiment`, else the training run's, else ``ssn-<product>``)."""
    check_mlflow()
    client = MlflowClient()
    name, model_version = _resolve_version(client, product, version, model_uri)
    version = str(model_version.version)
    product = product or (name[len("ssn-") :] if name.startswith("ssn-") else name)
    try:
        source_run = client.get_run(model_version.run_id) if model_version.run_id else None
    except Exception:  # noqa: BLE001 - a deleted training run only loses the defaults it would give
        source_run = None
    uri = (
        dataset
        or (source_run.data.tags.get("ssn.dataset.manifest") if source_run else None)
        or model_version.tags.get("dataset")
    )
    if not uri:
        raise PlatformError(
            f"{name} version {version} names no dataset (run tag 'ssn.dataset.manifest' or version "
            "tag 'dataset'); pass --dataset s3://..."
        )
    reader, root, test = materialize_split(uri, "test", TEST_SPLIT_HINT, PlatformError)
    model, _ = load_model(f"models:/{name}/{version}")
    summary = score_samples(model, root, test, batch_size=batch_size)
    experiment_id = (
        _experiment_id(client, experiment)
        if experiment
        else source_run.info.experiment_id
        if source_run is not None
        else _experiment_id(client, registered_model_name(product))
    )
    model_uri = f"models:/{name}/{version}"
    tags = {
        "ssn.product": product,
        f"{TAG}mode": "version",
        f"{TAG}model_uri": model_uri,
        f"{TAG}registered_model": name,
        f"{TAG}model_version": version,
        f"{TAG}source_run_id": model_version.run_id or "",
        f"{TAG}dataset": uri,
        f"{TAG}dataset_version": reader.version,
        f"{TAG}n_test_images": str(len(test)),
        f"{TAG}image_score": summary["image_score"],
    }
    with _parent_run(client, experiment_id, f"{name}-v{version}-evaluation", tags) as parent_id:
        report = EvaluationReport(
            mode="version",
            title=f"{name} version {version}",
            parent_run_id=parent_id,
            experiment=client.get_experiment(experiment_id).name,
            metrics=summary["metrics"],
            image_score=summary["image_score"],
            histogram=summary["histogram"],
            classes=summary["classes"],
            subject={
                "model": model_uri,
                "training run": model_version.run_id,
                "dataset": uri,
                "dataset_version": reader.version,
                "test images": f"{summary['n_images']} "
                f"({summary['n_normal']} normal, {summary['n_defective']} defective)",
            },
        )
        _log_report(client, report)
    return report
