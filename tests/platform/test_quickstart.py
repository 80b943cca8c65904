"""The README's main command, smoke-sized, on the real local stack with real ELPV images."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.stack, pytest.mark.heavy]

REPO = Path(__file__).resolve().parents[2]


def test_quickstart_smoke_end_to_end(live_stack):
    proc = subprocess.run(
        [sys.executable, "jobs/quickstart.py", "--smoke-test", "--seeds", "2"],
        cwd=REPO,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=2400,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    state = Path(os.environ["SSN_STACK_DIR"])
    summary = json.loads((state / "reports" / "quickstart.json").read_text())
    assert summary["served"] == 6
    assert proc.stdout.count("6/7 inspect") == 6  # the endpoint answered every held-back test image
    # --seeds 2: the recipe's mean +- std is printed, and promotion required it
    seeds = summary["seeds"]
    assert seeds["count"] == 2 and 0.0 <= seeds["metrics"]["image_auroc_mean"] <= 1.0
    assert "the recipe over 2 seeds: test image AUROC" in proc.stdout

    from mlflow import MlflowClient

    champion = MlflowClient().get_model_version_by_alias("ssn-elpv", "champion")
    assert champion.version == summary["model_version"]
    assert champion.tags["threshold_method"] == "false_alarm"  # the quickstart budgets false alarms (10 %)
    decision_runs = MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("ssn-elpv-promotions").experiment_id],
        filter_string=f"tags.`ssn.candidate_version` = '{summary['model_version']}'",
    )
    assert decision_runs[0].data.params["seeds_evaluation_run_id"] == seeds["evaluation_run_id"]
    # one line per step: no replica request logs, no artifact progress bars, no Ray/Serve/MLflow chatter
    output = proc.stdout + proc.stderr
    assert "ServeReplica" not in proc.stdout and "Downloading artifacts" not in output
    for chatter in ("Connecting to existing Ray cluster", "Started Serve", "View run"):
        assert chatter not in output, chatter
    report = Path(summary["report"]).read_text()
    for name in ("Image AUROC", "AP (detection)", "F1-max"):
        assert name in report
    assert "data:image/png;base64" in report
    for label in ("MLflow UI", "Ray dashboard", "Endpoint API docs", "Report"):
        assert label in proc.stdout
