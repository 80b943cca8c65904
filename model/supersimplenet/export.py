"""ONNX export of the whole SuperSimpleNet inference graph, blur included, and its check with onnxruntime.

The graph takes normalised images [B, 3, H, W] (float32, B dynamic) and returns `anomaly_map` [B, 1, H, W] and
`score` [B], both after the sigmoid, exactly as `SuperSimpleNet.eval()` does. The Gaussian blur is exported as what
it is in `model.py`: a reflect pad and two 1-D convolutions (no 2-D kernel, no kornia/torchvision op that ONNX
lacks). With ``fast=True`` the exported graph is the fast path's (`supersimplenet.fast`), folded and lighter.

onnx and onnxruntime are an optional extra (`pip install '.[onnx]'`); they are imported inside the functions only.
Export uses torch's TorchScript-based exporter (``dynamo=False``), which needs neither onnx nor onnxscript.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from supersimplenet.fast import FastSuperSimpleNet
from supersimplenet.model import SuperSimpleNet

DEFAULT_OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAMES = ("anomaly_map", "score")


class OnnxCheckError(AssertionError):
    """onnxruntime's outputs differ from PyTorch's by more than the tolerance."""


class _Exportable(nn.Module):
    """Tuple-returning wrapper (ONNX graphs return tensors, not dataclasses)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.model, FastSuperSimpleNet):
            out = self.model.run(images)  # run: forward without inference_mode, which tracing cannot record
        else:
            out = self.model(images)
        return out.anomaly_map, out.score


def _prepare(model: nn.Module, fast: bool) -> nn.Module:
    if getattr(model, "memory", None) is not None:
        raise ValueError(
            'ONNX export of a model with a patch memory (image_score or anomaly_map "memory") is not supported '
            "(its nearest-patch search over the memory is not exported); serve it through the PyTorch fast path"
        )
    if isinstance(model, FastSuperSimpleNet):
        if model.dtype != torch.float32 or model.backbone_dtype != torch.float32:
            raise ValueError("only float32 fast models can be exported to ONNX")
        return model.eval()
    if not isinstance(model, SuperSimpleNet):
        raise TypeError(f"expected a SuperSimpleNet or FastSuperSimpleNet, got {type(model).__name__}")
    model = model.eval()
    return FastSuperSimpleNet.from_model(model, dtype=torch.float32, channels_last=False) if fast else model


def export_onnx(
    model: SuperSimpleNet | FastSuperSimpleNet,
    path: str | Path,
    *,
    image_size: tuple[int, int] | None = None,
    opset: int = DEFAULT_OPSET,
    fast: bool = False,
) -> Path:
    """Exports the eval-mode graph (backbone, heads, upsample, blur, sigmoids) with a dynamic batch axis.

    Args:
        model: the reference model (exported as is, or as its fast path with ``fast=True``) or a float32 fast model.
        path: the .onnx file to write (parent folders are created).
        image_size: (height, width) the graph is traced at; the model's config size by default. The spatial size is
            fixed in the graph (feature and blur shapes depend on it); only the batch is dynamic.
        opset: ONNX opset (reflect padding needs >= 11).
        fast: export the fast path instead of the reference graph.

    Returns:
        The path written.
    """
    if opset < 11:
        raise ValueError(f"opset {opset} has no reflect padding; use 11 or later")
    net = _prepare(model, fast)
    config = net.config
    height, width = tuple(image_size or config.image_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    device = next(iter(net.buffers())).device
    example = torch.zeros(2, 3, height, width, device=device)
    wrapper = _Exportable(net).eval()
    with torch.no_grad():
        wrapper(example)  # fills the fast path's per-shape caches, so they are traced as constants
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about shape-derived constants (sizes are fixed)
            torch.onnx.export(
                wrapper,
                (example,),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAMES[0]: {0: "batch"}, OUTPUT_NAMES[1]: {0: "batch"}},
                do_constant_folding=True,
            )
    return path


def onnx_session(path: str | Path, *, threads: int | None = None) -> Any:
    """An onnxruntime CPU InferenceSession for an exported model (validated with onnx.checker first)."""
    import onnx  # noqa: PLC0415 (optional extra onnx)
    import onnxruntime as ort  # noqa: PLC0415 (optional extra onnx)

    onnx.checker.check_model(str(path))
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def run_onnx(session: Any, images: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(anomaly_map, score) from onnxruntime for normalised images."""
    array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    anomaly_map, score = session.run(list(OUTPUT_NAMES), {INPUT_NAME: array.astype(np.float32, copy=False)})
    return anomaly_map, score


def check_onnx(
    path: str | Path,
    model: SuperSimpleNet | FastSuperSimpleNet,
    images: torch.Tensor,
    *,
    atol: float = 1e-4,
) -> dict[str, float]:
    """Runs the ONNX file with onnxruntime and compares with PyTorch on the same normalised images.

    Returns:
        {"anomaly_map": max abs difference, "score": max abs difference, "batch": B}.

    Raises:
        OnnxCheckError: a difference above `atol`, or wrong output shapes.
    """
    session = onnx_session(path)
    onnx_map, onnx_score = run_onnx(session, images)
    with torch.no_grad():
        reference = model.eval()(images)
    ref_map = reference.anomaly_map.float().cpu().numpy()
    ref_score = reference.score.float().cpu().numpy()
    if onnx_map.shape != ref_map.shape or onnx_score.shape != ref_score.shape:
        raise OnnxCheckError(
            f"{path}: output shapes {onnx_map.shape}, {onnx_score.shape} != PyTorch's {ref_map.shape}, "
            f"{ref_score.shape}"
        )
    report = {
        "anomaly_map": float(np.abs(onnx_map - ref_map).max()),
        "score": float(np.abs(onnx_score - ref_score).max()),
        "batch": int(images.shape[0]),
    }
    if report["anomaly_map"] > atol or report["score"] > atol:
        raise OnnxCheckError(f"{path}: onnxruntime differs from PyTorch by more than {atol}: {report}")
    return report


__all__ = ["DEFAULT_OPSET", "OnnxCheckError", "check_onnx", "export_onnx", "onnx_session", "run_onnx"]
