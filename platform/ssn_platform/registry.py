"""MLflow model logging, registration and loading.

A registered version holds a pyfunc wrapper around a SuperSimpleNet checkpoint (state_dict + config). Python code
loads it back as a normal `torch.nn.Module` with `load_model("models:/ssn-weld/3")`; any MLflow client can also
call `mlflow.pyfunc.load_model(uri).predict(images)` for scores.
"""

from __future__ import annotations

import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
from mlflow import MlflowClient

import ssn_platform
import supersimplenet
from supersimplenet.checkpoint import load_checkpoint, save_checkpoint
from supersimplenet.config import to_dict
from supersimplenet.inference import inference_model, predict_images
from ssn_platform.names import registered_model_name  # noqa: F401 - re-exported for callers of registry
from ssn_platform.modelcard import refresh_model_card

CHECKPOINT_ARTIFACT = "checkpoint"
HEADLINE_METRICS = ("image_auroc", "ap_det", "pixel_auroc", "aupro", "f1_max")


def _pip_requirements() -> list[str]:
    names = ("torch", "torchvision", "timm", "numpy", "scipy", "scikit-learn", "pillow", "pyyaml", "mlflow")
    return [f"{name}=={metadata.version(name)}" for name in names]


def _code_paths() -> list[str]:
    # __path__, not __file__: works for regular and namespace packages alike
    return [str(Path(list(supersimplenet.__path__)[0])), str(Path(list(ssn_platform.__path__)[0]))]


def _pyfunc_class():
    class SuperSimpleNetModel(mlflow.pyfunc.PythonModel):
        """pyfunc wrapper: RGB images [N, H, W, 3] (uint8 or floats in [0, 1]) -> image scores."""

        def load_context(self, context) -> None:
            model, self.metadata = load_checkpoint(context.artifacts[CHECKPOINT_ARTIFACT])
            self.model = inference_model(model)  # the folded fast path, as evaluation and serving run

        def predict(self, context, model_input, params=None):
            scores, _ = predict_images(self.model, np.asarray(model_input))
            return scores

    return SuperSimpleNetModel


def registered_version_of_run(client, name: str, run_id: str) -> str | None:
    """The version of `name` a run already registered (the newest, should there be several), or None."""
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return str(max(int(v.version) for v in versions)) if versions else None


def log_and_register(job, model, *, run_id: str, metrics: dict[str, float], provenance: str) -> str:
    """Logs the model to the job's run and registers it as a new version of `ssn-<product>`. Returns the version.

    Idempotent per run: when the run already registered a version (a finalisation retried after a crash between
    the registration and the end of the job), that version is kept and only its tags are written again; no second
    version of the same run appears."""
    client = MlflowClient()
    name = job.registered_model_name
    version = registered_version_of_run(client, name, run_id)
    if version is None:
        version = _log_and_register_new(job, model, run_id=run_id, metrics=metrics, provenance=provenance)
    tags = {
        "backbone": job.model.backbone,
        "noise_std": str(job.model.noise_std),
        "noise_std_mode": job.model.noise_std_mode,
        "effective_noise_std": f"{model.effective_noise_std:.6g}",
        "perlin_threshold": str(job.model.perlin_threshold),
        "supervision": job.train.supervision,
        "dataset": job.dataset,
        "run_id": run_id,
        "backbone_weights": provenance,
    }
    tags.update({f"test_{k}": f"{metrics[k]:.6f}" for k in HEADLINE_METRICS if k in metrics})
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_tag(run_id, "ssn.model_version", version)
    client.set_tag(run_id, "ssn.registered_model", name)
    refresh_model_card(job.product, version)
    return version


def _log_and_register_new(job, model, *, run_id: str, metrics: dict[str, float], provenance: str) -> str:
    with tempfile.TemporaryDirectory() as directory:
        path = save_checkpoint(
            Path(directory) / "model.pt",
            model,
            metadata={
                "product": job.product,
                "train_config": to_dict(job.train),
                "test_metrics": metrics,
                "backbone_weights": provenance,
                "dataset": job.dataset,
                "mlflow_run_id": run_id,
            },
        )
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=_pyfunc_class()(),
                artifacts={CHECKPOINT_ARTIFACT: str(path)},
                code_paths=_code_paths(),
                pip_requirements=_pip_requirements(),
                registered_model_name=job.registered_model_name,
            )
    return str(info.registered_model_version)


def load_model(model_uri: str) -> tuple[Any, dict]:
    """Loads a logged or registered model back as a SuperSimpleNet module (eval mode) and its metadata."""
    with tempfile.TemporaryDirectory(prefix="ssn-model-") as directory:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri.rstrip("/"), dst_path=directory)
        candidates = list(Path(local).rglob("model.pt"))
        if not candidates:
            raise FileNotFoundError(f"{model_uri}: no SuperSimpleNet checkpoint among its artifacts")
        return load_checkpoint(candidates[0])  # read fully into memory before the folder goes
