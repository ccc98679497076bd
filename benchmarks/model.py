# Copyright (c) align-detr contributors.
"""Benchmark: a whole detector on the CPU, ours against Hugging Face's Deformable DETR, in fp32
and under bfloat16 autocast.

Times inference and one training step (forward + backward + AdamW step) on one 512x512 image
with 10 boxes, each configuration in its own subprocess (so memory peaks do not mix), and prints
the ratios of the same run:

* ours: ``configs/dino_r50.yaml`` (DINO-4scale R50, 6 + 6 layers, 900 queries), denoising off
  (Hugging Face's model has none, so both do the same work);
* hf: ``transformers.DeformableDetrForObjectDetection`` with two-stage proposals and box
  refinement, 900 queries, R50, FFN 2048, random initialisation (47.5 M parameters, ours 47.7 M);
* precision: fp32, and bf16 = ``torch.autocast("cpu", torch.bfloat16)`` around the forward pass
  (what ``SOLVER.AMP.ENABLED`` does on the CPU), fp32 weights and optimizer.

    python benchmarks/model.py [--size 512] [--repeat 3] [--impls ours,hf] [opts...]

Needs ``transformers`` for the hf rows (``make bench`` installs it; without it they are skipped).
Absolute times on a shared machine are noise; compare the ratios of one run.
"""

import argparse
import contextlib
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOXES = [(20 + 40 * i, 30 + 30 * (i % 3), 80 + 40 * i, 120 + 30 * (i % 3)) for i in range(10)]


def _ours(size, opts):
    """(model, step(train) -> loss or outputs) for our model."""
    sys.path.insert(0, ROOT)
    from detectron2.modeling import build_model

    import align_detr.modeling  # noqa: F401  (registers the model)
    from align_detr.config import load_config
    from align_detr.utils.synthetic import batched_input, synthetic_image

    config = os.path.join(ROOT, "configs", "dino_r50.yaml")
    base = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.ALIGN_DETR.DN.ENABLED", "False"]
    model = build_model(load_config(config, base + list(opts)))
    img = synthetic_image(size, size, boxes=BOXES)
    batch = [batched_input(img, BOXES, [i % 5 for i in range(10)])]

    def step(train):
        out = model(batch)
        return sum(out.values()) if train else out

    return model, step


def _hf(size, opts):
    """(model, step) for Hugging Face's two-stage, box-refining Deformable DETR."""
    import torch
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig

    cfg = DeformableDetrConfig(
        use_timm_backbone=False,
        backbone_config=ResNetConfig(out_features=["stage2", "stage3", "stage4"]),
        use_pretrained_backbone=False,
        num_queries=900,
        two_stage=True,
        two_stage_num_proposals=900,
        with_box_refine=True,
        encoder_ffn_dim=2048,
        decoder_ffn_dim=2048,
        num_labels=80,
    )
    model = DeformableDetrForObjectDetection(cfg)
    pixels = torch.randn(1, 3, size, size)
    xyxy = torch.tensor(BOXES, dtype=torch.float32) / size
    boxes = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1)
    labels = [{"class_labels": torch.arange(10) % 5, "boxes": boxes}]

    def step(train):
        if train:
            return model(pixel_values=pixels, labels=labels).loss
        return model(pixel_values=pixels)

    return model, step


def measure(impl, precision, mode, size, repeat, opts):
    """Median seconds of ``repeat`` timed runs (after one warm-up) and the peak RSS."""
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    torch.manual_seed(0)
    model, step = (_ours if impl == "ours" else _hf)(size, opts)
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if precision == "bf16"
        else contextlib.nullcontext()
    )
    train = mode == "train_step"
    model.train(train)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4) if train else None
    times = []
    for _ in range(repeat + 1):
        t0 = time.perf_counter()
        if train:
            with autocast:
                loss = step(True)
            opt.zero_grad()
            loss.backward()
            opt.step()
        else:
            with torch.no_grad(), autocast:
                step(False)
        times.append(time.perf_counter() - t0)
    times = sorted(times[1:])  # the first run is a warm-up
    return {
        "impl": impl,
        "precision": precision,
        "mode": mode,
        "median_s": times[len(times) // 2],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "params": sum(p.numel() for p in model.parameters()),
    }


def run(size=512, repeat=3, impls=("ours", "hf"), precisions=("fp32", "bf16"), opts=()):
    """One dict per (impl, precision, mode), each measured in a fresh subprocess."""
    if "hf" in impls and importlib.util.find_spec("transformers") is None:
        print("transformers is not installed: skipping the Hugging Face rows", file=sys.stderr)
        impls = [i for i in impls if i != "hf"]
    rows = []
    for mode in ("inference", "train_step"):
        for precision in precisions:
            for impl in impls:
                cmd = [sys.executable, __file__, "--size", str(size), "--repeat", str(repeat)]
                cmd += ["--child", f"{impl},{precision},{mode}", *opts]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def ratios(rows):
    """(mode, what, ratio) lines: hf / ours per precision, fp32 / bf16 per implementation."""
    t = {(r["impl"], r["precision"], r["mode"]): r["median_s"] for r in rows}
    out = []
    for mode in ("inference", "train_step"):
        for p in ("fp32", "bf16"):
            if ("hf", p, mode) in t and ("ours", p, mode) in t:
                out.append((mode, f"hf / ours ({p})", t[("hf", p, mode)] / t[("ours", p, mode)]))
        for impl in ("ours", "hf"):
            if (impl, "fp32", mode) in t and (impl, "bf16", mode) in t:
                out.append(
                    (mode, f"{impl} fp32 / bf16", t[(impl, "fp32", mode)] / t[(impl, "bf16", mode)])
                )
        if ("hf", "fp32", mode) in t and ("ours", "bf16", mode) in t:
            out.append(
                (mode, "hf fp32 / ours bf16", t[("hf", "fp32", mode)] / t[("ours", "bf16", mode)])
            )
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--impls", default="ours,hf")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides (ours)")
    args = parser.parse_args()
    if args.child:
        impl, precision, mode = args.child.split(",")
        print(json.dumps(measure(impl, precision, mode, args.size, args.repeat, args.opts)))
        return
    rows = run(args.size, args.repeat, args.impls.split(","), args.precisions.split(","), args.opts)
    print(f"image {args.size}x{args.size}, CPU, {min(2, os.cpu_count() or 1)} threads")
    for r in rows:
        print(
            f"{r['impl']:5s} {r['precision']:5s} {r['mode']:11s} {r['median_s'] * 1e3:9.0f} ms"
            f"   peak RSS {r['peak_rss_mb']:7.0f} MB   params {r['params'] / 1e6:.1f} M"
        )
    for mode, what, ratio in ratios(rows):
        print(f"{mode:11s} {what:22s} {ratio:6.2f}x")


if __name__ == "__main__":
    main()
