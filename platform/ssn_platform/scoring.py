"""Batch inspection on Ray Data: every image under an S3 prefix (or a dataset version's split) scored by one
registered version of a product, the results written back to S3 as one Parquet table.

Steps (`score_images_job`):

1. **Pin the version.** ``--version`` or the ``champion`` alias, resolved once by the driver into an explicit version
   whose calibrated threshold (its tags) every actor uses; a version without a threshold is an error, as on the
   endpoint.
2. **List the inputs.** The image objects under the prefix (``.png .jpg .jpeg .bmp .tif .tiff``), or the records of
   a dataset version's manifest (optionally one split).
3. **Resume.** The images already in the table's ``status=ok`` partition for this version are skipped: a rerun after
   a crash, or after new images arrived, scores only what is missing. Images that failed before are tried again.
4. **Score** (one streaming Ray Data pipeline): ``read_binary_files`` (pyarrow's S3 filesystem without keys: the
   credentials come from each node's environment) -> ``map_batches`` with an actor pool (`ssn_platform.scoring_actor`),
   each actor loading the version once with the Serve replica's loader (`ssn_platform.serving.versions.load_version`),
   decoding with its decoder and scoring through `supersimplenet.inference.predict_images`, so a batch score equals
   the endpoint's -> ``write_parquet`` partitioned by ``status`` (``ok`` or ``error``: a bad image becomes a row of
   the errors partition with its reason and never stops the job). Masks (``masks=True``) are written by the actors
   as PNGs.
5. **Summarise**: counts, anomalous rate and throughput, logged as an MLflow run of experiment
   ``ssn-<product>-scoring`` (params: input, version, output; tags ``ssn.score.*``).

Layout under ``output`` (default ``s3://<bucket>/scores``): ``<product>/v<version>/table/status=ok/*.parquet``,
``.../table/status=error/*.parquet`` and ``.../masks/<image path relative to the input>.png``. Columns: `COLUMNS`.
Read it with ``pyarrow.dataset.dataset(uri, partitioning="hive")`` or ``ray.data.read_parquet``. Parquet part files
are written whole (an S3 put), so a killed job leaves only complete parts: the next run resumes from them.

Regions and masks: each row lists the image's connected defect regions (`ssn_platform.regions`: bounding box in
the image's pixels, area, maximum and mean score) measured on the model's map or, with ``resolution="original"``,
on the map resampled to the image's own size, the grid the mask PNGs then have too. Limit: a rerun's errors
partition keeps the rows of earlier runs (column ``run`` tells them apart), and resuming is per version: a rerun
with another ``resolution`` skips what the version scored, so give it another ``output``.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any

import pyarrow.compute as pc
from pyarrow import fs

from ssn_platform.datasets import DatasetReader
from ssn_platform.manifest import OBJECTS_DIR
from ssn_platform.names import CHAMPION, PRODUCT_RE, registered_model_name
from ssn_platform.regions import RESOLUTIONS
from ssn_platform.scoring_actor import COLUMNS, Scorer
from ssn_platform.s3keys import format_s3_uri, join_key, parse_s3_uri
from ssn_platform.services import PlatformError, check_mlflow, connect_ray, experiment_id, storage_filesystem
from ssn_platform.storage import make_client
from ssn_platform.thresholds import threshold_from_tags

READ_BLOCK = 64  # images per read task: one Ray task per image would cost more than reading it
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclasses.dataclass(frozen=True)
class ScoreSettings:
    """What to score, with what, and where to write. Validated when built; errors name the field."""

    product: str
    input: str  # s3://bucket/prefix/ (every image object below) or a dataset version URI when `split` is set
    version: str | None = None  # None: the champion, resolved once
    dataset: bool = False  # `input` names a dataset version (manifest) rather than a prefix of image objects
    split: str | None = None  # dataset input: only this split
    output: str | None = None  # default: s3://<input bucket>/scores
    masks: bool = False
    resolution: str = "model"  # the grid of masks, defect area and regions: "model" or "original" (the image's)
    actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    batch_size: int = 16
    precision: str = "fp32"
    limit: int | None = None  # score at most this many (new) images

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise PlatformError(f"score settings: {message}")

        check(bool(PRODUCT_RE.match(self.product or "")), f"product: invalid name {self.product!r}")
        check(self.version is None or str(self.version).isdigit(), f"version: expected a number, got {self.version!r}")
        for field in ("input", "output"):
            value = getattr(self, field)
            if value is not None:
                try:
                    parse_s3_uri(value)
                except ValueError as error:
                    raise PlatformError(f"score settings: {field}: {error}") from None
        check(self.split is None or self.dataset, "split: only with a dataset input (--data)")
        check(self.actors >= 1, f"actors: must be >= 1, got {self.actors}")
        check(self.cpus_per_actor > 0, f"cpus_per_actor: must be > 0, got {self.cpus_per_actor}")
        check(self.gpus_per_actor >= 0, f"gpus_per_actor: must be >= 0, got {self.gpus_per_actor}")
        check(self.batch_size >= 1, f"batch_size: must be >= 1, got {self.batch_size}")
        check(self.precision in ("fp32", "bf16"), f"precision: fp32 or bf16, got {self.precision!r}")
        check(self.resolution in RESOLUTIONS, f"resolution: one of {RESOLUTIONS}, got {self.resolution!r}")
        check(self.limit is None or self.limit >= 1, f"limit: must be >= 1, got {self.limit}")

    def output_prefix(self, version: str) -> tuple[str, str]:
        """(bucket, key prefix) of this product's and version's results."""
        bucket, key = parse_s3_uri(self.output or format_s3_uri(parse_s3_uri(self.input)[0], "scores"))
        return bucket, join_key(*(part for part in (key.strip("/"), self.product, f"v{version}") if part))


@dataclasses.dataclass(frozen=True)
class ScoreSummary:
    product: str
    registered_model: str
    version: str
    threshold: float
    table: str
    listed: int
    skipped: int
    scored: int
    errors: int
    anomalous: int
    seconds: float
    run: str
    mlflow_run_id: str | None = None

    @property
    def images_per_s(self) -> float:
        return (self.scored + self.errors) / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "images_per_s": round(self.images_per_s, 3)}


# ---------------------------------------------------------------------------------------------------------
# Driver side: the version, the inputs, what is already done
# ---------------------------------------------------------------------------------------------------------
def pin_version(product: str, version: str | None) -> tuple[str, str, dict[str, str], float]:
    """(registered model, explicit version, its tags, its threshold); PlatformError naming what is missing."""
    from mlflow import MlflowClient  # noqa: PLC0415 (MLflow: kept off the Serve app's import)
    from mlflow.exceptions import MlflowException  # noqa: PLC0415 (MLflow: kept off the Serve app's import)

    name = registered_model_name(product)
    client = MlflowClient()
    try:
        if version is None:
            aliases = client.get_registered_model(name).aliases or {}
            if CHAMPION not in aliases:
                raise PlatformError(f"{name} has no '{CHAMPION}' alias; pass --version or promote one")
            version = str(aliases[CHAMPION])
        tags = dict(client.get_model_version(name, str(version)).tags or {})
    except MlflowException as error:
        raise PlatformError(f"{name} version {version}: {error.message}") from None
    threshold = threshold_from_tags(tags)
    if threshold is None:
        raise PlatformError(
            f"{name} version {version} has no calibrated threshold; run jobs/calibrate.py "
            f"--product {product} --version {version}"
        )
    return name, str(version), tags, threshold


def input_root(settings: ScoreSettings) -> str:
    """The URI prefix every input image's relative path follows: the prefix itself, or a dataset version's objects
    folder (``<version prefix>/objects/``, where ingest puts each image at its path in the dataset)."""
    if settings.dataset:
        reader = DatasetReader(settings.input)
        return format_s3_uri(reader.bucket, join_key(reader.prefix, OBJECTS_DIR)) + "/"
    bucket, prefix = parse_s3_uri(settings.input)
    return format_s3_uri(bucket, prefix.strip("/")).rstrip("/") + "/"


def list_inputs(settings: ScoreSettings, client: Any = None) -> list[tuple[str, str]]:
    """(s3 URI, path relative to the input) of every image to consider, sorted."""
    if settings.dataset:
        reader = DatasetReader(settings.input, client=client)
        bucket = reader.bucket
        items = [
            (format_s3_uri(bucket, join_key(reader.prefix, r["image_key"])), r["image"])
            for r in reader.manifest.records
            if settings.split is None or r["split"] == settings.split
        ]
        if not items:
            raise PlatformError(
                f"{settings.input} (dataset version {reader.version}) has no images"
                + (f" in split {settings.split!r}" if settings.split else "")
            )
        return sorted(items)
    bucket, prefix = parse_s3_uri(settings.input)
    prefix = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
    client = client or make_client()
    items = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for entry in page.get("Contents", []):
            key = entry["Key"]
            if key.lower().endswith(IMAGE_SUFFIXES):
                items.append((format_s3_uri(bucket, key), key[len(prefix) :]))
    if not items:
        raise PlatformError(f"no image objects ({', '.join(IMAGE_SUFFIXES)}) under {settings.input}")
    return sorted(items)


def already_scored(filesystem: Any, table_path: str) -> set[str]:
    """The `image` values of the table's status=ok partition (empty when the table does not exist yet)."""
    import pyarrow.dataset as pads  # noqa: PLC0415 (pyarrow.dataset: kept off the Serve app's import)

    ok_path = f"{table_path}/status=ok"
    if filesystem.get_file_info(ok_path).type == fs.FileType.NotFound:
        return set()
    table = pads.dataset(ok_path, filesystem=filesystem, format="parquet").to_table(columns=["image"])
    return set(table.column("image").to_pylist())


# ---------------------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------------------
def score_images_job(settings: ScoreSettings, *, address: str | None = None, progress: bool = True) -> ScoreSummary:
    """Scores the inputs not yet in the table with the pinned version (module docstring); returns the summary."""
    import ray  # noqa: PLC0415 (Ray reads its settings on first import)

    check_mlflow()
    name, version, tags, threshold = pin_version(settings.product, settings.version)
    bucket, prefix = settings.output_prefix(version)
    table_path = f"{bucket}/{join_key(prefix, 'table')}"
    filesystem = storage_filesystem()
    listed = list_inputs(settings)
    done = already_scored(filesystem, table_path)
    todo = [(uri, rel) for uri, rel in listed if uri not in done]
    if settings.limit is not None:
        todo = todo[: settings.limit]
    run = uuid.uuid4().hex[:12]
    started = time.monotonic()
    counts = {"ok": 0, "error": 0, "anomalous": 0}
    if todo:
        connect_ray(address, log_to_driver=progress)
        ray.data.DataContext.get_current().enable_progress_bars = progress
        dataset = ray.data.read_binary_files(
            [uri[len("s3://") :] for uri, _ in todo],
            include_paths=True,
            filesystem=filesystem,
            num_cpus=0,
            concurrency=max(2, settings.actors),
            override_num_blocks=-(-len(todo) // READ_BLOCK),
        )
        device = "cuda" if settings.gpus_per_actor > 0 else "cpu"
        scored = dataset.map_batches(
            Scorer,
            batch_size=settings.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=settings.actors),
            num_cpus=settings.cpus_per_actor,
            num_gpus=settings.gpus_per_actor or None,
            fn_constructor_args=(settings.product, name, version, tags),
            fn_constructor_kwargs={
                "device": device,
                "precision": settings.precision,
                "threads": int(settings.cpus_per_actor),
                "run": run,
                "masks_prefix": (bucket, join_key(prefix, "masks")) if settings.masks else None,
                "root": input_root(settings),
                "resolution": settings.resolution,
            },
        )
        scored.write_parquet(
            table_path, filesystem=filesystem, partition_cols=["status"], ray_remote_args={"num_cpus": 0}
        )
        counts = _run_counts(filesystem, table_path, run)
    summary = ScoreSummary(
        product=settings.product,
        registered_model=name,
        version=version,
        threshold=threshold,
        table=format_s3_uri(bucket, join_key(prefix, "table")),
        listed=len(listed),
        skipped=sum(uri in done for uri, _ in listed),
        scored=counts["ok"],
        errors=counts["error"],
        anomalous=counts["anomalous"],
        seconds=round(time.monotonic() - started, 3),
        run=run,
    )
    return dataclasses.replace(summary, mlflow_run_id=_log_summary(settings, summary))


def _run_counts(filesystem: Any, table_path: str, run: str) -> dict[str, int]:
    """Rows this run wrote, per status, and its anomalous count (read back from the table itself)."""
    import pyarrow.dataset as pads  # noqa: PLC0415 (pyarrow.dataset: kept off the Serve app's import)

    table = pads.dataset(table_path, filesystem=filesystem, format="parquet", partitioning="hive").to_table(
        columns=["status", "is_anomalous"], filter=pads.field("run") == run
    )
    status = table.column("status")
    ok = pc.equal(status, "ok")
    return {
        "ok": int(pc.sum(ok).as_py() or 0),
        "error": int(pc.sum(pc.invert(ok)).as_py() or 0),
        "anomalous": int(pc.sum(pc.and_(ok, pc.fill_null(table.column("is_anomalous"), False))).as_py() or 0),
    }


def _log_summary(settings: ScoreSettings, summary: ScoreSummary) -> str:
    """One MLflow run in ``ssn-<product>-scoring`` per job: settings as params, counts as metrics."""
    from mlflow import MlflowClient  # noqa: PLC0415 (MLflow: kept off the Serve app's import)
    from mlflow.entities import Metric, Param  # noqa: PLC0415 (MLflow: kept off the Serve app's import)

    client = MlflowClient()
    run = client.create_run(
        experiment_id(client, f"{registered_model_name(settings.product)}-scoring"),
        run_name=f"score-v{summary.version}-{summary.run}",
        tags={
            "ssn.score.registered_model": summary.registered_model,
            "ssn.score.version": summary.version,
            "ssn.score.run": summary.run,
            "ssn.score.table": summary.table,
        },
    )
    params = {
        "input": settings.input,
        "split": settings.split or "",
        "version": summary.version,
        "table": summary.table,
        "masks": settings.masks,
        "resolution": settings.resolution,
        "actors": settings.actors,
        "cpus_per_actor": settings.cpus_per_actor,
        "batch_size": settings.batch_size,
        "precision": settings.precision,
    }
    metrics = {
        "listed": summary.listed,
        "skipped": summary.skipped,
        "scored": summary.scored,
        "errors": summary.errors,
        "anomalous": summary.anomalous,
        "anomalous_rate": summary.anomalous / summary.scored if summary.scored else 0.0,
        "seconds": summary.seconds,
        "images_per_s": summary.images_per_s,
    }
    now = int(time.time() * 1000)
    client.log_batch(
        run.info.run_id,
        params=[Param(k, str(v)) for k, v in params.items()],
        metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
    )
    client.set_terminated(run.info.run_id)
    return run.info.run_id


__all__ = [
    "COLUMNS",
    "ScoreSettings",
    "ScoreSummary",
    "already_scored",
    "list_inputs",
    "pin_version",
    "score_images_job",
]
