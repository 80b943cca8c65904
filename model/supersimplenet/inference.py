"""Inference on in-memory images: the one pre- and post-processing path shared by evaluation and serving.

Training and evaluation read files through `supersimplenet.data` (decode -> [0, 1] RGB -> bilinear resize ->
normalise); this module applies exactly those steps to decoded images, so a served score equals the offline one.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from supersimplenet.data import image_array, resize_image
from supersimplenet.model import SuperSimpleNet


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


def preprocess(model: SuperSimpleNet, images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
    """Images -> the normalised batch [N, 3, H, W] the model takes."""
    batch = torch.stack([resize_image(to_array(image), size=model.config.image_size) for image in images])
    return model.normalize(batch.to(model.mean.device))


@torch.inference_mode()
def predict_images(model: SuperSimpleNet, images: Sequence[Image.Image | np.ndarray] | np.ndarray,
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Scores [N] and anomaly maps [N, H, W] (model resolution) of decoded images."""
    if isinstance(images, np.ndarray) and images.ndim == 3 and images.shape[-1] not in (1, 3):
        images = [images]  # one grayscale image
    model.eval()
    out = model(preprocess(model, list(images)))
    return out.score.float().cpu().numpy(), out.anomaly_map[:, 0].float().cpu().numpy()
