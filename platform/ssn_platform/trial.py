"""The trial side of a search: what runs in each Ray Tune trial actor, and how the driver ends the trials' runs.

`trial_driver` is one trial: the search's base job with the trial's parameters applied, trained by the same
`TorchTrainer` as the train job (`training.train_loop_per_worker`) with `TuneReportCallback`, so rank 0's per-epoch
metrics reach Tune (and ASHA), and logged to an MLflow child run of the search's parent run. Tune ends a trial it
stops by ending the trial's actor, so the trial cannot end its own run: the search driver (ssn_platform.tuning) ends
them afterwards from Tune's results (`_close_child_runs`).

Ray and ssn_platform.trainer (which imports Ray) are imported inside the function that uses them (see
ssn_platform.tuning).
"""

from __future__ import annotations

from typing import Any, Mapping

from mlflow import MlflowClient
from mlflow.entities import Param

from ssn_platform import lineage, training
from ssn_platform.jobconfig import build_job_config
from ssn_platform.search_space import apply_params
from ssn_platform.study import STUDY_TRIAL_KEY
from ssn_platform.tuned import BASELINE_KEY


def trial_run_name(search_name: str, number: int | None, trial_id: str) -> str:
    suffix = f"t{number:04d}" if number is not None else trial_id
    return f"{search_name[:100]}-{suffix}"


def trial_driver(config: dict[str, Any], settings: dict[str, Any]) -> None:
    """One trial: a Ray Train run of the trial's job, metrics forwarded to Tune, logged to a nested MLflow run."""
    import ray.tune  # noqa: PLC0415 (Ray reads its settings on first import)
    from ray.tune.integration.ray_train import (  # noqa: PLC0415 (Ray reads its settings on first import)
        TuneReportCallback,
    )

    from ssn_platform.trainer import build_trainer  # noqa: PLC0415 (trainer imports Ray at its top)

    trial_id = ray.tune.get_context().get_trial_id()
    number = config.get(STUDY_TRIAL_KEY)
    params = {k: v for k, v in config.items() if k not in (STUDY_TRIAL_KEY, BASELINE_KEY)}
    run_name = trial_run_name(settings["search_name"], number, trial_id)
    base = build_job_config(settings["base_job"])
    job = apply_params(
        base,
        params,
        settings["fixed"],
        validation=settings["validation"],
        validate_every=1,
        register=False,
        run_name=run_name,
        checkpoint_every=base.train.epochs,
        overlays=0,
    )

    client = MlflowClient()
    tags = {
        "mlflow.parentRunId": settings["parent_run_id"],
        lineage.RUN_TAG: run_name,
        "ssn.product": job.product,
        "ssn.backbone": job.model.backbone,
        "ssn.tune.study": settings["study_name"],
        "ssn.tune.search": settings["search_name"],
        "ssn.tune.trial_id": trial_id,
        "ssn.tune.validation": job.validation,
    }
    if number is not None:
        tags["ssn.tune.study_trial"] = str(number)
    if config.get(BASELINE_KEY):
        tags["ssn.tune.baseline"] = "true"
    run = client.create_run(settings["experiment_id"], run_name=run_name, tags=tags)
    run_id = run.info.run_id
    logged = job.logged_params()
    logged.update({f"tune.{k}": str(v) for k, v in params.items()})
    client.log_batch(run_id, params=[Param(k, v) for k, v in logged.items()])

    trainer = build_trainer(
        job,
        training.train_loop_per_worker,
        mlflow_run_id=run_id,
        name=run_name,
        storage_path=settings["train_storage_path"],
        num_to_keep=1,
        callbacks=[TuneReportCallback()],
    )
    try:
        trainer.fit()
    except BaseException as error:
        # Tune ends a trial it stops (ASHA) by ending this actor, which can surface here as an error while the
        # training is torn down; the search driver sets the final status of every child run from Tune's results.
        client.set_tag(run_id, "ssn.tune.driver_interrupted", type(error).__name__)
        raise
    client.set_terminated(run_id, status="FINISHED")


def _close_child_runs(
    client, experiment_id: str, parent_id: str, results: Mapping[str, Any], *, max_t: int
) -> dict[str, str]:
    """Tags every child run with the epochs Tune judged (`ssn.tune.epochs_reached`) and `ssn.tune.stopped_early`
    when ASHA stopped it before max_t, and ends the runs that Tune stopped (a stop ends the trial actor, so the
    trial cannot end its own run): KILLED when stopped before max_t, FINISHED at max_t, FAILED on errors.

    The workers do not wait for the scheduler's verdict on an epoch: a stopped trial's run may hold one more epoch
    of metrics than Tune judged, and one whose last epoch finished meanwhile may have ended itself as FINISHED.
    Returns {tune trial id: MLflow run id}."""
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=5000
    )
    out = {}
    for run in runs:
        trial_id = run.data.tags.get("ssn.tune.trial_id", "")
        out[trial_id] = run.info.run_id
        result = results.get(trial_id)
        iterations = int((result.metrics or {}).get("training_iteration") or 0) if result is not None else 0
        client.set_tag(run.info.run_id, "ssn.tune.epochs_reached", str(iterations))
        stopped = result is not None and result.error is None and 0 < iterations < max_t
        if stopped:
            client.set_tag(run.info.run_id, "ssn.tune.stopped_early", "true")
        if run.info.status == "FINISHED":
            continue
        if result is None or result.error is not None or iterations == 0:
            client.set_terminated(run.info.run_id, status="FAILED")
        elif stopped:
            client.set_terminated(run.info.run_id, status="KILLED")
        else:
            # ASHA also stops a trial at max_t, which can end the trial actor before the trial ends its own run
            client.set_terminated(run.info.run_id, status="FINISHED")
    return out


__all__ = [
    "trial_driver",
    "trial_run_name",
]
