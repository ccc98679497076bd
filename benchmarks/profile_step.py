# Copyright (c) align-detr contributors.
"""Where one training iteration spends its time: data loading, backbone, neck, encoder, query
selection, decoder, matching, losses, backward, optimizer step.

Runs the real training pieces of a config (its data loader, model, criterion and optimizer) for
a few iterations on the CPU and times each stage with forward hooks (the backward pass and the
optimizer step as a whole). Prints a markdown table of milliseconds per iteration and shares.

    python benchmarks/profile_step.py --config-file configs/quickstart/align_mnv2_trees.yaml
    python benchmarks/profile_step.py --config-file configs/align_r50.yaml --synthetic 512
    python benchmarks/profile_step.py ... --amp       # under bf16 autocast (SOLVER.AMP.ENABLED)
"""

import argparse
import collections
import contextlib
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from detectron2.modeling import build_model  # noqa: E402

import align_detr.modeling  # noqa: E402,F401  (registers the model)
from align_detr.config import load_config  # noqa: E402
from align_detr.data import register_trees  # noqa: E402
from align_detr.engine import Trainer, build_detr_optimizer  # noqa: E402
from align_detr.utils.synthetic import batched_input, synthetic_image  # noqa: E402

STAGES = [
    ("backbone", "backbone"),
    ("neck", "neck"),
    ("encoder", "transformer.encoder"),
    ("query selection", "transformer.query_selector"),
    ("decoder", "transformer.decoder"),
    ("matching", "criterion.matcher"),
]


class StageTimer:
    """Accumulates wall time of named modules' forward passes (hooks) and of code blocks."""

    def __init__(self):
        self.total = collections.defaultdict(float)
        self._start = {}

    def attach(self, model):
        for name, path in STAGES:
            module = model.get_submodule(path)
            module.register_forward_pre_hook(lambda m, a, n=name: self._begin(n))
            module.register_forward_hook(lambda m, a, o, n=name: self._end(n))

    def _begin(self, name):
        self._start[name] = time.perf_counter()

    def _end(self, name):
        self.total[name] += time.perf_counter() - self._start.pop(name)

    @contextlib.contextmanager
    def block(self, name):
        start = time.perf_counter()
        yield
        self.total[name] += time.perf_counter() - start


def batches(cfg, synthetic):
    """The config's real training loader, or one synthetic image repeated."""
    if synthetic:
        boxes = [
            (20 + 40 * i, 30 + 30 * (i % 3), 80 + 40 * i, 120 + 30 * (i % 3)) for i in range(10)
        ]
        item = batched_input(synthetic_image(synthetic, synthetic, boxes=boxes), boxes, [0] * 10)
        while True:
            yield [item] * cfg.SOLVER.IMS_PER_BATCH
    yield from Trainer.build_train_loader(cfg)


def profile(cfg, iterations, warmup, amp, synthetic):
    model = build_model(cfg).train()
    optimizer = build_detr_optimizer(cfg, model)
    timer = StageTimer()
    timer.attach(model)
    criterion_forward = model.criterion.forward

    def timed_criterion(*args, **kwargs):
        with timer.block("losses (incl. matching)"):
            return criterion_forward(*args, **kwargs)

    model.criterion.forward = timed_criterion
    data = batches(cfg, synthetic)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    for i in range(warmup + iterations):
        if i == warmup:
            timer.total.clear()
            start = time.perf_counter()
        with timer.block("data loading"):
            batch = next(data)
        with timer.block("forward (all)"), autocast:
            loss = sum(model(batch).values())
        with timer.block("backward"):
            optimizer.zero_grad()
            loss.backward()
        with timer.block("optimizer step (incl. clipping)"):
            optimizer.step()
    wall = time.perf_counter() - start
    return {k: v / iterations for k, v in timer.total.items()}, wall / iterations


def table(per_iter, wall):
    t = dict(per_iter)
    t["losses (excl. matching)"] = t.pop("losses (incl. matching)") - t.get("matching", 0.0)
    forward = t.pop("forward (all)")
    staged = sum(t.get(n, 0.0) for n, _ in STAGES) + t["losses (excl. matching)"]
    t["rest of the forward (pre/post-processing, heads, DN)"] = forward - staged
    order = [n for n, _ in STAGES] + [
        "losses (excl. matching)",
        "rest of the forward (pre/post-processing, heads, DN)",
        "backward",
        "optimizer step (incl. clipping)",
        "data loading",
    ]
    lines = ["| stage | ms / iteration | share |", "| --- | ---: | ---: |"]
    for name in order:
        lines.append(f"| {name} | {t.get(name, 0.0) * 1e3:.0f} | {t.get(name, 0.0) / wall:.0%} |")
    lines.append(f"| **iteration (wall)** | **{wall * 1e3:.0f}** | 100% |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    parser.add_argument("--synthetic", type=int, default=0, help="synthetic NxN images")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    register_trees()
    base = ["MODEL.DEVICE", "cpu"] + (["MODEL.WEIGHTS", ""] if args.synthetic else [])
    cfg = load_config(args.config_file, base + list(args.opts))
    per_iter, wall = profile(cfg, args.iters, args.warmup, args.amp, args.synthetic)
    print(
        f"{os.path.relpath(args.config_file, ROOT)}, {'bf16 autocast' if args.amp else 'fp32'}, "
        f"batch {cfg.SOLVER.IMS_PER_BATCH}, {args.threads} threads, mean of {args.iters} "
        "iterations"
    )
    print(table(per_iter, wall))


if __name__ == "__main__":
    main()
