"""Tuned settings: the document a search writes and `jobs/train.py --tuned` (and `jobs/evaluate.py --tuned`) read.

A search (ssn_platform.tuning) writes the settings of its chosen trial, or the job's own when the best trial did not
beat the baseline (`decision: kept_defaults`, see ssn_platform.tuned), as a YAML document of schema
``ssn-tuned-settings``: the chosen values, the metric and its value, the decision, the study and trial they came
from, and `overrides`, the ``key=value`` lines that apply them to a train job. The document is stored at
``s3://<dataset bucket>/tuned/<product>/<backbone>.yaml`` (a copy per search under ``<backbone>/<search>.yaml``) and
as the artifact ``tuned_settings.yaml`` of the search's parent run. `load_tuned_job_config` applies one beneath the
user's overrides.

Neither Ray nor Optuna is imported here, so the train and evaluate jobs read tuned settings without loading the
search.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from supersimplenet.config import ConfigError
from ssn_platform.jobconfig import JobConfig, load_job_config, parse_overrides
from ssn_platform.s3keys import parse_s3_uri
from ssn_platform.search_space import BACKBONE_KEY, LR_SCALE_KEY, SearchSpace, apply_params
from ssn_platform.storage import S3Settings, get_bytes, make_client, put_bytes
from ssn_platform.tuned import Decision

TUNED_PREFIX = "tuned"
TUNED_SCHEMA = "ssn-tuned-settings"


def tuned_settings_document(
    job: JobConfig,
    space: SearchSpace,
    best,
    *,
    metric: str,
    mode: str,
    study_name: str,
    validation: str,
    search_name: str,
    parent_run_id: str,
    best_run_id: str | None,
    decision: Decision | None = None,
) -> dict[str, Any]:
    """The settings of `best` (a trial or tuned.Chosen: the best trial's or, kept_defaults, the baseline's)."""
    tuned = apply_params(job, best.params, space.fixed)
    overrides = {**{k: v for k, v in space.fixed.items()}, **dict(best.params)}
    if LR_SCALE_KEY in overrides:
        overrides.pop(LR_SCALE_KEY)
        overrides["train.lr_adaptor"] = tuned.train.lr_adaptor
        overrides["train.lr_heads"] = tuned.train.lr_heads
    return {
        "schema": TUNED_SCHEMA,
        "product": job.product,
        "backbone": tuned.model.backbone,  # the chosen trial's, when the space searched over backbones
        "noise_std": tuned.model.noise_std,
        "noise_std_mode": tuned.model.noise_std_mode,
        "perlin_threshold": tuned.model.perlin_threshold,
        "lr_adaptor": tuned.train.lr_adaptor,
        "lr_heads": tuned.train.lr_heads,
        "metric": metric,
        "mode": mode,
        "value": None if best.value is None else float(best.value),
        **(decision.document_fields() if decision is not None else {}),
        "study": study_name,
        "study_trial": best.number,
        "validation": validation,
        "epochs": job.train.epochs,
        "image_size": list(job.model.image_size),
        "seed": job.train.seed,
        "dataset": job.dataset,
        "search": search_name,
        "parent_run_id": parent_run_id,
        "trial_run_id": best_run_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "overrides": [f"{k}={_yaml_scalar(v)}" for k, v in overrides.items()],
    }


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def tuned_settings_uri(job: JobConfig, backbone: str | None = None) -> str:
    bucket, _ = parse_s3_uri(job.dataset)
    return f"s3://{bucket}/{TUNED_PREFIX}/{job.product}/{backbone or job.model.backbone}.yaml"


def write_tuned_settings(job: JobConfig, document: Mapping[str, Any]) -> str:
    """Writes the settings to s3://<bucket>/tuned/<product>/<backbone>.yaml (and a copy per search under
    <backbone>/<search>.yaml). Returns the main URI."""
    uri = tuned_settings_uri(job, document.get("backbone"))
    bucket, key = parse_s3_uri(uri)
    body = yaml.safe_dump(dict(document), sort_keys=False).encode()
    client = make_client(S3Settings.from_env())
    put_bytes(client, bucket, key, body, content_type="application/x-yaml")
    history = key[: -len(".yaml")] + f"/{document['search']}.yaml"
    put_bytes(client, bucket, history, body, content_type="application/x-yaml")
    return uri


def read_tuned_settings(path_or_uri: str | Path) -> dict[str, Any]:
    text: str
    if str(path_or_uri).startswith("s3://"):
        bucket, key = parse_s3_uri(str(path_or_uri))
        text = get_bytes(make_client(S3Settings.from_env()), bucket, key).decode()
    else:
        path = Path(path_or_uri)
        if not path.is_file():
            raise ConfigError(f"tuned settings file not found: {path}")
        text = path.read_text()
    document = yaml.safe_load(text)
    if not isinstance(document, Mapping) or document.get("schema") != TUNED_SCHEMA:
        raise ConfigError(f"{path_or_uri}: not a tuned settings document (schema {TUNED_SCHEMA})")
    return dict(document)


def tuned_settings_overrides(
    path_or_uri: str | Path, *, backbone: str | None = None, product: str | None = None
) -> list[str]:
    """`key=value` overrides that apply tuned settings to a train job (put user overrides after them).

    With `backbone` / `product`, refuses settings tuned for another backbone or product (sigma does not transfer
    across backbones), unless the settings choose the backbone themselves (a search over backbones: their
    overrides set `model.backbone`). Example (what `load_tuned_job_config` does):
    `load_job_config(cfg, [*tuned_settings_overrides(uri, backbone=...), *user])`.
    """
    document = read_tuned_settings(path_or_uri)
    chooses_backbone = any(str(o).startswith(f"{BACKBONE_KEY}=") for o in document.get("overrides") or [])
    if backbone is not None and document.get("backbone") != backbone and not chooses_backbone:
        raise ConfigError(f"{path_or_uri}: tuned for backbone {document.get('backbone')!r}, the job uses {backbone!r}")
    if product is not None and document.get("product") != product:
        raise ConfigError(f"{path_or_uri}: tuned for product {document.get('product')!r}, the job is {product!r}")
    overrides = [str(o) for o in document.get("overrides") or []]
    parse_overrides(overrides)  # validates the form
    return overrides


def load_tuned_job_config(config: str | Path, overrides: Sequence[str], tuned: str | Path | None) -> JobConfig:
    """The job of `config` and `overrides`, with the tuned settings `tuned` (URI or file, checked against the job's
    backbone and product) applied beneath the overrides: what `jobs/train.py --tuned` and `jobs/evaluate.py --tuned`
    train."""
    if tuned:
        base = load_job_config(config, overrides)
        overrides = [*tuned_settings_overrides(tuned, backbone=base.model.backbone, product=base.product), *overrides]
    return load_job_config(config, overrides)


__all__ = [
    "TUNED_SCHEMA",
    "load_tuned_job_config",
    "read_tuned_settings",
    "tuned_settings_document",
    "tuned_settings_overrides",
    "tuned_settings_uri",
    "write_tuned_settings",
]
