"""Champion/challenger promotion of registered SuperSimpleNet versions, and rollback.

`promote(product, version)`:

1. Preconditions (refused with a reason, nothing evaluated): the version exists, carries a calibrated threshold
   (tag ``threshold``, see `ssn_platform.thresholds`), was evaluated by its training job (``test_*`` metric
   tags), and is not already the champion.
2. The candidate and the current champion (alias ``champion``; may not exist) are evaluated by the same code on the
   same data: the evaluation split (default ``test``) of the candidate's dataset (or ``data_uri``), with
   `supersimplenet.train.predict` and `supersimplenet.metrics.compute_metrics`, the code of the training job's test
   metrics.
   With ``require_seeds=N`` the candidate's recipe (tag ``ssn.recipe`` of its training run,
   `ssn_platform.lineage.recipe_fingerprint`) must also have a finished multi-seed evaluation over at least N seeds
   (`jobs/evaluate.py --seeds ...`, same tag), and the floor applies to that evaluation's mean as well: one lucky
   seed cannot make a champion of a recipe that is weak on average.
3. Promoted when ``candidate >= champion - margin`` and ``candidate >= floor`` on the product's primary metric
   (``metric`` argument, else the registered model's tag ``primary_metric``, else ``image_auroc``; all metrics
   are higher-is-better). ``champion`` moves in one registry call (`set_registered_model_alias`), so a reader
   never sees a product without a champion, and the old champion becomes ``previous``
   (`ssn_platform.aliases.move_champion`).
4. Every decision (promoted or refused, with both metric sets and the reason) is recorded as an MLflow run in
   experiment ``ssn-<product>-promotions`` (params, ``candidate_*``/``champion_*`` metrics, ``decision.json``)
   and as ``promotion_*`` tags on the candidate version.

`rollback(product)`: ``champion`` <- ``previous`` and ``previous`` <- the demoted version; refused without a
``previous`` alias. Also recorded in the promotions experiment.

Crash safety: the aliases move through a transient alias ``demoting``, and the next promote or rollback of the
product first finishes a move that a crash interrupted (`ssn_platform.aliases`), so after a crash the aliases are
either as before or as after the move.

Two promotions of one product must not run at the same time (the registry has no compare-and-set on aliases).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

from supersimplenet.backbones import get_preset
from supersimplenet.loading import DefectDataset
from supersimplenet.metrics import compute_metrics
from supersimplenet.train import eval_loader, predict
from ssn_platform.aliases import move_champion, read_aliases, repair_aliases
from ssn_platform.datasets import materialize_split
from ssn_platform.names import CHAMPION, PREVIOUS, promotions_experiment
from ssn_platform.registry import load_model, registered_model_name
from ssn_platform.services import check_mlflow, experiment_id
from ssn_platform.thresholds import rates_at, threshold_from_tags

log = logging.getLogger(__name__)

DEFAULT_METRIC = "image_auroc"
METRIC_TAG = "primary_metric"  # registered-model tag naming a product's primary metric
METRICS = ("image_auroc", "ap_det", "f1_max", "pixel_auroc", "ap_loc", "aupro", "pixel_f1_max")


class PromotionError(RuntimeError):
    """A promotion or rollback that cannot run at all (unknown version, nothing to roll back to)."""


@dataclass
class Decision:
    """The outcome of `promote` (also what is recorded)."""

    product: str
    registered_model: str
    candidate_version: str
    champion_version: str | None
    metric: str
    margin: float
    floor: float
    promoted: bool
    reason: str
    candidate_metrics: dict[str, float] = field(default_factory=dict)
    champion_metrics: dict[str, float] = field(default_factory=dict)
    data_uri: str | None = None
    dataset_version: str | None = None
    split: str | None = None
    n_images: int = 0
    decided_at: str = ""
    run_id: str | None = None
    require_seeds: int = 0
    seeds_evaluation: dict[str, Any] | None = None  # {run_id, seeds, mean, std} of the recipe's evaluation

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Rollback:
    product: str
    registered_model: str
    champion_version: str  # the restored version
    previous_version: str  # the demoted version
    run_id: str | None = None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _client():
    return MlflowClient()


def primary_metric(product: str, metric: str | None = None) -> str:
    """The metric that decides promotions of `product`: `metric`, the model's ``primary_metric`` tag, or the default."""
    if metric is None:
        try:
            metric = _client().get_registered_model(registered_model_name(product)).tags.get(METRIC_TAG)
        except Exception:  # noqa: BLE001 - a missing model is reported by the caller
            metric = None
    metric = metric or DEFAULT_METRIC
    if metric not in METRICS:
        raise PromotionError(f"unknown metric {metric!r}; use one of {METRICS}")
    return metric


# ---------------------------------------------------------------------------------------------------------
# Evaluation: one code path for candidate and champion
# ---------------------------------------------------------------------------------------------------------
def evaluate_model(
    model, root: Path, samples: list, *, threshold: float | None = None, batch_size: int = 16
) -> dict[str, float]:
    """compute_metrics on `samples` (plus the rates at `threshold` when given), as the training job's test step."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = get_preset(model.config.backbone)
    dataset = DefectDataset(
        root=root, samples=samples, image_size=model.config.image_size, mean=preset.mean, std=preset.std
    )
    predictions = predict(model.to(device), eval_loader(dataset, batch_size=batch_size), device=device)
    metrics = compute_metrics(
        scores=predictions.scores, labels=predictions.labels, maps=predictions.maps, masks=predictions.masks
    )
    if threshold is not None:
        rates = rates_at(threshold, predictions.scores, predictions.labels)
        metrics.update({f"{k}_at_threshold": v for k, v in rates.items()})
    return {k: float(v) for k, v in metrics.items()}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def find_seed_evaluation(client, run_id: str, metric: str, require_seeds: int) -> tuple[dict[str, Any] | None, str]:
    """The newest finished multi-seed evaluation of the recipe that trained run `run_id` over at least
    `require_seeds` seeds that reports ``<metric>_mean``: ({run_id, seeds, mean, std}, "") or (None, why not)."""
    run = client.get_run(run_id)
    recipe = run.data.tags.get("ssn.recipe")
    if not recipe:
        return None, (
            f"its training run {run_id} has no recipe tag (ssn.recipe; trained before recipes were "
            "recorded), so no multi-seed evaluation can be matched to it"
        )
    found = client.search_runs(
        [run.info.experiment_id],
        order_by=["attributes.start_time DESC"],
        max_results=200,
        filter_string=f"tags.`ssn.recipe` = '{recipe}' and tags.`ssn.evaluate.mode` = 'seeds' "
        "and attributes.status = 'FINISHED'",
    )
    counts = []
    for evaluation in found:
        seeds = evaluation.data.tags.get("ssn.evaluate.seeds", "").split()
        counts.append(len(seeds))
        mean = evaluation.data.metrics.get(f"{metric}_mean")
        if len(seeds) >= require_seeds and _finite(mean):
            return {
                "run_id": evaluation.info.run_id,
                "seeds": [int(x) for x in seeds],
                "mean": float(mean),
                "std": float(evaluation.data.metrics.get(f"{metric}_std", math.nan)),
            }, ""
    seen = f" (found evaluations over {sorted(set(counts))} seeds)" if counts else ""
    return None, (
        f"its recipe {recipe} has no finished multi-seed evaluation over >= {require_seeds} seeds reporting "
        f"{metric}{seen}; run jobs/evaluate.py with the version's config and --seeds (at least "
        f"{require_seeds})"
    )


# ---------------------------------------------------------------------------------------------------------
# Recording
# ---------------------------------------------------------------------------------------------------------
def _record(client, decision: Decision) -> str:
    run = client.create_run(
        experiment_id(client, promotions_experiment(decision.product)),
        run_name=f"v{decision.candidate_version}-{'promoted' if decision.promoted else 'refused'}",
        tags={
            "ssn.product": decision.product,
            "ssn.decision": _decision_word(decision),
            "ssn.reason": decision.reason[:4900],
            "ssn.candidate_version": decision.candidate_version,
            "ssn.champion_version": decision.champion_version or "",
        },
    )
    run_id = run.info.run_id
    params = {
        "product": decision.product,
        "registered_model": decision.registered_model,
        "candidate_version": decision.candidate_version,
        "champion_version": decision.champion_version or "none",
        "metric": decision.metric,
        "margin": decision.margin,
        "floor": decision.floor,
        "data_uri": decision.data_uri or "",
        "dataset_version": decision.dataset_version or "",
        "split": decision.split or "",
        "n_images": decision.n_images,
    }
    now = int(_dt.datetime.now().timestamp() * 1000)
    metrics = [Metric(f"candidate_{k}", v, now, 0) for k, v in decision.candidate_metrics.items() if _finite(v)]
    metrics += [Metric(f"champion_{k}", v, now, 0) for k, v in decision.champion_metrics.items() if _finite(v)]
    metrics.append(Metric("promoted", 1.0 if decision.promoted else 0.0, now, 0))
    if decision.seeds_evaluation:
        metrics += [
            Metric(f"seeds_{decision.metric}_{k}", decision.seeds_evaluation[k], now, 0)
            for k in ("mean", "std")
            if _finite(decision.seeds_evaluation[k])
        ]
        params["seeds_evaluation_run_id"] = decision.seeds_evaluation["run_id"]
    params["require_seeds"] = decision.require_seeds
    client.log_batch(run_id, metrics=metrics, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    decision.run_id = run_id
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "decision.json"
        path.write_text(json.dumps(decision.to_dict(), indent=2, default=_json_default))
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, status="FINISHED")
    return run_id


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


def _decision_word(decision: Decision) -> str:
    return "promoted" if decision.promoted else "refused"


def _tag_candidate(client, decision: Decision) -> None:
    tags = {
        "promotion_decision": _decision_word(decision),
        "promotion_reason": decision.reason[:4900],
        "promotion_run_id": decision.run_id or "",
        "promotion_metric": decision.metric,
        "promotion_decided_at": decision.decided_at,
        "promotion_against": decision.champion_version or "none",
    }
    if _finite(decision.candidate_metrics.get(decision.metric)):
        tags[f"promotion_{decision.metric}"] = f"{decision.candidate_metrics[decision.metric]:.6f}"
    for key, value in tags.items():
        client.set_model_version_tag(decision.registered_model, decision.candidate_version, key, value)


def _finish(client, decision: Decision) -> Decision:
    decision.decided_at = decision.decided_at or _now()
    _record(client, decision)
    _tag_candidate(client, decision)
    log.info(
        "%s v%s: %s (%s)",
        decision.registered_model,
        decision.candidate_version,
        _decision_word(decision),
        decision.reason,
    )
    return decision


# ---------------------------------------------------------------------------------------------------------
# Promotion and rollback
# ---------------------------------------------------------------------------------------------------------
def promote(
    product: str,
    version: str | int,
    *,
    margin: float = 0.005,
    floor: float = 0.6,
    metric: str | None = None,
    data_uri: str | None = None,
    split: str = "test",
    batch_size: int = 16,
    require_seeds: int = 0,
) -> Decision:
    """Evaluates candidate `version` against the champion and moves the ``champion`` alias when it qualifies.

    `require_seeds` > 0 also requires a multi-seed evaluation of the candidate's recipe over that many seeds whose
    mean clears `floor` (`find_seed_evaluation`).

    Returns the recorded `Decision` (``promoted`` False with a ``reason`` when refused). Raises PromotionError
    when the version does not exist, the data has no `split`, or the metric is unknown.
    """
    if margin < 0:
        raise PromotionError(f"margin must be >= 0, got {margin}")
    if require_seeds < 0:
        raise PromotionError(f"require_seeds must be >= 0, got {require_seeds}")
    check_mlflow()
    client = _client()
    name, version = registered_model_name(product), str(version)
    try:
        candidate = client.get_model_version(name, version)
    except MlflowException as error:
        raise PromotionError(f"{name} version {version} does not exist: {error.message}") from None
    metric = primary_metric(product, metric)
    repair_aliases(client, name)
    champion = read_aliases(client, name).get(CHAMPION)
    decision = Decision(
        product=product,
        registered_model=name,
        candidate_version=version,
        champion_version=champion,
        metric=metric,
        margin=float(margin),
        floor=float(floor),
        promoted=False,
        reason="",
        split=split,
        require_seeds=int(require_seeds),
    )
    refusal = _refusal_before_evaluation(client, decision, candidate)
    if refusal:
        decision.reason = refusal
        return _finish(client, decision)
    _evaluate_candidate_and_champion(client, decision, candidate, data_uri=data_uri, batch_size=batch_size)
    _judge(decision)
    if decision.promoted:
        current = read_aliases(client, name).get(CHAMPION)
        if current != champion:
            decision.promoted = False
            decision.reason = f"the champion moved from v{champion} to v{current} during the evaluation; promote again"
        else:
            move_champion(client, name, version, champion)
    return _finish(client, decision)


def _refusal_before_evaluation(client, decision: Decision, candidate) -> str:
    """Why the candidate is refused without evaluating anything ("" when it may be evaluated): no calibrated
    threshold, no test evaluation, already the champion, or (with require_seeds) no multi-seed evaluation whose
    mean clears the floor (that evaluation is recorded in the decision)."""
    version, product, metric = decision.candidate_version, decision.product, decision.metric
    if threshold_from_tags(candidate.tags) is None:
        return (
            f"version {version} has no calibrated threshold (tag 'threshold'); run "
            f"jobs/calibrate.py --product {product} --version {version} first"
        )
    if not any(key.startswith("test_") for key in candidate.tags):
        return (
            f"version {version} was never evaluated (no 'test_*' metric tags from its training job); "
            "only versions with a test evaluation can be promoted"
        )
    if decision.champion_version == version:
        return f"version {version} is already the champion"
    if decision.require_seeds:
        decision.seeds_evaluation, why = find_seed_evaluation(client, candidate.run_id, metric, decision.require_seeds)
        seeds = decision.seeds_evaluation
        if seeds is None:
            return f"version {version}: {why}"
        if seeds["mean"] < decision.floor:
            return (
                f"the multi-seed mean of version {version}'s recipe, {metric} {seeds['mean']:.4f} +- "
                f"{seeds['std']:.4f} over {len(seeds['seeds'])} seeds (evaluation run {seeds['run_id']}), is "
                f"below the floor {decision.floor:.4f}"
            )
    return ""


def _evaluate_candidate_and_champion(
    client, decision: Decision, candidate, *, data_uri: str | None, batch_size: int
) -> None:
    """Scores the candidate and the champion (if any) with the same code on the same images: the `split` of
    `data_uri` (default: the candidate's dataset tag), each at its own calibrated threshold."""
    name, version, split = decision.registered_model, decision.candidate_version, decision.split
    uri = data_uri or candidate.tags.get("dataset")
    if not uri:
        raise PromotionError(f"{name} version {version} names no dataset (tag 'dataset'); pass data_uri")
    reader, root, chosen = materialize_split(uri, split, "pass data_uri with a dataset that has one", PromotionError)
    decision.data_uri, decision.dataset_version, decision.n_images = uri, reader.version, len(chosen)
    model, _ = load_model(f"models:/{name}/{version}")
    decision.candidate_metrics = evaluate_model(
        model, root, chosen, threshold=threshold_from_tags(candidate.tags), batch_size=batch_size
    )
    del model
    if decision.champion_version is not None:
        champion_tags = client.get_model_version(name, decision.champion_version).tags
        model, _ = load_model(f"models:/{name}/{decision.champion_version}")
        decision.champion_metrics = evaluate_model(
            model, root, chosen, threshold=threshold_from_tags(champion_tags), batch_size=batch_size
        )
        del model


def _judge(decision: Decision) -> None:
    """Sets `promoted` and the `reason`: the candidate's metric is defined, clears the floor and is no worse than
    the champion's by more than the margin (an undefined champion metric does not block)."""
    metric, floor, margin, champion = decision.metric, decision.floor, decision.margin, decision.champion_version
    ours = decision.candidate_metrics.get(metric, math.nan)
    theirs = decision.champion_metrics.get(metric, math.nan) if champion is not None else None
    where = f"on the {decision.split} split of {decision.data_uri} ({decision.n_images} images)"
    if not _finite(ours):
        decision.reason = f"candidate {metric} is undefined {where}"
    elif ours < floor:
        decision.reason = f"candidate {metric} {ours:.4f} is below the floor {floor:.4f} {where}"
    elif theirs is not None and _finite(theirs) and ours < theirs - margin:
        decision.reason = (
            f"candidate {metric} {ours:.4f} is worse than champion v{champion} {theirs:.4f} by more "
            f"than the margin {margin:.4f} {where}"
        )
    else:
        decision.promoted = True
        if theirs is None:
            decision.reason = f"first champion: {metric} {ours:.4f} >= floor {floor:.4f} {where}"
        elif not _finite(theirs):
            decision.reason = f"champion v{champion} {metric} is undefined {where}; candidate {ours:.4f} >= floor"
        else:
            decision.reason = (
                f"candidate {metric} {ours:.4f} >= champion v{champion} {theirs:.4f} - margin "
                f"{margin:.4f}, and >= floor {floor:.4f} {where}"
            )


def rollback(product: str) -> Rollback:
    """``champion`` <- ``previous``, ``previous`` <- the demoted champion. Raises PromotionError without a previous."""
    check_mlflow()
    client = _client()
    name = registered_model_name(product)
    try:
        repair_aliases(client, name)
        aliases = read_aliases(client, name)
    except MlflowException as error:
        raise PromotionError(f"{name} does not exist: {error.message}") from None
    champion, previous = aliases.get(CHAMPION), aliases.get(PREVIOUS)
    if previous is None:
        raise PromotionError(f"{name} has no '{PREVIOUS}' alias: nothing to roll back to")
    if previous == champion:
        raise PromotionError(f"{name}: '{PREVIOUS}' is the champion (v{champion}) already: nothing to roll back to")
    if champion is not None:
        move_champion(client, name, previous, champion)
    else:
        client.set_registered_model_alias(name, CHAMPION, previous)
        client.delete_registered_model_alias(name, PREVIOUS)
    result = Rollback(
        product=product, registered_model=name, champion_version=previous, previous_version=champion or ""
    )
    run = client.create_run(
        experiment_id(client, promotions_experiment(product)),
        run_name=f"rollback-to-v{previous}",
        tags={
            "ssn.product": product,
            "ssn.decision": "rollback",
            "ssn.reason": f"rollback from v{champion} to v{previous}",
        },
    )
    client.log_batch(
        run.info.run_id, params=[Param("restored_version", previous), Param("demoted_version", champion or "none")]
    )
    client.set_terminated(run.info.run_id, status="FINISHED")
    result.run_id = run.info.run_id
    if champion is not None:
        client.set_model_version_tag(name, champion, "rolled_back_at", _now())
    return result
