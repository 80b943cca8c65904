"""Job configuration: YAML -> `key=value` overrides -> frozen dataclasses, validated before anything starts.

    product: weld
    dataset: s3://ssn/datasets/weld/latest
    model: {backbone: efficientnet_lite0, image_size: [256, 128], noise_std: 1.0, noise_std_mode: relative}
    train: {epochs: 20, batch_size: 16, supervision: unsupervised}
    scaling: {num_workers: 2, use_gpu: false}

Overrides use dotted keys and YAML values: `train.epochs=3 scaling.num_workers=1 model.image_size=[128,128]`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from supersimplenet.config import ConfigError, ModelConfig, TrainConfig, from_dict, regime_model_defaults, to_dict
from supersimplenet.synthetic import DEFAULT_RECIPE, SYNTHETIC_RECIPES
from ssn_platform.names import PRODUCT_RE as PRODUCT_PATTERN, registered_model_name  # the one product rule

VALIDATION_MODES = ("none", "split", "synthetic")
RUN_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class ScalingSettings:
    """How many Ray Train workers and what each one holds."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ConfigError(f"scaling.num_workers must be >= 1, got {self.num_workers}")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"scaling.cpus_per_worker must be > 0, got {self.cpus_per_worker}")


@dataclass(frozen=True)
class JobConfig:
    """A training job, fully resolved.

    Attributes:
        product: product name (lowercase letters, digits, dashes); names the registered model `ssn-<product>`.
        dataset: S3 URI of a dataset manifest written by the ingest job (or its `latest` pointer).
        weights: backbone weights: "default" (shipped with the preset), "random" (explicit), a local path or an
            s3:// URI of a state_dict file.
        model: the network's settings.
        train: optimisation settings; `train.batch_size` is the global batch, split across workers.
        scaling: Ray Train workers.
        checkpoint_every: epochs between checkpoints (one is always written after the last epoch).
        max_failures: worker failures survived by resuming from the last checkpoint.
        run_name: the run id; submitting again with the same id resumes instead of starting over.
        storage: S3 prefix under which Ray Train keeps runs and checkpoints.
        experiment: MLflow experiment name (default `ssn-<product>`).
        register: register the trained model as a new version of `ssn-<product>`.
        overlays: number of test images whose anomaly-map overlays are logged.
        validation: per-epoch validation on the dataset's val split: "none", "split" (real labelled val images),
            or "synthetic" (normal val images plus defects synthesised in image space; for products without
            labelled defects). Reported as `val_*` metrics (the search job's objective).
        validate_every: epochs between validations.
        synthetic_recipe: the synthetic-defect recipe of `validation: synthetic`
            (`supersimplenet.synthetic.SYNTHETIC_RECIPES`; default `DEFAULT_RECIPE`, see QUALITY.md).
    """

    product: str
    dataset: str
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    weights: str = "default"
    checkpoint_every: int = 1
    max_failures: int = 2
    run_name: str | None = None
    storage: str = "s3://ssn/runs"
    experiment: str | None = None
    register: bool = True
    overlays: int = 6
    validation: str = "none"
    validate_every: int = 1
    synthetic_recipe: str = DEFAULT_RECIPE

    def __post_init__(self) -> None:
        if not PRODUCT_PATTERN.match(self.product or ""):
            raise ConfigError(f"product must match {PRODUCT_PATTERN.pattern}, got {self.product!r}")
        if not str(self.dataset).startswith("s3://"):
            raise ConfigError(f"dataset must be an s3:// URI of an ingested dataset, got {self.dataset!r}")
        if not str(self.storage).startswith("s3://"):
            raise ConfigError(f"storage must be an s3:// prefix, got {self.storage!r}")
        if self.checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if self.max_failures < 0:
            raise ConfigError(f"max_failures must be >= 0, got {self.max_failures}")
        if self.run_name is not None and not RUN_NAME_PATTERN.match(self.run_name):
            raise ConfigError(f"run_name must match {RUN_NAME_PATTERN.pattern}, got {self.run_name!r}")
        if self.train.batch_size < self.scaling.num_workers:
            raise ConfigError(
                f"train.batch_size ({self.train.batch_size}) is the global batch and must be at least "
                f"scaling.num_workers ({self.scaling.num_workers})"
            )
        if self.validation not in VALIDATION_MODES:
            raise ConfigError(f"validation must be one of {VALIDATION_MODES}, got {self.validation!r}")
        if self.synthetic_recipe not in SYNTHETIC_RECIPES:
            raise ConfigError(f"synthetic_recipe must be one of {SYNTHETIC_RECIPES}, got {self.synthetic_recipe!r}")
        if self.validate_every < 1:
            raise ConfigError(f"validate_every must be >= 1, got {self.validate_every}")
        if self.model.backbone == "wide_resnet50" and self.weights == "default":
            raise ConfigError("weights: wide_resnet50 ships no weights here; name a file or s3:// URI, or 'random'")

    @property
    def registered_model_name(self) -> str:
        return registered_model_name(self.product)

    @property
    def experiment_name(self) -> str:
        return self.experiment or registered_model_name(self.product)

    @property
    def per_worker_batch_size(self) -> int:
        return max(1, self.train.batch_size // self.scaling.num_workers)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = to_dict(value) if dataclasses.is_dataclass(value) else value
        return out

    def flat_params(self) -> dict[str, Any]:
        """Flattened `section.key` params for MLflow (no secrets live in the config)."""
        flat: dict[str, Any] = {}
        for key, value in self.to_dict().items():
            if isinstance(value, dict):
                flat.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                flat[key] = value
        return flat

    def logged_params(self) -> dict[str, str]:
        """`flat_params` as MLflow params: strings (None as ""), cut to MLflow's 6,000-character limit. What the
        training run, every search trial and the search's parent run log, and what a resubmission is compared to."""
        return {k: ("" if v is None else str(v))[:6000] for k, v in self.flat_params().items()}


SECTIONS = {"model": ModelConfig, "train": TrainConfig, "scaling": ScalingSettings}


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, Any]]:
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w.]*", key):
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            parsed.append((key, yaml.safe_load(raw) if raw != "" else None))
        except yaml.YAMLError as error:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {error}") from error
    return parsed


def build_job_config(values: Mapping[str, Any]) -> JobConfig:
    values = dict(values)
    known = {f.name for f in dataclasses.fields(JobConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; known: {sorted(known)}")
    for section, cls in SECTIONS.items():
        raw = values.get(section) or {}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{section} must be a mapping, got {type(raw).__name__}")
        if section == "model":
            # A model section starts from what the job's supervision regime decides; ModelConfig fills the rest from
            # the backbone preset (supersimplenet.config), so `model: {backbone: efficientnet_lite0}` alone trains
            # well. The section's own keys win.
            train = values.get("train") if isinstance(values.get("train"), Mapping) else {}
            raw = {**regime_model_defaults(train.get("supervision") or "unsupervised"), **raw}
        values[section] = from_dict(cls, raw, section=section)
    for required in ("product", "dataset"):
        if not values.get(required):
            raise ConfigError(f"{required} is required")
    try:
        return JobConfig(**values)
    except TypeError as error:
        raise ConfigError(str(error)) from error


def load_job_config(path: str | Path | None, overrides: Sequence[str] = ()) -> JobConfig:
    """Reads a YAML config, applies `key=value` overrides and validates everything."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from error
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        tree = loaded
    for key, value in parse_overrides(overrides):
        _set_dotted(tree, key, value)
    try:
        return build_job_config(tree)
    except ConfigError as error:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{error}") from None
