"""The quickstart: the whole platform on one machine with real images (ELPV solar cells).

Steps (each prints where it is): ingest ELPV into S3 -> sigma/threshold search and a 2-worker DDP training job, both
through `ray job submit` -> calibrate the threshold -> promote to champion -> deploy the Serve endpoint -> send the
held-back test images -> write the HTML report and print the URLs. Re-running is safe: the dataset is not uploaded
again, the search extends its study, and a new model version is only promoted if it is not worse.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supersimplenet.elpv import export_elpv
from supersimplenet.layouts import read_layout
from supersimplenet.memory import seed_free

from ssn_platform import promotion, thresholds
from ssn_platform.apikeys import client_headers
from ssn_platform.ingest import ingest
from ssn_platform.report import write_report
from ssn_platform.services import PlatformError, worker_env
from ssn_platform.stackenv import apply_stack_env, repo_root
from ssn_platform.tuned_settings import load_tuned_job_config

PRODUCT = "elpv"


def say(step: str, message: str) -> None:
    print(f"[quickstart {time.strftime('%H:%M:%S')}] {step}: {message}", flush=True)


@dataclass(frozen=True)
class QuickstartSettings:
    config: str = "jobs/configs/elpv.yaml"
    split_file: str = "jobs/splits/elpv.txt"
    trials: int = 4
    trial_epochs: int = 2
    epochs: int | None = None  # None: the config's (jobs/configs/elpv.yaml)
    workers: int = 2
    held_back: int = 12
    # The search runs at this size (4x cheaper than the 256x256 training; sigma is relative to the feature scale,
    # so it carries over), None: the config's size.
    search_image_size: tuple[int, int] | None = (128, 128)
    # A line budgets false alarms: flag the 10 % most unusual normal cells. (With defective cells half of the val
    # split, the F1-optimal threshold of a model this short-trained flags nearly everything.)
    threshold_method: str = "false_alarm"
    false_alarm_rate: float = 0.1
    # Promotion floor on image AUROC: chance level for the quickstart; production products set their own.
    floor: float = 0.5
    # >= 2: also train the recipe (config + tuned settings) over this many seeds (`jobs/evaluate.py`), print their
    # test mean +- std beside the registered model's own figure, and promote only on that mean (require_seeds).
    seeds: int = 0
    overrides: tuple[str, ...] = field(default_factory=tuple)


def _submit(entrypoint: list[str], *, env: dict[str, str], step: str) -> dict[str, Any]:
    """`ray job submit` of an entrypoint; returns the JSON summary line the job prints last."""
    runtime_env = {"env_vars": env}
    command = [
        sys.executable,
        "-m",
        "ray.scripts.scripts",
        "job",
        "submit",
        "--working-dir",
        str(repo_root()),
        "--runtime-env-json",
        json.dumps(runtime_env),
        "--",
        *entrypoint,
    ]
    say(step, "ray job submit -- " + " ".join(shlex.quote(a) for a in entrypoint))
    process = subprocess.Popen(command, cwd=repo_root(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    summary = None
    tail: list[str] = []
    assert process.stdout is not None
    for line in process.stdout:
        tail = (tail + [line.rstrip()])[-40:]
        stripped = line.strip()
        if stripped.startswith("{") and stripped.endswith("}"):
            try:
                summary = json.loads(stripped)
            except json.JSONDecodeError:
                pass
    if process.wait() != 0 or summary is None:
        raise PlatformError(f"{step}: the Ray job failed (exit {process.returncode}); last lines:\n" + "\n".join(tail))
    return summary


def _post_image(url: str, path: Path) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=path.read_bytes(), method="POST", headers={"Content-Type": "image/png", **client_headers()}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def run(settings: QuickstartSettings) -> dict[str, Any]:
    """Steps 3-7 of the quickstart on the running stack: ingest, search + train (+ seeds), calibrate + promote +
    deploy, inspect held-back cells, report. Returns the summary also written to reports/quickstart.json."""
    started = time.monotonic()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one line per step, no progress bars
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # the MLflow UI link is printed at the end
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        apply_stack_env()  # the local stack's client environment, unless the caller set one up already
    state = Path(os.environ.get("SSN_STACK_DIR") or repo_root() / ".stack")

    local, dataset = _ingest(settings, state)
    # no secrets here: the stack's Ray head already holds the S3 keys, and Ray logs runtime envs
    job_env = {**worker_env(), "SSN_STACK_DIR": str(state), "SSN_GIT_SHA": os.environ.get("SSN_GIT_SHA", "")}
    job_env = {k: v for k, v in job_env.items() if v}
    search, trained, seeds = _search_train_and_seeds(settings, dataset.uri, job_env)
    if seeds is None:
        seeds = _seed_free_figure(settings, local, dataset.uri, search, trained)
    version = trained["model_version"]
    threshold, decision, url = _calibrate_promote_deploy(settings, version)
    served = _inspect_held_back(settings, local, url)

    links = {
        "MLflow UI": os.environ.get("MLFLOW_TRACKING_URI", ""),
        "Ray dashboard": os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS", ""),
        "Endpoint API docs": f"{url}/docs",
    }
    report = write_report(
        state / "reports" / f"{PRODUCT}.html",
        product=PRODUCT,
        training_run_id=trained["mlflow_run_id"],
        model_version=version,
        search_run_id=search.get("parent_run_id"),
        served=served,
        links=links,
    )
    links["Report"] = f"file://{report}"
    say("7/7 report", str(report))
    for name, link in links.items():
        print(f"  {name:18s} {link}")
    summary = {
        "product": PRODUCT,
        "dataset": dataset.uri,
        "model_version": version,
        "promoted": decision.promoted,
        "threshold": threshold.value,
        "test_metrics": trained["test_metrics"],
        "served": len(served),
        "seeds": None
        if seeds is None
        else {
            "count": settings.seeds if "evaluation_run_id" in seeds else None,
            "evaluation_run_id": seeds.get("evaluation_run_id"),
            "seed_free": "evaluation_run_id" not in seeds,
            "metrics": seeds["metrics"],
        },
        "report": str(report),
        "links": links,
        "seconds": round(time.monotonic() - started, 1),
    }
    (state / "reports" / "quickstart.json").write_text(json.dumps(summary, indent=2, default=str))
    say(
        "done",
        f"{summary['seconds']} s; MLflow login in {os.environ.get('SSN_MLFLOW_CREDENTIALS_FILE')}; the stack "
        "keeps running: `make teardown` stops it and keeps its data, `make teardown PURGE=1` deletes it too",
    )
    return summary


def _ingest(settings: QuickstartSettings, state: Path):
    """Step 3: the ELPV cells of the split file exported to the stack's data folder and ingested. Returns the
    local folder and the ingested dataset."""
    split_file = repo_root() / settings.split_file
    say("3/7 ingest", "exporting the ELPV cells named by " + settings.split_file)
    local = export_elpv(state / "data" / "elpv", split_file=split_file)
    dataset = ingest(local, product=PRODUCT, layout="mvtec", options={"split_file": str(split_file)}, progress=False)
    say("3/7 ingest", f"{dataset.uri}")
    return local, dataset


def _search_train_and_seeds(settings: QuickstartSettings, dataset_uri: str, job_env: dict[str, str]):
    """Step 4, as `ray job submit` jobs: the search, the training with its tuned settings, and (seeds >= 2) the
    same recipe over several seeds. Returns the three jobs' results (seeds: None when not run)."""
    common = [f"dataset={dataset_uri}", *settings.overrides]
    search_size = []
    if settings.search_image_size:
        search_size = ["model.image_size=[{},{}]".format(*settings.search_image_size)]
    search = _submit(
        [
            "python",
            "jobs/tune.py",
            "--config",
            settings.config,
            "--trials",
            str(settings.trials),
            f"train.epochs={settings.trial_epochs}",
            "scaling.num_workers=1",
            *search_size,
            *common,
        ],
        env=job_env,
        step="4/7 search",
    )
    best = search.get(f"best_{search.get('metric')}")
    say(
        "4/7 search",
        f"best {search.get('best_params')} -> {search.get('metric')} "
        + (f"{best:.4f}" if isinstance(best, float) else str(best)),
    )
    epochs = [] if settings.epochs is None else [f"train.epochs={settings.epochs}"]
    train_args = [
        "python",
        "jobs/train.py",
        "--config",
        settings.config,
        *epochs,
        f"scaling.num_workers={settings.workers}",
        *common,
    ]
    if search.get("tuned_settings"):
        train_args[4:4] = ["--tuned", search["tuned_settings"]]
    trained = _submit(train_args, env=job_env, step="4/7 train")
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in trained["test_metrics"].items()}
    say("4/7 train", f"ssn-{PRODUCT} version {trained['model_version']}: {json.dumps(shown)}")
    seeds = None
    if settings.seeds >= 2:
        # the same recipe as the registered run (config, tuned settings, overrides), one run per seed
        evaluate_args = ["python", "jobs/evaluate.py", *train_args[2:], "--seeds", *map(str, range(settings.seeds))]
        seeds = _submit(evaluate_args, env=job_env, step="4/7 seeds")
        mean, std = (seeds["metrics"].get(f"image_auroc_{k}") for k in ("mean", "std"))
        say(
            "4/7 seeds",
            f"the recipe over {settings.seeds} seeds: test image AUROC {mean:.3f} +- {std:.3f} "
            f"(this version: {trained['test_metrics'].get('image_auroc', float('nan')):.3f})",
        )
    return search, trained, seeds


def _seed_free_figure(
    settings: QuickstartSettings, local: Path, dataset_uri: str, search: dict[str, Any], trained: dict[str, Any]
) -> dict[str, Any] | None:
    """Step 4 without `--seeds`: when the recipe's image score is one no training seed reaches (the patch memory,
    `supersimplenet.memory.seed_free`), its figure over any number of seeds is this version's, std 0, and the
    quickstart says so instead of training more seeds; otherwise None (and `--seeds N` measures it)."""
    overrides = [f"dataset={dataset_uri}", *settings.overrides]
    job = load_tuned_job_config(repo_root() / settings.config, overrides, search.get("tuned_settings"))
    samples = read_layout(local, "mvtec", split_file=str(repo_root() / settings.split_file))
    normals = sum(1 for s in samples if s.split == "train" and s.label == 0)
    if not seed_free(job.model, normals):
        return None
    auroc = float(trained["test_metrics"].get("image_auroc", float("nan")))
    say(
        "4/7 seeds",
        f"test image AUROC {auroc:.3f} +- 0.000 over any seeds: the {job.model.image_score} score keeps every patch "
        f"of the {normals} normal training cells, so no training seed reaches it (--seeds N trains N seeds of the "
        "heads, whose own scores do vary)",
    )
    return {"metrics": {"image_auroc_mean": auroc, "image_auroc_std": 0.0}}


def _calibrate_promote_deploy(settings: QuickstartSettings, version: str):
    """Step 5: the version's threshold on the val split, its promotion (with the multi-seed requirement when seeds
    were run), and the inspection app deployed. Returns (threshold, decision, endpoint URL)."""
    # Ray reads several settings when it is first imported; run() applies the stack's environment before this
    from ssn_platform.serving.deployment import deploy, wait_ready  # noqa: PLC0415 (Ray after apply_stack_env)

    with warnings.catch_warnings():  # a TooFewImagesWarning is said below, with the result
        warnings.simplefilter("ignore", thresholds.TooFewImagesWarning)
        threshold = thresholds.calibrate_version(
            PRODUCT, version, split="val", method=settings.threshold_method, false_alarm_rate=settings.false_alarm_rate
        )
    say("5/7 calibrate", f"threshold {threshold.value:.4f} ({threshold.method}; {threshold.interval_text()})")
    if threshold.warning:
        say("5/7 calibrate", f"warning: {threshold.warning}")
    decision = promotion.promote(
        PRODUCT, version, floor=settings.floor, require_seeds=settings.seeds if settings.seeds >= 2 else 0
    )
    say("5/7 promote", f"{'promoted' if decision.promoted else 'kept the champion'}: {decision.reason}")
    if not decision.promoted and decision.champion_version is None:
        raise PlatformError(f"version {version} was not promoted and there is no champion to serve: {decision.reason}")
    # log_to_driver=False: the replicas' request logs would bury the quickstart's own lines
    url = deploy({}, name="ssn", route_prefix="/", log_to_driver=False)
    wait_ready(url, timeout=300)
    say("5/7 deploy", f"{url}/v1/products/{PRODUCT}/inspect (API key in {os.environ.get('SSN_SERVE_API_KEY_FILE')})")
    return threshold, decision, url


def _inspect_held_back(settings: QuickstartSettings, local: Path, url: str) -> list[dict[str, Any]]:
    """Step 6: half normal, half defective test cells sent to the endpoint as the production line would."""
    samples = read_layout(local, "mvtec", split_file=str(repo_root() / settings.split_file))
    test = [s for s in samples if s.split == "test"]
    normal = [s for s in test if s.label == 0][: settings.held_back // 2]
    defective = [s for s in test if s.label == 1][: settings.held_back - len(normal)]
    served = []
    for sample in normal + defective:
        answer = _post_image(f"{url}/v1/products/{PRODUCT}/inspect", local / sample.image)
        served.append({"image": sample.image, "label": sample.label, **answer})
        say(
            "6/7 inspect",
            f"{sample.image:40s} label {sample.label} score {answer['score']:.4f} "
            f"{'ANOMALOUS' if answer['is_anomalous'] else 'normal   '} {answer['latency_ms']:.1f} ms",
        )
    return served
