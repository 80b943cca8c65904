"""The search space of a hyperparameter search: the searched parameters and the overrides fixed for every trial.

A space (default: jobs/configs/search_space.yaml) has `params`, dotted JobConfig keys each with a distribution
(uniform, log_uniform, int or categorical), and `fixed` overrides that every trial applies (e.g.
`model.noise_std_mode: relative`). `train.lr_scale` is a pseudo-parameter that scales both learning rates. A space
may search `model.backbone` as a categorical parameter (`BACKBONE_KEY`). `apply_params` turns a point of the space
into a job config, validated like any other; the search itself is `ssn_platform.tuning`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from supersimplenet.config import ConfigError
from ssn_platform.jobconfig import JobConfig, _set_dotted, build_job_config

DISTRIBUTIONS = ("uniform", "log_uniform", "int", "categorical")
LR_SCALE_KEY = "train.lr_scale"  # pseudo-parameter: multiplies train.lr_adaptor and train.lr_heads together
# A search space may list backbones as a categorical parameter: each trial then trains its own backbone, with sigma
# relative to that backbone's measured feature scale (noise_std_mode: relative), and the study spans backbones.
BACKBONE_KEY = "model.backbone"


@dataclass(frozen=True)
class ParamSpec:
    """One searched parameter: a dotted JobConfig key (or `train.lr_scale`) and its distribution."""

    key: str
    distribution: str
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_]\w*)+", self.key):
            raise ConfigError(f"search space: {self.key!r} is not a dotted config key such as model.noise_std")
        if self.distribution not in DISTRIBUTIONS:
            raise ConfigError(
                f"search space: {self.key}: distribution must be one of {DISTRIBUTIONS}, got {self.distribution!r}"
            )
        if self.distribution == "categorical":
            if not self.choices:
                raise ConfigError(f"search space: {self.key}: categorical needs a non-empty `choices` list")
            return
        if self.low is None or self.high is None or not float(self.low) < float(self.high):
            raise ConfigError(f"search space: {self.key}: needs low < high, got low={self.low} high={self.high}")
        if self.distribution == "log_uniform" and float(self.low) <= 0:
            raise ConfigError(f"search space: {self.key}: log_uniform needs low > 0, got {self.low}")

    def optuna_distribution(self):
        import optuna  # noqa: PLC0415 (Optuna: the train and evaluate jobs import this module without the search)

        if self.distribution == "uniform":
            return optuna.distributions.FloatDistribution(float(self.low), float(self.high))
        if self.distribution == "log_uniform":
            return optuna.distributions.FloatDistribution(float(self.low), float(self.high), log=True)
        if self.distribution == "int":
            return optuna.distributions.IntDistribution(int(self.low), int(self.high))
        return optuna.distributions.CategoricalDistribution(list(self.choices))

    def corners(self) -> list[Any]:
        """Extreme values, for validating the space against the job config before anything starts."""
        if self.distribution == "categorical":
            return list(self.choices)
        if self.distribution == "int":
            return [int(self.low), int(self.high)]
        return [float(self.low), float(self.high)]


@dataclass(frozen=True)
class SearchSpace:
    """Searched parameters plus fixed overrides applied to every trial (e.g. `model.noise_std_mode: relative`)."""

    params: tuple[ParamSpec, ...]
    fixed: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.params:
            raise ConfigError("search space: no parameters to search")
        keys = [p.key for p in self.params]
        if len(set(keys)) != len(keys):
            raise ConfigError(f"search space: duplicate parameters in {keys}")
        clash = sorted(set(keys) & set(self.fixed))
        if clash:
            raise ConfigError(f"search space: {clash} are both searched and fixed")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> SearchSpace:
        if not isinstance(raw, Mapping):
            raise ConfigError("search space must be a mapping with `params` (and optionally `fixed`)")
        unknown = sorted(set(raw) - {"params", "fixed"})
        if unknown:
            raise ConfigError(f"search space: unknown top-level key(s) {unknown}; use `params` and `fixed`")
        params = []
        for key, spec in (raw.get("params") or {}).items():
            if not isinstance(spec, Mapping):
                raise ConfigError(
                    f"search space: {key} must be a mapping such as {{distribution: log_uniform, low: 0.1, high: 8}}"
                )
            extra = sorted(set(spec) - {"distribution", "low", "high", "choices"})
            if extra:
                raise ConfigError(f"search space: {key}: unknown field(s) {extra}")
            params.append(
                ParamSpec(
                    key=str(key),
                    distribution=str(spec.get("distribution", "")),
                    low=spec.get("low"),
                    high=spec.get("high"),
                    choices=tuple(spec.get("choices") or ()),
                )
            )
        fixed = dict(raw.get("fixed") or {})
        return cls(params=tuple(params), fixed=fixed)

    @classmethod
    def load(cls, source: str | Path | Mapping[str, Any] | SearchSpace) -> SearchSpace:
        if isinstance(source, SearchSpace):
            return source
        if isinstance(source, Mapping):
            return cls.from_dict(source)
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"search space file not found: {path}")
        try:
            return cls.from_dict(yaml.safe_load(path.read_text()) or {})
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from error

    def to_dict(self) -> dict[str, Any]:
        params = {}
        for p in self.params:
            entry: dict[str, Any] = {"distribution": p.distribution}
            if p.distribution == "categorical":
                entry["choices"] = list(p.choices)
            else:
                entry.update(low=p.low, high=p.high)
            params[p.key] = entry
        return {"params": params, "fixed": dict(self.fixed)}

    def optuna_space(self) -> dict[str, Any]:
        return {p.key: p.optuna_distribution() for p in self.params}

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    @property
    def backbones(self) -> tuple[str, ...]:
        """The backbones searched over (a categorical `model.backbone`), or () when the job's own is used."""
        return tuple(next((p.choices for p in self.params if p.key == BACKBONE_KEY), ()))


def apply_params(
    job: JobConfig, params: Mapping[str, Any], fixed: Mapping[str, Any] = (), **top_level: Any
) -> JobConfig:
    """The job with `fixed` and `params` applied as dotted overrides (`train.lr_scale` scales both learning
    rates), plus top-level fields (validation, run_name, ...). Validated like any job config."""
    tree = job.to_dict()
    for key, value in {**dict(fixed), **dict(params)}.items():
        if key == LR_SCALE_KEY:
            continue
        _set_dotted(tree, key, value)
    if LR_SCALE_KEY in params:
        scale = float(params[LR_SCALE_KEY])
        tree["train"]["lr_adaptor"] = job.train.lr_adaptor * scale
        tree["train"]["lr_heads"] = job.train.lr_heads * scale
    tree.update(top_level)
    return build_job_config(tree)


def _value_of(job: JobConfig, key: str) -> Any:
    if key == LR_SCALE_KEY:
        return 1.0
    node: Any = job.to_dict()
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ConfigError(f"search space: {key!r} is not a key of the job config")
        node = node[part]
    return node


__all__ = [
    "BACKBONE_KEY",
    "LR_SCALE_KEY",
    "ParamSpec",
    "SearchSpace",
    "apply_params",
]
