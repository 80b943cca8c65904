"""Where the fast path's time goes, stage by stage, at one batch size (not a test: prints a table, writes JSON).

    .venv/bin/python bench/profile_fast.py                                  # Lite0, 256x256, batch 16, fp32
    .venv/bin/python bench/profile_fast.py --backbone wide_resnet50 --dtype bf16

Stages: the backbone (whole batch at once, and in `BACKBONE_MICRO_BATCH` micro-batches as the fast path runs it),
the heads, the segmentation head as convolutions and as the fast path's blocked matrix products, the map
post-processing as upsample + convolutions and as the fast path's matrices, and the whole forward. Each is timed
after a warm-up (median of --repeats) and its FLOPs counted with torch.utils.flop_counter; the fraction is of the
torch.mm 2048x2048 rate measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "model")]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from supersimplenet import fast as fast_module  # noqa: E402
from supersimplenet.backbones import load_backbone_weights  # noqa: E402
from supersimplenet.config import ModelConfig  # noqa: E402
from supersimplenet.model import build_model  # noqa: E402


def timed(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="efficientnet_lite0", choices=["efficientnet_lite0", "wide_resnet50"])
    parser.add_argument("--size", type=int, nargs=2, default=[256, 256], metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "bench_results/profile_fast.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    torch.manual_seed(0)
    # the heads' cost with random heads: the map's score (a "memory" model would need its memory built first)
    config = ModelConfig(backbone=args.backbone, image_size=tuple(args.size), image_score="map_top1")
    model = build_model(config).eval()
    if args.backbone == "efficientnet_lite0":
        load_backbone_weights(model.feature_extractor.backbone, args.backbone, "default")
    net = fast_module.FastSuperSimpleNet.from_model(model, dtype=dtype)
    images = torch.randn(args.batch, 3, *args.size).contiguous(memory_format=torch.channels_last)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    peak = max(2 * 2048**3 / timed(lambda: a @ b, 10) for _ in range(3))
    if dtype == torch.bfloat16:
        a16, b16 = a.bfloat16(), b.bfloat16()
        peak = max(2 * 2048**3 / timed(lambda: a16 @ b16, 10) for _ in range(3))

    rows: list[dict] = []
    with torch.inference_mode():
        x = images.to(net.backbone_dtype)
        levels = [level.to(net.dtype) for level in net._backbone_levels(x)]
        stages = {
            "backbone, whole batch": lambda: net.backbone(x),
            f"backbone, micro-batches of {fast_module.BACKBONE_MICRO_BATCH}": lambda: net._backbone_levels(x),
            f"heads ({net.heads})": lambda: (net._separable_heads if net.heads == "separable" else net._folded_heads)(
                levels
            ),
            "whole forward": lambda: net.run(images),
        }
        if net.heads == "folded":
            height, width = levels[0].shape[-2:]
            up = [
                F.interpolate(level, size=(2 * height, 2 * width), mode="bilinear", align_corners=True)
                for level in levels
            ]
            features = F.avg_pool2d(torch.cat(up, 1), 3, 1, 1).contiguous(memory_format=torch.channels_last)
            if net.adaptor is not None:
                features = net.adaptor(features)

            def seg_convolutions():
                hidden = F.leaky_relu(F.conv2d(features, net.seg_weight, net.seg_bias), net.negative_slope)
                return F.conv2d(hidden, net.seg_out_weight)

            stages["segmentation head, convolutions"] = seg_convolutions
            stages["segmentation head, blocked matmuls"] = lambda: net._segmentation_logits(features)
            logits = seg_convolutions().float()
            size = tuple(args.size)

            def post_convolutions():
                maps = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
                r = net.blur_radius
                maps = F.conv2d(F.pad(maps, (0, 0, r, r), mode="reflect"), net.blur_h)
                return torch.sigmoid(F.conv2d(F.pad(maps, (r, r, 0, 0), mode="reflect"), net.blur_w))

            stages["post-processing, upsample + convolutions"] = post_convolutions
            stages["post-processing, matrices"] = lambda: net._postprocess(logits, logits.new_zeros(len(logits)), size)
        for name, fn in stages.items():
            seconds = timed(fn, args.repeats)
            count = flops(fn)
            rows.append(
                {
                    "stage": name,
                    "ms": seconds * 1000,
                    "gflop_per_image": count / args.batch / 1e9,
                    "percent_of_peak": 100 * count / seconds / peak,
                }
            )

    title = (
        f"{args.backbone} {args.dtype} batch {args.batch} at {args.size[0]}x{args.size[1]}, "
        f"{torch.get_num_threads()} threads, matmul peak {peak / 1e9:.0f} GFLOP/s"
    )
    print(title)
    print("| stage | ms (median) | GFLOP/img | % of peak |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['stage']} | {row['ms']:.1f} | {row['gflop_per_image']:.2f} | {row['percent_of_peak']:.0f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"title": title, "peak_gflops": peak / 1e9, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
