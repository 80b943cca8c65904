"""Speed of our SuperSimpleNet (reference and fast path) against anomalib's, in one interleaved run.

    python bench/bench_inference.py                      # full CPU run (about 12 minutes on 2 quiet cores)
    python bench/bench_inference.py --quick              # a short version, Lite0 only (about 75 s)
    python bench/bench_inference.py --device cuda --dtypes fp32 bf16 --batches 1 16 64 [--cuda-graphs]
    python bench/bench_inference.py --auroc-only         # bf16 vs fp32 image AUROC on the weld test split
    python bench/bench_inference.py --train-only --backbones efficientnet_lite0 --train-batches 8 32  # training only

anomalib comes from the optional extra (`pip install -e '.[bench]'`); without it the anomalib rows are skipped and
say so. Every configuration runs in the same process with the same thread count, and the implementations are
interleaved round by round, so a noisy neighbour slows all of them alike. Each row gives the median of the timed
rounds with min and max, in wall time, and also the process CPU time divided by the thread count (less sensitive to
other jobs on the machine; on an idle machine the two agree).

Not a test: prints a table and writes JSON (bench_results/inference.json by default).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "model"))  # runs from a checkout without the editable install too

from supersimplenet.backbones import build_feature_extractor, get_preset, load_backbone_weights  # noqa: E402
from supersimplenet.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from supersimplenet.config import ModelConfig, TrainConfig, recommended_model_config  # noqa: E402
from supersimplenet.fast import FastSuperSimpleNet  # noqa: E402
from supersimplenet.layouts import read_layout  # noqa: E402
from supersimplenet.loading import DefectDataset  # noqa: E402
from supersimplenet.metrics import image_auroc, pixel_auroc  # noqa: E402
from supersimplenet.model import build_model  # noqa: E402
from supersimplenet.feature_cache import CACHE_DTYPES  # noqa: E402
from supersimplenet.train import build_optimizer, eval_loader, fit, train_step  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DTYPE_NAMES = {**{dtype: name for name, dtype in DTYPES.items()}, torch.float64: "fp64"}
ANOMALIB_LAYERS = {
    "wide_resnet50": ("wide_resnet50_2", ["layer2", "layer3"]),
    "efficientnet_lite0": ("tf_efficientnet_lite0", ["blocks.2", "blocks.4"]),
}
PAPER = {"latency_ms_batch1": 9.3, "throughput_batch16": 268.0, "gpu": "V100S, fp16, timing includes copies"}


# ----------------------------------------------------------------------------------------------------------------
# Timing and memory helpers
# ----------------------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds divided by the thread count) of one call."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - wall, (time.process_time() - cpu) / max(1, torch.get_num_threads())


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


class RssPeak:
    """Peak resident memory of a block, minus the resident memory before it (Linux, CPU).

    Before each call, free heap memory is handed back (malloc_trim) and glibc is told to serve every allocation
    above 64 KiB by mmap, so that memory an earlier configuration left in the heap does not hide this one's peak;
    the peak counter is reset through /proc/self/clear_refs. Elsewhere it falls back to ru_maxrss, which cannot be
    reset (then only the first and largest configuration is exact; the JSON says which method was used).
    """

    def __init__(self) -> None:
        self.method = "VmHWM after clear_refs"
        try:
            self.libc = ctypes.CDLL("libc.so.6")
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        except OSError:
            self.method = "ru_maxrss (not resettable)"

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        return 0

    def measure(self, fn: Callable[[], Any]) -> float:
        """MiB above the resident set before the call."""
        if self.method.startswith("ru_maxrss"):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            fn()
            return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before) / 2**20
        self.libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: large blocks by mmap, returned when freed
        gc.collect()
        self.libc.malloc_trim(0)  # free heap pages leave the resident set, so reusing them counts again
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            before = self._status("VmRSS")
            fn()
            return max(0, self._status("VmHWM") - before) / 2**20
        finally:
            self.libc.mallopt(-3, 32 * 2**20)  # back to a large threshold (mmap per tensor slows allocation)


def gpu_peak(fn: Callable[[], Any], device: torch.device) -> float:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def count_flops(fn: Callable[[], Any]) -> int:
    return sum(count_flops_by_dtype(fn).values())


class _DtypeFlopCounter(FlopCounterMode):
    """FlopCounterMode that also files each operator's FLOPs under the dtype of its first tensor input (the
    precision the operator computes in: a Lite0 bf16 run keeps its backbone in fp32)."""

    def __init__(self) -> None:
        super().__init__(display=False)
        self.by_dtype: dict[str, int] = {}

    def _count_flops(self, func_packet, out, args, kwargs):
        if func_packet in self.flop_registry:
            flops = int(self.flop_registry[func_packet](*args, **kwargs, out_val=out))
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            name = DTYPE_NAMES.get(first.dtype, str(first.dtype)) if first is not None else "fp32"
            self.by_dtype[name] = self.by_dtype.get(name, 0) + flops
        return super()._count_flops(func_packet, out, args, kwargs)


def count_flops_by_dtype(fn: Callable[[], Any]) -> dict[str, int]:
    """FLOPs of one call of ``fn``, by the dtype each operator computes in."""
    with _DtypeFlopCounter() as counter:
        fn()
    return {dtype: flops for dtype, flops in counter.by_dtype.items() if flops}


def matmul_peak(device: torch.device, dtype: torch.dtype, *, size: int, seconds: float = 3.0) -> dict[str, float]:
    """Best GFLOP/s of a square torch.mm over a few seconds (the machine's practical matmul peak), by wall time and
    by process CPU time / threads (the latter is what the cpu-time fractions divide by)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    torch.mm(a, b, out=out)
    rates, cpu_rates = [], []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(rates) < 3:
        wall, cpu = timed(lambda: torch.mm(a, b, out=out), device)
        rates.append(2 * size**3 / wall / 1e9)
        cpu_rates.append(2 * size**3 / max(cpu, 1e-9) / 1e9)
    return {
        "gflops_best": max(rates),
        "gflops_median": statistics.median(rates),
        "gflops_cpu_time_best": max(cpu_rates),
        "size": size,
        "n": len(rates),
    }


# ----------------------------------------------------------------------------------------------------------------
# The implementations
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Impl:
    name: str  # ours-ref, ours-fast, anomalib
    dtype: str
    infer: Callable[[torch.Tensor], Any]
    note: str = ""
    params: int | None = None
    counted: Callable[[torch.Tensor], Any] | None = None  # what FLOPs are counted on (a CUDA graph hides them)


@dataclass
class Trainer:
    name: str
    step: Callable[[int], Any]  # batch size -> one optimisation step
    note: str = ""


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def build_ours(backbone: str, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone, image_score="map_top1"))  # random heads: no memory
    load_backbone_weights(
        model.feature_extractor.backbone, backbone, "random" if backbone == "wide_resnet50" else "default"
    )
    return model.to(device).eval()


def build_anomalib(backbone: str, device: torch.device, ours: torch.nn.Module) -> tuple[torch.nn.Module | None, str]:
    """anomalib's SupersimplenetModel with the same backbone architecture and weights, or (None, why not)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from anomalib.models.image.supersimplenet import torch_model as anomalib_model  # noqa: PLC0415 (anomalib: the optional bench extra, skipped without it)
    except Exception as error:  # noqa: BLE001 - not installed, or an import-time failure of its many dependencies
        return None, f"anomalib not importable ({type(error).__name__}: {error}); install the '.[bench]' extra"
    timm_name, layers = ANOMALIB_LAYERS[backbone]
    original = anomalib_model.TimmFeatureExtractor
    # Its extractor asks timm for pretrained weights (a download); build it without, then copy ours in.
    anomalib_model.TimmFeatureExtractor = functools.partial(original, pre_trained=False)
    try:
        torch.manual_seed(0)
        model = anomalib_model.SupersimplenetModel(
            backbone=timm_name, layers=layers, stop_grad=True, adapt_cls_features=False
        )
    finally:
        anomalib_model.TimmFeatureExtractor = original
    extractor = model.feature_extractor.feature_extractor  # anomalib's TimmFeatureExtractor
    note = ""
    if backbone == "efficientnet_lite0":
        # timm's EfficientNet feature wrapper keeps the blocks after stride 16 (blocks 5-6, run and counted for
        # nothing); our extractor drops them. Swap in ours (same timm class, same weights) so that both models
        # have the same architecture and parameter count.
        extractor.feature_extractor = build_feature_extractor(backbone)
        note = "timm extractor swapped for ours (blocks 5-6 dropped), same weights"
    missing = extractor.feature_extractor.load_state_dict(ours.feature_extractor.backbone.state_dict(), strict=False)
    if missing.missing_keys:
        note += f" (backbone keys not copied: {missing.missing_keys[:3]})"
    return model.to(device).eval(), note.strip()


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def make_impls(
    backbone: str, device: torch.device, dtypes: list[str], *, anomalib_dtypes: list[str], cuda_graphs: bool
) -> tuple[list[Impl], torch.nn.Module, torch.nn.Module | None, str]:
    ours = build_ours(backbone, device)
    anomalib, anomalib_note = build_anomalib(backbone, device, ours)
    impls = []
    for label in dtypes:
        dtype = DTYPES[label]

        def ref(x, dtype=dtype):
            with torch.inference_mode(), autocast(device, dtype):
                return ours(x)

        impls.append(
            Impl("ours-ref", label, ref, "reference model" + (", autocast" if label != "fp32" else ""), n_params(ours))
        )
        fast = FastSuperSimpleNet.from_model(ours, dtype=dtype)
        note = (
            f"fast path, heads={fast.heads}, {fast.folded_batchnorms} BN folded, "
            f"backbone {str(fast.backbone_dtype).replace('torch.', '')}"
        )
        infer = fast
        if cuda_graphs and device.type == "cuda":
            infer, note = CudaGraphed(fast), note + ", CUDA graph"
        impls.append(Impl("ours-fast", label, infer, note, None, counted=fast))
    if anomalib is not None:
        for label in anomalib_dtypes:
            dtype = DTYPES[label]

            def run(x, dtype=dtype):
                with torch.inference_mode(), autocast(device, dtype):
                    return anomalib(x)

            impls.append(
                Impl(
                    "anomalib",
                    label,
                    run,
                    anomalib_note + (", autocast" if label != "fp32" else ""),
                    n_params(anomalib),
                )
            )
    return impls, ours, anomalib, anomalib_note


class CudaGraphed:
    """Replays a captured CUDA graph of a fast model per input shape (static input buffer)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.graphs: dict[tuple, tuple[Any, torch.Tensor, Any]] = {}

    def __call__(self, x: torch.Tensor) -> Any:
        key = tuple(x.shape)
        if key not in self.graphs:
            static = x.clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    self.model(static)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.model(static)
            self.graphs[key] = (graph, static, out)
        graph, static, out = self.graphs[key]
        static.copy_(x)
        graph.replay()
        return out


def make_trainers(
    backbone: str, device: torch.device, ours: torch.nn.Module, anomalib: torch.nn.Module | None, anomalib_note: str
) -> list[Trainer]:
    size = ours.config.image_size
    optimizer = build_optimizer(ours, TrainConfig())

    stored: dict[tuple[int, str], list[torch.Tensor]] = {}

    def ours_step(batch: int, precision: str, blocked: bool = True, cached: bool = False) -> None:
        """One `train_step` on random images, or (`cached`) a step of a later epoch with the training feature cache:
        backbone levels stored once in the cache's dtype (outside the timed step), read back as
        `FeatureCache.batch` does."""
        if cached and (batch, precision) not in stored:
            levels = ours.feature_extractor.levels(torch.randn(batch, 3, *size, device=device))
            stored[batch, precision] = [level.to(CACHE_DTYPES[precision]) for level in levels]
        ours.train()
        ours.segmentation_head.blocked = blocked
        data = {
            "mask": torch.zeros(batch, 1, *size, device=device),
            "label": torch.zeros(batch, device=device),
            "segmented": torch.zeros(batch, dtype=torch.bool, device=device),
        }
        if cached:
            rows = torch.arange(batch, device=device)
            data["levels"] = [level.index_select(0, rows).float() for level in stored[batch, precision]]
        else:
            data["image"] = torch.randn(batch, 3, *size, device=device)
        train_step(ours, data, optimizer, TrainConfig(precision=precision), device=device)
        ours.segmentation_head.blocked = True
        ours.eval()

    trainers = [
        Trainer(
            "ours cached",
            functools.partial(ours_step, precision="fp32", cached=True),
            "train_step on stored backbone levels (supersimplenet.feature_cache: every epoch after the first)",
        ),
        Trainer(
            "ours cached bf16",
            functools.partial(ours_step, precision="bf16", cached=True),
            "the same with bfloat16 levels and bf16 autocast",
        ),
        Trainer(
            "ours",
            functools.partial(ours_step, precision="fp32"),
            "supersimplenet.train.train_step (blocked segmentation head on CPU)",
        ),
        Trainer(
            "ours bf16",
            functools.partial(ours_step, precision="bf16"),
            "train_step with TrainConfig(precision='bf16'): adaptor and heads under bf16 autocast",
        ),
        Trainer(
            "ours layers",
            functools.partial(ours_step, precision="fp32", blocked=False),
            "train_step with the segmentation head run as its layers (the step before the blocked path)",
        ),
        Trainer(
            "ours layers bf16", functools.partial(ours_step, precision="bf16", blocked=False), "the same, bf16 autocast"
        ),
    ]
    if anomalib is not None:
        from anomalib.models.image.supersimplenet.loss import SSNLoss  # noqa: PLC0415 (anomalib: the optional bench extra, skipped without it)

        loss_fn = SSNLoss()
        # The optimiser of anomalib's Lightning module (configure_optimizers), built by hand.
        anomalib_optimizer = torch.optim.AdamW(
            [
                {"params": anomalib.adaptor.parameters(), "lr": 1e-4},
                {"params": anomalib.segdec.parameters(), "lr": 2e-4, "weight_decay": 1e-5},
            ]
        )

        def anomalib_step(batch: int) -> None:
            anomalib.train()
            images = torch.randn(batch, 3, *size, device=device)
            masks = torch.zeros(batch, *size, device=device)
            labels = torch.zeros(batch, device=device)
            anomaly_map, score, masks, labels = anomalib(images, masks, labels)
            loss = loss_fn(pred_map=anomaly_map, pred_score=score, target_mask=masks, target_label=labels)
            anomalib_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            anomalib_optimizer.step()
            anomalib.eval()

        trainers.append(
            Trainer(
                "anomalib",
                anomalib_step,
                "torch model forward + SSNLoss + AdamW (its Lightning optimiser groups); " + anomalib_note,
            )
        )
    return trainers


# ----------------------------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------------------------


def interleaved(
    fns: list[Callable[[], Any]],
    device: torch.device,
    *,
    repeats: int,
    warmup: int,
    budget_s: float,
    min_rounds: int = 3,
    memory: Callable[[Callable[[], Any]], float] | None = None,
) -> list[dict[str, Any]]:
    """Warm-up, then rounds of every fn in turn: `repeats` rounds, fewer (not under `min_rounds`) when a round
    takes more than `budget_s / repeats`, more (up to 4x) when rounds are cheap, since medians of cheap, noisy
    configurations need them.

    `memory(fn)` runs fn and returns its peak memory: one extra, untimed call after the warm-up (steady state),
    or without warm-up (the one-step training runs) the last timed call, whose time then includes the accounting
    (gc, malloc_trim, page faults of fresh mappings: well under 1 % of such a step)."""
    first = [0.0] * len(fns)
    peaks: list[float | None] = [None] * len(fns)
    for _ in range(warmup):
        for index, fn in enumerate(fns):
            first[index] = timed(fn, device)[0]
    if memory is not None and warmup:
        for index, fn in enumerate(fns):
            peaks[index] = memory(fn)
    fits = math.floor(budget_s / max(sum(first), 1e-9)) if warmup else repeats
    rounds = max(min(min_rounds, repeats), min(4 * repeats, fits))
    walls: list[list[float]] = [[] for _ in fns]
    cpus: list[list[float]] = [[] for _ in fns]
    for round_index in range(rounds):
        for index, fn in enumerate(fns):
            if memory is not None and not warmup and round_index == rounds - 1:
                holder: list[float] = []
                wall, cpu = timed(lambda fn=fn, holder=holder: holder.append(memory(fn)), device)
                peaks[index] = holder[0]
            else:
                wall, cpu = timed(fn, device)
            walls[index].append(wall)
            cpus[index].append(cpu)
    return [{"wall": summary(w), "cpu": summary(c), "peak_memory_mib": p} for w, c, p in zip(walls, cpus, peaks)]


def bench_backbone(
    backbone: str,
    args: argparse.Namespace,
    device: torch.device,
    peaks: dict[str, float],
    cpu_peaks: dict[str, float],
    rss: RssPeak | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    started = time.perf_counter()
    impls, ours, anomalib, anomalib_note = make_impls(
        backbone, device, args.dtypes, anomalib_dtypes=args.anomalib_dtypes, cuda_graphs=args.cuda_graphs
    )
    size = ours.config.image_size
    out: dict[str, Any] = {
        "backbone": backbone,
        "image_size": list(size),
        "anomalib": anomalib_note or ("not available" if anomalib is None else "as shipped"),
        "inference": [],
        "train": [],
    }
    # "in optimiser": what each training step updates (the adaptor and both heads).
    out["params"] = {
        "ours": n_params(ours),
        "ours_in_optimiser": sum(n_params(m) for m in ours.trainable_modules().values()),
    }
    if anomalib is not None:
        out["params"].update(
            {
                "anomalib": n_params(anomalib),
                "anomalib_in_optimiser": n_params(anomalib.adaptor) + n_params(anomalib.segdec),
            }
        )
    log(f"[{backbone}] params {out['params']}")

    one = torch.randn(1, 3, *size, device=device)
    flops, flops_by_dtype = {}, {}
    for impl in impls:
        split = count_flops_by_dtype(lambda impl=impl: (impl.counted or impl.infer)(one))
        flops_by_dtype[(impl.name, impl.dtype)] = split
        flops[(impl.name, impl.dtype)] = sum(split.values())
    out["flops_per_image"] = {f"{n}/{d}": f for (n, d), f in flops.items()}
    out["flops_per_image_by_dtype"] = {f"{n}/{d}": f for (n, d), f in flops_by_dtype.items()}
    nominal = flops.get(("ours-ref", "fp32")) or max(flops.values())
    log(f"[{backbone}] FLOPs/image {out['flops_per_image']}")

    memory = (lambda fn: gpu_peak(fn, device)) if device.type == "cuda" else (rss.measure if rss else None)
    for batch in args.batches:
        x = torch.randn(batch, 3, *size, device=device)
        stats = interleaved(
            [lambda impl=impl, x=x: impl.infer(x) for impl in impls],
            device,
            repeats=args.repeats,
            warmup=args.warmup,
            budget_s=args.budget,
            memory=memory,
        )
        for impl, stat in zip(impls, stats):
            peak = peaks.get(impl.dtype) or peaks.get("fp32")
            ips = batch / stat["wall"]["median"]
            row = {
                "backbone": backbone,
                "impl": impl.name,
                "dtype": impl.dtype,
                "batch": batch,
                "latency_ms": {k: v * 1000 if k != "n" else v for k, v in stat["wall"].items()},
                "cpu_time_ms": {k: v * 1000 if k != "n" else v for k, v in stat["cpu"].items()},
                "images_per_s": ips,
                "images_per_s_cpu_time": batch / stat["cpu"]["median"],
                "flops_per_image": flops[(impl.name, impl.dtype)],
                "executed_gflops": flops[(impl.name, impl.dtype)] * ips / 1e9,
                "executed_fraction_of_peak": flops[(impl.name, impl.dtype)] * ips / 1e9 / peak,
                "nominal_fraction_of_peak": nominal * ips / 1e9 / peak,
                "executed_fraction_of_peak_cpu_time": flops[(impl.name, impl.dtype)]
                * batch
                / stat["cpu"]["median"]
                / 1e9
                / cpu_peaks.get(impl.dtype, cpu_peaks.get("fp32", peak)),
                "nominal_fraction_of_peak_cpu_time": nominal
                * batch
                / stat["cpu"]["median"]
                / 1e9
                / cpu_peaks.get(impl.dtype, cpu_peaks.get("fp32", peak)),
                "peak_used": impl.dtype if impl.dtype in peaks else "fp32",
                # the roofline of a mixed-precision graph: each FLOP at the peak of the dtype it computes in
                "mixed_fraction_of_peak": ips
                * sum(
                    f / 1e9 / (peaks.get(d) or peaks["fp32"])
                    for d, f in flops_by_dtype[(impl.name, impl.dtype)].items()
                ),
                "flops_by_dtype": flops_by_dtype[(impl.name, impl.dtype)],
                "peak_memory_mib": stat["peak_memory_mib"],
                "note": impl.note,
            }
            out["inference"].append(row)
            log(
                f"[{backbone}] b{batch} {impl.name:9s} {impl.dtype}: {row['latency_ms']['median']:9.1f} ms "
                f"({row['latency_ms']['min']:.1f}-{row['latency_ms']['max']:.1f}), {ips:7.2f} img/s"
            )
        del x

    if args.train_batches:
        trainers = make_trainers(backbone, device, ours, anomalib, anomalib_note)
        train_flops = {t.name: count_flops(lambda t=t: t.step(1)) for t in trainers}
        # Nominal FLOPs: the blocked head recomputes its hidden blocks in the backward (executed FLOPs above the
        # model's); every one of our rows is rated by the work of the reference step.
        train_flops.update({name: train_flops["ours layers"] for name in train_flops if name.startswith("ours")})
        for batch in args.train_batches:
            big = batch >= 32 and backbone == "wide_resnet50" and device.type == "cpu"
            stats = interleaved(
                [lambda t=t, batch=batch: t.step(batch) for t in trainers],
                device,
                repeats=1 if big else args.train_repeats,
                warmup=0 if big else 1,
                budget_s=args.budget,
                min_rounds=1,
                memory=memory,
            )
            for trainer, stat in zip(trainers, stats):
                ips = batch / stat["wall"]["median"]
                row = {
                    "backbone": backbone,
                    "impl": trainer.name,
                    "batch": batch,
                    "step_ms": {k: v * 1000 if k != "n" else v for k, v in stat["wall"].items()},
                    "cpu_time_ms": {k: v * 1000 if k != "n" else v for k, v in stat["cpu"].items()},
                    "images_per_s": ips,
                    "flops_per_image": train_flops[trainer.name],
                    "fraction_of_peak": train_flops[trainer.name] * ips / 1e9 / peaks["fp32"],
                    "repeats_note": ("1 timed step, no warm-up, memory accounted in it" if big else ""),
                    "peak_memory_mib": stat["peak_memory_mib"],
                    "note": trainer.note,
                }
                out["train"].append(row)
                log(
                    f"[{backbone}] train b{batch} {trainer.name:9s}: {row['step_ms']['median']:9.1f} ms "
                    f"({row['step_ms']['min']:.1f}-{row['step_ms']['max']:.1f})"
                )
    out["seconds"] = time.perf_counter() - started
    return out


# ----------------------------------------------------------------------------------------------------------------
# bf16 accuracy on real data
# ----------------------------------------------------------------------------------------------------------------


def auroc_check(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """Trains a Lite0 model briefly on the weld train split, then scores the test split in fp32 and bf16."""
    root = Path(args.data)
    samples = read_layout(root)
    size = tuple(args.auroc_size)
    started = time.perf_counter()
    if args.auroc_checkpoint and Path(args.auroc_checkpoint).is_file():
        model, metadata = load_checkpoint(args.auroc_checkpoint)
        size, epochs = tuple(model.config.image_size), metadata.get("epochs")
        log(f"[auroc] loaded {args.auroc_checkpoint}")
    else:
        model_config = recommended_model_config("efficientnet_lite0", image_size=size)
        result = fit(
            data_root=root,
            samples=samples,
            model_config=model_config,
            train_config=TrainConfig(epochs=args.auroc_epochs, batch_size=16, seed=42),
            progress=False,
        )
        model, epochs = result.model, args.auroc_epochs
        if args.auroc_checkpoint:
            save_checkpoint(args.auroc_checkpoint, model, metadata={"epochs": epochs, "data": str(root)})
    train_s = time.perf_counter() - started
    model = model.eval()
    preset = get_preset("efficientnet_lite0")
    test = DefectDataset(
        root=root, samples=[s for s in samples if s.split == "test"], image_size=size, mean=preset.mean, std=preset.std
    )
    images, labels, masks = [], [], []
    for batch in eval_loader(test, batch_size=16):
        images.append(batch["image"])
        labels.append(batch["label"])
        masks.append(batch["mask"])
    images, labels, masks = torch.cat(images), torch.cat(labels).long(), torch.cat(masks)
    variants = {
        "ours-ref fp32": lambda x: model(x),
        "ours-fast fp32": FastSuperSimpleNet.from_model(model),
        "ours-fast-separable fp32": FastSuperSimpleNet.from_model(model, heads="separable"),
        "ours-fast bf16 (default: fp32 backbone)": FastSuperSimpleNet.from_model(model, dtype=torch.bfloat16),
        "ours-fast-separable bf16": FastSuperSimpleNet.from_model(model, dtype=torch.bfloat16, heads="separable"),
        "ours-fast bf16, bf16 backbone": FastSuperSimpleNet.from_model(
            model, dtype=torch.bfloat16, backbone_dtype=torch.bfloat16
        ),
    }

    def ref_bf16(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x)

    variants["ours-ref bf16 (autocast)"] = ref_bf16
    outputs = {}
    with torch.inference_mode():
        for name, fn in variants.items():
            parts = [fn(images[i : i + 16]) for i in range(0, len(images), 16)]
            outputs[name] = (
                torch.cat([p.score.float() for p in parts]),
                torch.cat([p.anomaly_map.float() for p in parts]),
            )
    base_scores, base_maps = outputs["ours-ref fp32"]
    rows = {}
    for name, (scores, maps) in outputs.items():
        rows[name] = {
            "image_auroc": 100 * image_auroc(scores.numpy(), labels.numpy()),
            "pixel_auroc": 100 * pixel_auroc(maps[:, 0].numpy(), masks[:, 0].numpy().astype("uint8")),
            "max_abs_score_diff": float((scores - base_scores).abs().max()),
            "max_abs_map_diff": float((maps - base_maps).abs().max()),
            "mean_abs_map_diff": float((maps - base_maps).abs().mean()),
        }
        log(
            f"[auroc] {name:40s} I-AUROC {rows[name]['image_auroc']:.2f}  P-AUROC {rows[name]['pixel_auroc']:.2f}  "
            f"max|d score| {rows[name]['max_abs_score_diff']:.2e}  max|d map| {rows[name]['max_abs_map_diff']:.2e}"
        )
    return {
        "data": str(root),
        "image_size": list(size),
        "epochs": epochs,
        "train_seconds": train_s,
        "test_images": int(len(images)),
        "defective": int(labels.sum()),
        "variants": rows,
    }


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def fmt_range(d: dict[str, float]) -> str:
    return f"{d['median']:.1f} ({d['min']:.1f}-{d['max']:.1f})"


def table(results: dict[str, Any]) -> str:
    lines = []
    if "matmul_peak" not in results:  # --auroc-only
        return "\n".join(
            f"{name:40s} image AUROC {row['image_auroc']:.2f}  pixel AUROC {row['pixel_auroc']:.2f}  "
            f"max |d score| {row['max_abs_score_diff']:.1e}  max |d map| {row['max_abs_map_diff']:.1e}"
            for name, row in results["auroc"]["variants"].items()
        )
    peaks = results["matmul_peak_gflops"]
    lines.append(
        "matmul peak (best GFLOP/s of torch.mm, start / end of run): "
        + ", ".join(
            f"{k} {v['start']['gflops_best']:.0f} / {v['end']['gflops_best']:.0f}"
            for k, v in results["matmul_peak"].items()
        )
    )
    lines.append(
        f"peak used for fractions: {', '.join(f'{k} {v:.0f}' for k, v in peaks.items())} GFLOP/s (wall), "
        + ", ".join(f"{k} {v:.0f}" for k, v in results["matmul_peak_gflops_cpu_time"].items())
        + " GFLOP/s (cpu time)"
    )
    header = (
        "| backbone | impl | dtype | batch | wall ms median (min-max) | img/s | cpu-time ms median | "
        "GFLOP/img executed | % peak executed (wall / cpu-time) | % peak nominal (wall / cpu-time) | "
        "peak RSS MiB |"
    )
    lines += ["", header, "|" + "---|" * (header.count("|") - 1)]
    for bench in results["backbones"]:
        for row in bench["inference"]:
            executed, nominal = (
                f"{100 * row[f'{kind}_fraction_of_peak']:.0f} / {100 * row[f'{kind}_fraction_of_peak_cpu_time']:.0f}"
                for kind in ("executed", "nominal")
            )
            memory = row["peak_memory_mib"] if row["peak_memory_mib"] is not None else float("nan")
            lines.append(
                f"| {row['backbone']} | {row['impl']} | {row['dtype']} | {row['batch']} "
                f"| {fmt_range(row['latency_ms'])} | {row['images_per_s']:.2f} | {row['cpu_time_ms']['median']:.1f} "
                f"| {row['flops_per_image'] / 1e9:.1f} | {executed} | {nominal} | {memory:.0f} |"
            )
    header = (
        "| backbone | impl | train batch | step ms median (min-max) | img/s | GFLOP/img (fwd+bwd) | % fp32 peak "
        "| peak RSS MiB | note |"
    )
    lines += ["", header, "|" + "---|" * (header.count("|") - 1)]
    for bench in results["backbones"]:
        for row in bench["train"]:
            lines.append(
                f"| {row['backbone']} | {row['impl']} | {row['batch']} | {fmt_range(row['step_ms'])} | "
                f"{row['images_per_s']:.2f} | {row['flops_per_image'] / 1e9:.1f} | "
                f"{100 * row['fraction_of_peak']:.0f} | "
                f"{row['peak_memory_mib'] if row['peak_memory_mib'] is not None else float('nan'):.0f} | "
                f"{row['repeats_note']} |"
            )
    lines.append("")
    for bench in results["backbones"]:
        lines.append(f"{bench['backbone']}: params {bench['params']}; anomalib: {bench['anomalib']}")
    if results.get("targets"):
        lines.append("")
        for target in results["targets"]:
            lines.append(f"[{'met' if target['met'] else 'NOT met'}] {target['target']}: {target['value']}")
    if results.get("auroc"):
        lines.append("")
        for name, row in results["auroc"]["variants"].items():
            lines.append(
                f"{name:40s} image AUROC {row['image_auroc']:.2f}  pixel AUROC {row['pixel_auroc']:.2f}  "
                f"max |d score| {row['max_abs_score_diff']:.1e}  max |d map| {row['max_abs_map_diff']:.1e}"
            )
    return "\n".join(lines)


def targets(results: dict[str, Any], backbone: str) -> list[dict[str, Any]]:
    """The issue's CPU targets, evaluated on one backbone's rows."""
    rows = {
        (r["impl"], r["dtype"], r["batch"]): r
        for b in results["backbones"]
        if b["backbone"] == backbone
        for r in b["inference"]
    }
    found = []

    def get(impl, dtype, batch):
        return rows.get((impl, dtype, batch))

    a16, f16, b16 = get("anomalib", "fp32", 16), get("ours-fast", "fp32", 16), get("ours-fast", "bf16", 16)
    a1, f1 = get("anomalib", "fp32", 1), get("ours-fast", "fp32", 1)
    if a16 and f16:
        ratio = f16["images_per_s"] / a16["images_per_s"]
        found.append(
            {
                "target": f"{backbone}: batch-16 throughput >= 1.25x anomalib (fp32)",
                "met": ratio >= 1.25,
                "value": f"{ratio:.2f}x",
            }
        )
    if a1 and f1:
        ratio = f1["latency_ms"]["median"] / a1["latency_ms"]["median"]
        found.append(
            {
                "target": f"{backbone}: batch-1 latency <= 0.8x anomalib (fp32)",
                "met": ratio <= 0.8,
                "value": f"{ratio:.2f}x",
            }
        )
    if a16 and b16:
        ratio = b16["images_per_s"] / a16["images_per_s"]
        found.append(
            {
                "target": f"{backbone}: bf16 batch-16 throughput >= 2x anomalib fp32",
                "met": ratio >= 2,
                "value": f"{ratio:.2f}x",
            }
        )
    if b16 and set(b16.get("flops_by_dtype", {})) - {"bf16"}:
        fraction = b16["mixed_fraction_of_peak"]
        split = ", ".join(f"{d} {f / 1e9:.2f}" for d, f in b16["flops_by_dtype"].items())
        found.append(
            {
                "target": f"{backbone}: ours-fast bf16 batch 16 rate >= 70% of the peak of the dtype each "
                f"FLOP runs in (GFLOP/img {split}), wall time",
                "met": fraction >= 0.7,
                "value": f"{100 * fraction:.0f}%",
            }
        )
    train = {(r["impl"], r["batch"]): r for b in results["backbones"] if b["backbone"] == backbone for r in b["train"]}
    for (impl, batch), row in sorted(train.items()):
        anomalib = train.get(("anomalib", batch))
        goal = {"ours": 2.0, "ours bf16": 3.0, "ours cached": 2.0, "ours cached bf16": 3.0}.get(impl)
        if anomalib and goal:
            ratio = row["images_per_s"] / anomalib["images_per_s"]
            found.append(
                {
                    "target": f"{backbone}: {impl} training img/s >= {goal:.0f}x anomalib's (fp32), batch {batch}",
                    "met": ratio >= goal,
                    "value": f"{ratio:.2f}x",
                }
            )
    for row in (f16, b16):
        if row:
            for kind in ("nominal", "executed"):
                fraction = row[f"{kind}_fraction_of_peak"]
                found.append(
                    {
                        "target": f"{backbone}: ours-fast {row['dtype']} batch 16 rate >= 70% of the "
                        f"{row['peak_used']} matmul peak, {kind} FLOPs, wall time",
                        "met": fraction >= 0.7,
                        "value": f"{100 * fraction:.0f}% (cpu-time based: "
                        f"{100 * row[f'{kind}_fraction_of_peak_cpu_time']:.0f}%)",
                    }
                )
    return found


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtypes", nargs="+", default=None, choices=list(DTYPES))
    parser.add_argument(
        "--anomalib-dtypes",
        nargs="+",
        default=None,
        choices=list(DTYPES),
        help="dtypes anomalib runs in (default: fp32 on CPU, all --dtypes on CUDA)",
    )
    parser.add_argument("--batches", nargs="+", type=int, default=None, help="inference batch sizes")
    parser.add_argument("--train-batches", nargs="*", type=int, default=None, help="training batch sizes")
    parser.add_argument(
        "--backbones",
        nargs="+",
        default=["wide_resnet50", "efficientnet_lite0"],
        choices=["wide_resnet50", "efficientnet_lite0"],
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="timed rounds per configuration (fewer for slow ones, up to 4x for cheap ones)",
    )
    parser.add_argument("--train-repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--budget", type=float, default=40.0, help="seconds of timed rounds per configuration")
    parser.add_argument("--cuda-graphs", action="store_true", help="replay the fast path as CUDA graphs")
    parser.add_argument("--quick", action="store_true", help="short run: Lite0 only, fewer repeats")
    parser.add_argument("--train-only", action="store_true", help="only the training steps (no inference rows)")
    parser.add_argument("--auroc", action="store_true", help="also train briefly and compare bf16 vs fp32 AUROC")
    parser.add_argument("--auroc-only", action="store_true")
    parser.add_argument("--auroc-epochs", type=int, default=4)
    parser.add_argument("--auroc-size", type=int, nargs=2, default=(256, 128), metavar=("H", "W"))
    parser.add_argument(
        "--auroc-checkpoint",
        default=str(ROOT / "bench_results/weld_lite0.pt"),
        help="reused when it exists, written after training otherwise ('' to neither)",
    )
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/battery_weld/denoised"))
    parser.add_argument("--out", default=str(ROOT / "bench_results/inference.json"))
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    args.dtypes = args.dtypes or ["fp32", "bf16"]
    args.anomalib_dtypes = args.anomalib_dtypes or (args.dtypes if cuda else ["fp32"])
    args.batches = args.batches or ([1, 16, 64] if cuda else [1, 16])
    if args.train_batches is None:
        args.train_batches = [8, 32]
    if args.quick:
        args.backbones = ["efficientnet_lite0"] if "--backbones" not in (argv or sys.argv) else args.backbones
        args.repeats, args.train_repeats, args.budget = 5, 1, 20.0
        args.batches = [b for b in args.batches if b <= 16]
        args.train_batches = [8]
    if args.train_only:
        args.batches = []
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", flush=True)

    results: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "load_average_start": os.getloadavg(),
        },
        "paper": PAPER,
        "backbones": [],
    }
    with contextlib.suppress(ImportError):
        import anomalib  # noqa: PLC0415 (anomalib: the optional bench extra, version if installed)

        results["machine"]["anomalib"] = anomalib.__version__
    if args.auroc_only:
        results["auroc"] = auroc_check(args, log)
    else:
        size = 8192 if device.type == "cuda" else 2048
        results["matmul_peak"] = {d: {"start": matmul_peak(device, DTYPES[d], size=size)} for d in args.dtypes}
        log(
            "matmul peak "
            + ", ".join(f"{d} {v['start']['gflops_best']:.0f} GFLOP/s" for d, v in results["matmul_peak"].items())
        )
        rss = RssPeak() if device.type == "cpu" else None
        results["peak_memory_method"] = rss.method if rss else "torch.cuda.max_memory_allocated"
        peaks = {d: v["start"]["gflops_best"] for d, v in results["matmul_peak"].items()}
        cpu_peaks = {d: v["start"]["gflops_cpu_time_best"] for d, v in results["matmul_peak"].items()}
        for backbone in args.backbones:
            results["backbones"].append(bench_backbone(backbone, args, device, peaks, cpu_peaks, rss, log))
        for d in args.dtypes:
            results["matmul_peak"][d]["end"] = matmul_peak(device, DTYPES[d], size=size)
        results["matmul_peak_gflops"] = {
            d: max(v["start"]["gflops_best"], v["end"]["gflops_best"]) for d, v in results["matmul_peak"].items()
        }
        results["matmul_peak_gflops_cpu_time"] = {
            d: max(v["start"]["gflops_cpu_time_best"], v["end"]["gflops_cpu_time_best"])
            for d, v in results["matmul_peak"].items()
        }
        for bench in results["backbones"]:
            for row in bench["inference"]:
                key = row["peak_used"]
                scale = cpu_peaks[key] / results["matmul_peak_gflops_cpu_time"][key]
                row["executed_fraction_of_peak_cpu_time"] *= scale
                row["nominal_fraction_of_peak_cpu_time"] *= scale
        if results["matmul_peak_gflops"] != peaks:  # recompute the fractions against the better peak
            for bench in results["backbones"]:
                for row in bench["inference"]:
                    scale = peaks[row["peak_used"]] / results["matmul_peak_gflops"][row["peak_used"]]
                    row["executed_fraction_of_peak"] *= scale
                    row["nominal_fraction_of_peak"] *= scale
                for row in bench["train"]:
                    row["fraction_of_peak"] *= peaks["fp32"] / results["matmul_peak_gflops"]["fp32"]
        if device.type == "cpu":
            results["targets"] = [t for b in args.backbones for t in targets(results, b)]
        if args.auroc:
            results["auroc"] = auroc_check(args, log)
    results["machine"]["load_average_end"] = os.getloadavg()
    results["seconds"] = time.perf_counter() - started
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=float))
    print(table(results))
    log(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
