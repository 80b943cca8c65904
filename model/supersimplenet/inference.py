"""Inference on in-memory images: the one pre- and post-processing path shared by evaluation and serving.

Training and evaluation read files through `supersimplenet.loading` (decode -> [0, 1] RGB -> bilinear resize ->
normalise); this module applies exactly those steps to decoded images, so a served score equals the offline one.

Every prediction (evaluation in `supersimplenet.train.predict`, calibration, promotion, the Serve endpoint, the
MLflow pyfunc) runs the fast path of `supersimplenet.fast` through `inference_model`: BatchNorm and the adaptor
folded, low-resolution heads where they pay. In float32 it equals the reference `SuperSimpleNet.eval()` forward
within about 1e-5 (tests/model/test_fast.py); the reference forward stays the definition the tests check against.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import torch
from PIL import Image

from supersimplenet.fast import FastSuperSimpleNet
from supersimplenet.loading import image_array, resize_image
from supersimplenet.model import SuperSimpleNet

Precision = Literal["fp32", "bf16"]
PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
InferenceModel = SuperSimpleNet | FastSuperSimpleNet


def inference_model(model: InferenceModel, *, precision: Precision | None = None) -> FastSuperSimpleNet:
    """The model every prediction runs: `model` folded into a `FastSuperSimpleNet` (returned as is if it is one).

    Fold once and keep the result when predicting repeatedly (serving does); folding copies the backbone.

    Args:
        model: a reference model (its eval-mode computation is reproduced; it is left untouched) or a fast one.
        precision: "fp32" (equal to the reference within about 1e-5) or "bf16" (see `supersimplenet.fast`).
            None: fp32 for a reference model, whatever a fast model already runs in.
    """
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if isinstance(model, FastSuperSimpleNet):
        if precision is not None and model.dtype != PRECISIONS[precision]:
            raise ValueError(f"the fast model runs in {model.dtype}, not {precision}; fold the reference model again")
        return model
    if not isinstance(model, SuperSimpleNet):
        raise TypeError(f"expected a SuperSimpleNet or FastSuperSimpleNet, got {type(model).__name__}")
    return FastSuperSimpleNet.from_model(model, dtype=PRECISIONS[precision or "fp32"])


def to_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """PIL image, or an [H, W(, C)] uint8 / float-in-[0,1] array -> HxWx3 float32 in [0, 1]."""
    if isinstance(image, Image.Image):
        return image_array(image)
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3):
        raise ValueError(f"expected an [H, W], [H, W, 1] or [H, W, 3] image, got shape {array.shape}")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    return array.astype(np.float32)


def preprocess(model: InferenceModel, images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
    """Images -> the normalised batch [N, 3, H, W] the model takes."""
    batch = torch.stack([resize_image(to_array(image), size=model.config.image_size) for image in images])
    return model.normalize(batch.to(model.mean.device))


@torch.inference_mode()
def predict_images(
    model: InferenceModel,
    images: Sequence[Image.Image | np.ndarray] | np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Scores [N] and anomaly maps [N, H, W] (model resolution) of decoded images, through `inference_model`."""
    if isinstance(images, np.ndarray) and images.ndim == 3 and images.shape[-1] not in (1, 3):
        images = [images]  # one grayscale image
    net = inference_model(model)
    out = net(preprocess(net, list(images)))
    return out.score.float().cpu().numpy(), out.anomaly_map[:, 0].float().cpu().numpy()
