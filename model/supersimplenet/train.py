"""Single-process training and evaluation of SuperSimpleNet, and its CLI.

The distributed platform calls these same functions from each Ray worker: `build_optimizer`, `build_scheduler`,
`build_train_loader` (rank-aware), `train_epoch`, `predict` and `evaluate`. `fit` strings them together for one
process.

    python -m supersimplenet.train --data ../shared/data/battery_weld/denoised --epochs 20 --out runs/weld
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from supersimplenet.backbones import get_preset, load_backbone_weights
from supersimplenet.checkpoint import save_checkpoint
from supersimplenet.config import (
    MEMORY_SCORE,
    REPORTED_SCORES,
    TRAIN_PRECISIONS,
    ModelConfig,
    TrainConfig,
    recommended_model_config,
    to_dict,
)
from supersimplenet.feature_cache import CachedLoader, FeatureCache, build_feature_cache, estimate_bytes
from supersimplenet.feature_store import FeatureStore
from supersimplenet.frozen import run_frozen_passes
from supersimplenet.inference import inference_model
from supersimplenet.layouts import read_layout
from supersimplenet.loading import DefectDataset
from supersimplenet.losses import dilate_masks, distance_weight_maps, supersimplenet_loss
from supersimplenet.metrics import compute_metrics, image_scores
from supersimplenet.model import SuperSimpleNet, build_model
from supersimplenet.sampler import BalancedSampler
from supersimplenet.samples import Sample
from supersimplenet.supervision import apply_supervision

log = logging.getLogger(__name__)


def seed_everything(seed: int, *, deterministic: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def unwrap(model: nn.Module) -> SuperSimpleNet:
    """The SuperSimpleNet inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def build_optimizer(model: SuperSimpleNet, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with the paper's groups: adaptor (lr 1e-4, wd 0.01) and the two heads (lr 2e-4, wd 1e-5)."""
    return torch.optim.AdamW(
        [
            {
                "params": list(model.adaptor.parameters()),
                "lr": cfg.lr_adaptor,
                "weight_decay": cfg.weight_decay_adaptor,
                "name": "adaptor",
            },
            {
                "params": list(model.segmentation_head.parameters()),
                "lr": cfg.lr_heads,
                "weight_decay": cfg.weight_decay_heads,
                "name": "segmentation_head",
            },
            {
                "params": list(model.classification_head.parameters()),
                "lr": cfg.lr_heads,
                "weight_decay": cfg.weight_decay_heads,
                "name": "classification_head",
            },
        ]
    )


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.MultiStepLR:
    """MultiStepLR at 0.8 and 0.9 of the epochs, gamma 0.4, stepped once per epoch."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=cfg.milestone_epochs(), gamma=cfg.lr_gamma)


def build_train_loader(
    dataset: DefectDataset,
    samples: Sequence[Sample],
    cfg: TrainConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int | None = None,
) -> tuple[DataLoader, Any]:
    """Loader over this rank's share of an epoch; call `sampler.set_epoch(epoch)` before each epoch.

    Unsupervised: a seeded shuffle of the normal images, sharded by DistributedSampler. Supervised regimes: the
    balanced, inverse-frequency sampler of docs/design.md §6.3, which shards deterministically by itself.
    """
    if cfg.supervised:
        sampler = BalancedSampler(
            labels=[s.label for s in samples],
            flips=cfg.resolved_flips,
            seed=cfg.seed,
            rank=rank,
            world_size=world_size,
        )
    else:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed + rank)
    loader = DataLoader(
        dataset,
        batch_size=batch_size or cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        drop_last=False,
        generator=generator,
        persistent_workers=cfg.num_workers > 0,
    )
    return loader, sampler


def train_step(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    *,
    device: torch.device,
) -> dict[str, float]:
    """One optimisation step on a batch of B images (2B samples after duplication): "image", or their cached
    backbone "levels" (`supersimplenet.feature_cache.CachedLoader`)."""
    net = unwrap(model)
    images = batch["image"].to(device, non_blocking=True) if "image" in batch else None
    levels = [level.to(device, non_blocking=True) for level in batch["levels"]] if "levels" in batch else None
    masks = batch["mask"].to(device, non_blocking=True)
    labels = batch["label"].to(device, non_blocking=True).float()
    segmented = batch["segmented"].to(device, non_blocking=True).bool()
    pixel_weights = None
    if cfg.supervised:
        masks = dilate_masks(masks, cfg.resolved_dilate)
        weights = distance_weight_maps(masks, net.config.feature_size, weight=cfg.dt_weight, power=cfg.dt_power)
        pixel_weights = torch.cat((weights, weights))
    # bf16: the trainable layers run under autocast (weights, gradients and optimiser state stay float32; the
    # backbone opts out in FeatureExtractor.forward); the losses are computed in float32 from float32 logits.
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        out = model(images, masks, labels, levels=levels)
    out = dataclasses.replace(out, map_logits=out.map_logits.float(), score_logits=out.score_logits.float())
    if pixel_weights is not None and pixel_weights.shape[-2:] != out.map_logits.shape[-2:]:
        pixel_weights = nn.functional.interpolate(
            pixel_weights, size=out.map_logits.shape[-2:], mode="bilinear", align_corners=True
        )
    losses = supersimplenet_loss(
        out.map_logits,
        out.score_logits,
        out.masks,
        out.labels,
        segmented=torch.cat((segmented, segmented)),
        pixel_weights=pixel_weights,
    )
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    clip = cfg.resolved_clip_grad_norm
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
    optimizer.step()
    return {name: float(value.detach()) for name, value in losses.items()}


def train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    *,
    device: torch.device,
    progress: bool = True,
    description: str = "train",
) -> dict[str, float]:
    """Trains one epoch; returns the mean of each loss term over its steps."""
    model.train()
    sums: dict[str, float] = {}
    steps = 0
    for batch in tqdm(loader, desc=description, leave=False, disable=not progress):
        for name, value in train_step(model, batch, optimizer, cfg, device=device).items():
            sums[name] = sums.get(name, 0.0) + value
        steps += 1
    return {name: value / max(steps, 1) for name, value in sums.items()}


@dataclass
class Predictions:
    scores: np.ndarray  # [N] image scores in [0, 1] (the model's `image_score`)
    labels: np.ndarray  # [N]
    maps: np.ndarray  # [N, H, W] the reported anomaly maps in [0, 1] (`ModelConfig.anomaly_map`)
    masks: np.ndarray  # [N, H, W] ground truth
    indices: np.ndarray  # [N] dataset indices
    head_scores: np.ndarray | None = None  # [N] the classification head's probabilities
    memory_scores: np.ndarray | None = None  # [N] the patch memory's scores (models with a memory only)
    head_maps: np.ndarray | None = None  # [N, H, W] the heads' maps when the reported maps are the memory's

    @property
    def heads_maps(self) -> np.ndarray:
        """The heads' maps, whichever map the model reports: what the map-based scores and the search read."""
        return self.maps if self.head_maps is None else self.head_maps

    def score_metrics(self) -> dict[str, float]:
        """Image AUROC and AP-det of every image score (`supersimplenet.metrics.IMAGE_SCORES`), keyed
        ``image_auroc_<score>`` and ``ap_det_<score>``: what evaluation and the search compare. The map-based
        scores read the heads' maps, whichever map the model reports."""
        head = self.scores if self.head_scores is None else self.head_scores
        out = {}
        for name, values in image_scores(head, self.heads_maps).items():
            image = compute_metrics(scores=values, labels=self.labels)
            out[f"image_auroc_{name}"], out[f"ap_det_{name}"] = image["image_auroc"], image["ap_det"]
        if self.memory_scores is not None:
            image = compute_metrics(scores=self.memory_scores, labels=self.labels)
            out[f"image_auroc_{MEMORY_SCORE}"], out[f"ap_det_{MEMORY_SCORE}"] = image["image_auroc"], image["ap_det"]
        return out

    def heads_pixel_metrics(self) -> dict[str, float]:
        """Pixel AUROC, AUPRO and AP-loc of the heads' maps, keyed ``<metric>_heads``, when the model reports
        another map (the memory's) and the images have masks; else {} (the reported map's are the heads')."""
        if self.head_maps is None or not self.masks.any():
            return {}
        pixel = compute_metrics(scores=self.scores, labels=self.labels, maps=self.head_maps, masks=self.masks)
        return {f"{key}_heads": pixel[key] for key in ("pixel_auroc", "aupro", "ap_loc")}


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, *, device: torch.device, progress: bool = False) -> Predictions:
    """Scores and maps of a loader's images through the fast inference path (`supersimplenet.inference`).

    `model` (possibly DDP-wrapped, in any mode) is folded once per call and left as it was. `loader` yields image
    batches, or batches of cached backbone "levels" (`supersimplenet.feature_cache.CachedLoader`), which skip the
    backbone."""
    net = inference_model(unwrap(model))
    scores, labels, maps, masks, indices, heads, memory, head_maps = [], [], [], [], [], [], [], []
    for batch in tqdm(loader, desc="predict", leave=False, disable=not progress):
        if "levels" in batch:
            size = tuple(batch["mask"].shape[-2:])
            out = net.forward_levels([level.to(device) for level in batch["levels"]], size)
        else:
            out = net(batch["image"].to(device))
        scores.append(out.score.cpu().numpy())
        if out.memory_score is not None:
            memory.append(out.memory_score.float().cpu().numpy())
        heads.append(out.head_score.float().cpu().numpy())
        maps.append(out.anomaly_map[:, 0].cpu().numpy())
        if out.head_map is not None:
            head_maps.append(out.head_map[:, 0].cpu().numpy())
        labels.append(batch["label"].numpy())
        masks.append(batch["mask"][:, 0].numpy())
        indices.append(np.asarray(batch["index"]))
    return Predictions(
        scores=np.concatenate(scores),
        labels=np.concatenate(labels).astype(np.int64),
        maps=np.concatenate(maps),
        masks=np.concatenate(masks).astype(np.uint8),
        indices=np.concatenate(indices),
        head_scores=np.concatenate(heads),
        memory_scores=np.concatenate(memory) if memory else None,
        head_maps=np.concatenate(head_maps) if head_maps else None,
    )


def evaluate(model: nn.Module, loader: DataLoader, *, device: torch.device) -> dict[str, float]:
    """All metrics of docs/design.md §7 on a loader's samples."""
    predictions = predict(model, loader, device=device)
    return compute_metrics(
        scores=predictions.scores, labels=predictions.labels, maps=predictions.maps, masks=predictions.masks
    )


def eval_loader(dataset: DefectDataset, *, batch_size: int, num_workers: int = 0) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)


@dataclass
class FitResult:
    model: SuperSimpleNet
    history: list[dict[str, float]]
    test_metrics: dict[str, float]
    weights_provenance: str


def validation_loader(
    model: SuperSimpleNet,
    dataset: Dataset,
    *,
    device: torch.device,
    batch_size: int,
    budget_bytes: int,
    store: FeatureStore | None = None,
) -> CachedLoader | DataLoader:
    """A loader for a dataset scored again and again (validation every epoch): its items' float32 backbone levels
    computed once (the backbone is frozen and the items are fixed functions of their index, synthetic defects
    included), when they fit in `budget_bytes`, so `predict` runs only what follows the backbone; else the images.
    With a `store`, levels an earlier run computed for the same backbone and items are loaded instead."""
    if budget_bytes > 0 and estimate_bytes(model, dataset, torch.float32) <= budget_bytes:

        def build() -> FeatureCache:
            return build_feature_cache(model, dataset, device=device, dtype=torch.float32, batch_size=batch_size)

        cache = build() if store is None else store.fetch(model, dataset, build, dtype=torch.float32, device=device)
        return CachedLoader(cache, range(len(dataset)), batch_size)
    return eval_loader(dataset, batch_size=batch_size)


def fit(
    *,
    data_root: str | Path,
    samples: Sequence[Sample],
    model_config: ModelConfig,
    train_config: TrainConfig,
    weights: str | Path | None = "default",
    device: str | torch.device = "cpu",
    progress: bool = True,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> FitResult:
    """Trains on the train split and scores the test split of `samples` in one process."""
    cfg = train_config
    device = torch.device(device)
    seed_everything(cfg.seed, deterministic=cfg.deterministic)
    samples = apply_supervision(list(samples), cfg.supervision, mask_ratio=cfg.mask_ratio, seed=cfg.seed)
    train_samples = [s for s in samples if s.split == "train"]
    test_samples = [s for s in samples if s.split == "test"]
    if not train_samples:
        raise ValueError(f"{data_root}: no training samples for supervision {cfg.supervision!r}")
    preset = get_preset(model_config.backbone)
    common = dict(root=data_root, image_size=model_config.image_size, mean=preset.mean, std=preset.std)
    train_set = DefectDataset(samples=train_samples, flips=cfg.resolved_flips, **common)
    test_set = DefectDataset(samples=test_samples, **common) if test_samples else None

    model = build_model(model_config)
    provenance = load_backbone_weights(model.feature_extractor.backbone, model_config.backbone, weights)
    model.to(device)
    loader, sampler = build_train_loader(train_set, train_samples, cfg)
    loader = run_frozen_passes(model, loader, sampler, cfg, device=device)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)

    history: list[dict[str, float]] = []
    for epoch in range(cfg.epochs):
        started = time.perf_counter()
        sampler.set_epoch(epoch)
        row: dict[str, Any] = {"epoch": epoch}
        row.update(
            train_epoch(
                model,
                loader,
                optimizer,
                cfg,
                device=device,
                progress=progress,
                description=f"epoch {epoch + 1}/{cfg.epochs}",
            )
        )
        row.update({f"lr_{group['name']}": group["lr"] for group in optimizer.param_groups})
        scheduler.step()
        if test_set is not None and cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 and epoch + 1 < cfg.epochs:
            row.update(
                {
                    f"test_{k}": v
                    for k, v in evaluate(model, eval_loader(test_set, batch_size=cfg.batch_size), device=device).items()
                }
            )
        row["seconds"] = time.perf_counter() - started
        history.append(row)
        if progress:
            log.info(
                "epoch %d/%d loss %.4f (%.1fs)", epoch + 1, cfg.epochs, row.get("loss", float("nan")), row["seconds"]
            )
        if on_epoch is not None:
            on_epoch(epoch, row)
    test_metrics = {}
    if test_set is not None:
        test_metrics = evaluate(model, eval_loader(test_set, batch_size=cfg.batch_size), device=device)
    return FitResult(model=model, history=history, test_metrics=test_metrics, weights_provenance=provenance)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m supersimplenet.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="dataset root folder")
    parser.add_argument("--layout", default=None, help="mvtec | visa | ksdd2 | sensum | folder (default: detect)")
    parser.add_argument("--category", default=None)
    parser.add_argument("--split-file", default=None, help="file of '<split> <relative image path>' lines")
    parser.add_argument(
        "--supervision", default="unsupervised", choices=["unsupervised", "weak", "mixed", "supervised"]
    )
    parser.add_argument("--mask-ratio", type=float, default=1.0, help="mixed supervision: fraction of masks kept")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="default", help="'default', 'random' or a state_dict file")
    parser.add_argument("--image-size", type=int, nargs=2, default=(256, 256), metavar=("H", "W"))
    parser.add_argument("--noise-std", type=float, default=None)
    parser.add_argument("--noise-std-mode", choices=["absolute", "relative"], default=None)
    parser.add_argument("--perlin-threshold", type=float, default=None)
    parser.add_argument("--icpr", action="store_true", help="ICPR variant: classification head on adapted features")
    parser.add_argument(
        "--image-score",
        default=None,
        choices=list(REPORTED_SCORES),
        help="image score (default: the recommended one for the backbone and supervision)",
    )
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=list(TRAIN_PRECISIONS),
        help="compute precision of the trainable layers (TrainConfig.precision)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", required=True, help="output folder for model.pt and metrics.json")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = _parse(argv)
    supervised = args.supervision != "unsupervised"
    model_config = recommended_model_config(
        args.backbone,
        supervision=args.supervision,
        image_size=tuple(args.image_size),
        noise_std=args.noise_std,
        noise_std_mode=args.noise_std_mode,
        perlin_threshold=args.perlin_threshold,
        adapt_cls_features=True if args.icpr else None,
        image_score=args.image_score,
        overlap=False,
    )
    train_config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed if args.seed is not None else (456654 if supervised else 42),
        supervision=args.supervision,
        mask_ratio=args.mask_ratio,
        eval_every=args.eval_every,
        num_workers=args.num_workers,
        precision=args.precision,
    )
    options = {"split_file": args.split_file} if args.split_file else {}
    samples = read_layout(args.data, args.layout, category=args.category, **options)
    result = fit(
        data_root=args.data,
        samples=samples,
        model_config=model_config,
        train_config=train_config,
        weights=args.weights,
        device=args.device,
    )
    out = Path(args.out)
    save_checkpoint(
        out / "model.pt",
        result.model,
        metadata={
            "train_config": to_dict(train_config),
            "test_metrics": result.test_metrics,
            "backbone_weights": result.weights_provenance,
            "data": os.fspath(args.data),
        },
    )
    summary = {
        "test_metrics": result.test_metrics,
        "history": result.history,
        "model_config": to_dict(model_config),
        "train_config": to_dict(train_config),
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=float))
    print(json.dumps(result.test_metrics, indent=2, default=float))
    return summary


if __name__ == "__main__":
    main()
