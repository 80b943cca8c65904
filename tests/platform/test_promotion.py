"""Champion/challenger promotion and rollback on the real local stack (MLflow registry, S3 data)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.stack, pytest.mark.heavy]

REPO = Path(__file__).resolve().parents[2]
METRIC = "pixel_auroc"  # image-level metrics of untrained heads on the weld seams are near chance
FLOOR = 0.3  # both models pass it: the worse one is refused for the margin, not the floor


@pytest.fixture(scope="module")
def setup(weld_val_dataset, random_head_model, register_version):
    """Product with v1 (better), v2 (worse) evaluated on the test split, and v3 never evaluated; none calibrated."""
    from ssn_platform.datasets import DatasetReader
    from ssn_platform.promotion import evaluate_model

    uri = weld_val_dataset
    root, samples = DatasetReader(uri).materialize()
    test = [s for s in samples if s.split == "test"]
    good, bad = random_head_model(0, head_scale=None), random_head_model(1, head_scale=None)
    good_metrics, bad_metrics = evaluate_model(good, root, test), evaluate_model(bad, root, test)
    assert bad_metrics[METRIC] >= FLOOR and good_metrics[METRIC] > bad_metrics[METRIC] + 0.05, (
        f"test premise: seed 0 must beat seed 1 clearly on {METRIC}, both above {FLOOR}: "
        f"{good_metrics[METRIC]} vs {bad_metrics[METRIC]}"
    )
    product = f"weld-promo-{uuid.uuid4().hex[:6]}"
    versions = {
        "good": register_version(product, uri, good, good_metrics),
        "bad": register_version(product, uri, bad, bad_metrics),
        "unevaluated": register_version(product, uri, good, {}),
    }
    return {
        "product": product,
        "name": f"ssn-{product}",
        "uri": uri,
        "versions": versions,
        "metrics": {"good": good_metrics, "bad": bad_metrics},
    }


def _aliases(name: str) -> dict[str, str]:
    from mlflow import MlflowClient

    return {k: str(v) for k, v in (MlflowClient().get_registered_model(name).aliases or {}).items()}


def _decision_runs(product: str, candidate: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name(f"ssn-{product}-promotions")
    assert experiment is not None, "no promotions experiment"
    return client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`ssn.candidate_version` = '{candidate}'",
        order_by=["attributes.start_time DESC"],
    )


def test_uncalibrated_or_unevaluated_versions_are_never_promoted(setup):
    from mlflow import MlflowClient

    from ssn_platform.promotion import promote
    from ssn_platform.thresholds import calibrate_version

    product, name, versions = setup["product"], setup["name"], setup["versions"]
    decision = promote(product, versions["good"], metric=METRIC, floor=FLOOR)
    assert not decision.promoted and "no calibrated threshold" in decision.reason
    assert not decision.candidate_metrics  # refused before any evaluation
    assert "champion" not in _aliases(name)
    tags = MlflowClient().get_model_version(name, versions["good"]).tags
    assert tags["promotion_decision"] == "refused" and "threshold" in tags["promotion_reason"]
    runs = _decision_runs(product, versions["good"])
    assert runs and runs[0].data.tags["ssn.decision"] == "refused"

    calibrate_version(product, versions["unevaluated"])
    decision = promote(product, versions["unevaluated"], metric=METRIC, floor=FLOOR)
    assert not decision.promoted and "never evaluated" in decision.reason
    assert "champion" not in _aliases(name)


def test_promote_refuse_a_worse_version_and_roll_back(setup):
    from mlflow import MlflowClient

    from ssn_platform.promotion import PromotionError, promote, rollback
    from ssn_platform.thresholds import calibrate_version

    product, name, versions = setup["product"], setup["name"], setup["versions"]
    good, bad = versions["good"], versions["bad"]
    client = MlflowClient()
    calibrate_version(product, good)
    calibrate_version(product, bad)
    client.set_registered_model_tag(name, "primary_metric", METRIC)  # the product's metric, read by promote

    first = promote(product, good, floor=FLOOR)
    assert first.metric == METRIC
    assert first.promoted, first.reason
    assert first.champion_version is None and "first champion" in first.reason
    assert first.candidate_metrics[METRIC] == pytest.approx(setup["metrics"]["good"][METRIC], abs=1e-9)
    assert _aliases(name) == {"champion": good}
    run = client.get_run(first.run_id)
    assert run.data.metrics[f"candidate_{METRIC}"] == pytest.approx(first.candidate_metrics[METRIC])
    assert run.data.tags["ssn.decision"] == "promoted"
    import mlflow

    recorded = json.loads(mlflow.artifacts.load_text(f"runs:/{first.run_id}/decision.json"))
    assert recorded["promoted"] is True and recorded["candidate_version"] == good

    worse = promote(product, bad, floor=FLOOR)
    assert not worse.promoted and "worse than champion" in worse.reason
    assert worse.champion_version == good
    # the same code on the same data: the champion's metrics now equal its own as a candidate
    assert worse.champion_metrics[METRIC] == pytest.approx(first.candidate_metrics[METRIC], abs=1e-9)
    assert worse.candidate_metrics[METRIC] == pytest.approx(setup["metrics"]["bad"][METRIC], abs=1e-9)
    assert _aliases(name) == {"champion": good}
    run = client.get_run(worse.run_id)
    assert {f"candidate_{METRIC}", f"champion_{METRIC}"} <= set(run.data.metrics)
    assert client.get_model_version(name, bad).tags["promotion_decision"] == "refused"

    floor = promote(product, bad, margin=1.0, floor=0.99)
    assert not floor.promoted and "below the floor" in floor.reason

    forced = promote(product, bad, margin=1.0, floor=0.0)  # a lenient policy lets it through
    assert forced.promoted, forced.reason
    assert _aliases(name) == {"champion": bad, "previous": good}

    back = rollback(product)
    assert (back.champion_version, back.previous_version) == (good, bad)
    assert _aliases(name) == {"champion": good, "previous": bad}

    again = promote(product, good, floor=FLOOR)
    assert not again.promoted and "already the champion" in again.reason

    client.create_registered_model(f"ssn-{product}-solo")
    with pytest.raises(PromotionError, match="no 'previous' alias"):
        rollback(f"{product}-solo")


def test_promote_job(setup):
    from ssn_platform.services import check_mlflow

    check_mlflow()
    product, name, versions = setup["product"], setup["name"], setup["versions"]
    env = os.environ.copy()
    before = _aliases(name)
    assert before.get("champion") == versions["good"], "runs after test_promote_refuse_a_worse_version_and_roll_back"

    refused = subprocess.run(
        [
            sys.executable,
            str(REPO / "jobs" / "promote.py"),
            "--product",
            product,
            "--version",
            versions["bad"],
            "--metric",
            METRIC,
            "--floor",
            str(FLOOR),
            "--margin",
            "0.0",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env=env,
    )
    assert refused.returncode == 1, refused.stderr[-3000:]
    decision = json.loads(refused.stdout.strip().splitlines()[-1])
    assert decision["promoted"] is False and "worse" in decision["reason"]
    assert _aliases(name) == before

    rolled = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "promote.py"), "--product", product, "--rollback"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=env,
    )
    assert rolled.returncode == 0, rolled.stderr[-3000:]
    assert _aliases(name) == {"champion": versions["bad"], "previous": versions["good"]}

    usage = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "promote.py"), "--product", product],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=env,
    )
    assert usage.returncode == 2 and "--version" in usage.stderr


CRASH_AFTER_WRITES = """
    import os, sys
    from mlflow import MlflowClient
    from ssn_platform import promotion
    writes = 0
    def counted(method):
        def call(self, *args, **kwargs):
            global writes
            result = method(self, *args, **kwargs)
            writes += 1
            if writes == int(os.environ["CRASH_AFTER"]):
                os._exit(17)  # the process dies between two registry writes, without any cleanup
            return result
        return call
    MlflowClient.set_registered_model_alias = counted(MlflowClient.set_registered_model_alias)
    MlflowClient.delete_registered_model_alias = counted(MlflowClient.delete_registered_model_alias)
    promotion.rollback(sys.argv[1])
"""


@pytest.mark.parametrize("crash_after", [1, 2, 3])
def test_a_rollback_killed_between_alias_writes_is_finished_by_the_next_call(setup, crash_after):
    from mlflow import MlflowClient

    from ssn_platform.aliases import repair_aliases
    from ssn_platform.promotion import rollback

    product, name, versions = setup["product"], setup["name"], setup["versions"]
    client = MlflowClient()
    v_old, v_new = versions["good"], versions["bad"]
    client.set_registered_model_alias(name, "champion", v_new)
    client.set_registered_model_alias(name, "previous", v_old)

    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CRASH_AFTER_WRITES), product],
        env={**os.environ, "CRASH_AFTER": str(crash_after)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 17, proc.stderr[-3000:]
    crashed = _aliases(name)
    assert "champion" in crashed  # a reader never finds the product without a champion
    assert crashed.get("demoting") == v_new  # the move is recorded until it is finished

    assert repair_aliases(client, name) is not None
    repaired = _aliases(name)
    before, after = {"champion": v_new, "previous": v_old}, {"champion": v_old, "previous": v_new}
    assert repaired == (before if crash_after == 1 else after), (crash_after, crashed, repaired)
    # and the product works on: a rollback now swaps again, leaving nothing behind
    rollback(product)
    assert _aliases(name) == (after if crash_after == 1 else before)
