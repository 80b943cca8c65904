"""Losses of SuperSimpleNet (docs/design.md §4): truncated L1 and focal loss on the map, focal loss on the score.

JIMS rules: map terms only over samples whose masks are known (`segmented`), optional per-pixel weights from the
distance transform of the (dilated) defect masks.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torchvision.ops import sigmoid_focal_loss

FOCAL_GAMMA = 4.0
TRUNCATION = 0.5


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor | None, select: torch.Tensor) -> torch.Tensor:
    """Mean of `values * weights` over the selected elements; 0 (with a graph) when nothing is selected."""
    if weights is not None:
        values = values * weights
    count = select.sum()
    return (values * select).sum() / count.clamp_min(1)


def truncated_l1(
    map_logits: torch.Tensor,
    masks: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    sample_select: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pushes normal pixels below -0.5 and anomalous ones above +0.5; the two means are taken apart.

    Args:
        map_logits: [N, 1, h, w] logits.
        masks: [N, 1, h, w] binary targets.
        weights: optional per-pixel weights [N, 1, h, w].
        sample_select: optional bool [N]; only those samples count (JIMS: the segmented ones).
    """
    select = (
        torch.ones_like(masks) if sample_select is None else sample_select.view(-1, 1, 1, 1).float().expand_as(masks)
    )
    normal = _weighted_mean(F.relu(map_logits + TRUNCATION), weights, select * (1 - masks))
    anomalous = _weighted_mean(F.relu(TRUNCATION - map_logits), weights, select * masks)
    return normal + anomalous


def focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    sample_select: torch.Tensor | None = None,
    gamma: float = FOCAL_GAMMA,
) -> torch.Tensor:
    """Focal loss on logits (alpha disabled), mean over the selected elements."""
    per_element = sigmoid_focal_loss(logits, targets.float(), alpha=-1, gamma=gamma, reduction="none")
    if sample_select is None:
        select = torch.ones_like(per_element)
    else:
        select = sample_select.view(-1, *([1] * (per_element.dim() - 1))).float().expand_as(per_element)
    return _weighted_mean(per_element, weights, select)


def supersimplenet_loss(
    map_logits: torch.Tensor,
    score_logits: torch.Tensor,
    masks: torch.Tensor,
    labels: torch.Tensor,
    *,
    segmented: torch.Tensor | None = None,
    pixel_weights: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Total loss and its terms. All weights are 1, as in the paper.

    Returns:
        dict with "loss" (to backpropagate), "truncated_l1", "focal_map", "focal_score".
    """
    tl1 = truncated_l1(map_logits, masks, weights=pixel_weights, sample_select=segmented)
    focal_map = focal_loss(map_logits, masks, weights=pixel_weights, sample_select=segmented)
    focal_score = focal_loss(score_logits, labels)
    return {
        "loss": tl1 + focal_map + focal_score,
        "truncated_l1": tl1,
        "focal_map": focal_map,
        "focal_score": focal_score,
    }


def dilate_masks(masks: torch.Tensor, kernel: int) -> torch.Tensor:
    """Binary dilation with a kernel x kernel square (JIMS uses 7)."""
    if kernel <= 1:
        return masks
    return F.max_pool2d(masks, kernel_size=kernel, stride=1, padding=kernel // 2)


def distance_weights(mask: np.ndarray, *, weight: float = 3.0, power: float = 2.0) -> np.ndarray:
    """Per-pixel loss weights of one binary mask [H, W]: 1 on background, (d/max d)^p * w inside each defect.

    Each 8-connected component is normalised by its own maximum distance, so its centre gets exactly `weight`.
    """
    out = np.ones(mask.shape, dtype=np.float32)
    components, count = ndimage.label(mask > 0, structure=np.ones((3, 3), dtype=bool))
    for index in range(1, count + 1):
        region = components == index
        distance = ndimage.distance_transform_edt(region)
        out[region] = (distance[region] / distance.max()) ** power * weight
    return out


def distance_weight_maps(
    masks: torch.Tensor,
    size: tuple[int, int],
    *,
    weight: float = 3.0,
    power: float = 2.0,
) -> torch.Tensor:
    """Distance-transform weights of image-resolution masks [B,1,H,W], resized to the feature size."""
    maps = np.stack([distance_weights(m[0].cpu().numpy(), weight=weight, power=power) for m in masks])
    tensor = torch.from_numpy(maps)[:, None].to(masks.device)
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=True)
