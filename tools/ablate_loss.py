#!/usr/bin/env python
# Copyright (c) align-detr contributors.
"""Align loss vs focal loss at equal budget: trains one config twice and prints held-out APs.

* ``align``: ``LOSS.TYPE align``, ``MATCH_K [2]`` (Align-DETR: k = 2 on the encoder and
  intermediate decoder layers, one-to-one on the last, whatever the decoder depth);
* ``focal``: ``LOSS.TYPE focal``, ``MATCH_K [1]`` (the DINO baseline, one-to-one).

Everything else (data, schedule, seed, model) is the config's. Each run is ``train_net.py`` in
its own ``OUTPUT_DIR`` (``<out>/align``, ``<out>/focal``); the APs are those of the last
evaluation in each run's ``metrics.json``.

Example::

    python tools/ablate_loss.py --config-file configs/quickstart/align_mnv2_trees.yaml
    python tools/ablate_loss.py --config-file ... --max-iter 200   # a shorter, equal budget
"""

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plot_metrics import last_eval  # noqa: E402

#: The two runs' overrides.
VARIANTS = {
    "align": ["MODEL.ALIGN_DETR.LOSS.TYPE", "align", "MODEL.ALIGN_DETR.LOSS.MATCH_K", "[2]"],
    "focal": ["MODEL.ALIGN_DETR.LOSS.TYPE", "focal", "MODEL.ALIGN_DETR.LOSS.MATCH_K", "[1]"],
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--out", default="output/ablation")
    parser.add_argument(
        "--max-iter",
        type=int,
        help="override SOLVER.MAX_ITER (both runs); "
        "SOLVER.STEPS and TEST.EVAL_PERIOD are scaled with it",
    )
    parser.add_argument("--only", choices=["align", "focal"], help="run one variant only")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="extra config overrides")
    args = parser.parse_args(argv)

    extra = list(args.opts)
    if args.max_iter:
        sys.path.insert(0, ROOT)
        from align_detr.config import load_config

        cfg = load_config(args.config_file)
        scale = args.max_iter / cfg.SOLVER.MAX_ITER
        steps = tuple(int(round(s * scale)) for s in cfg.SOLVER.STEPS)
        period = max(1, int(round(cfg.TEST.EVAL_PERIOD * scale)))
        extra = [
            "SOLVER.MAX_ITER",
            str(args.max_iter),
            "SOLVER.STEPS",
            str(steps),
            "TEST.EVAL_PERIOD",
            str(period),
        ] + extra
    runs = {args.only: VARIANTS[args.only]} if args.only else VARIANTS
    results = {}
    for name, opts in runs.items():
        out_dir = os.path.join(args.out, name)
        if os.path.exists(os.path.join(out_dir, "metrics.json")):
            os.remove(os.path.join(out_dir, "metrics.json"))  # a fresh run, not an appended one
        cmd = [
            sys.executable,
            os.path.join(ROOT, "train_net.py"),
            "--config-file",
            args.config_file,
            *opts,
            *extra,
            "OUTPUT_DIR",
            out_dir,
        ]
        print(f"=== {name}: {' '.join(cmd)}", flush=True)
        start = time.time()
        subprocess.check_call(cmd)
        results[name] = (last_eval(os.path.join(out_dir, "metrics.json")), time.time() - start)

    print("\nHeld-out COCO bbox metrics (%), equal budget:")
    print(f"{'loss':<8}{'AP':>8}{'AP50':>8}{'AP75':>8}{'iters':>8}{'minutes':>9}")
    for name, (res, seconds) in results.items():
        if not res:
            print(f"{name:<8}  no evaluation found")
            continue
        print(
            f"{name:<8}{res['bbox/AP']:>8.1f}{res['bbox/AP50']:>8.1f}{res['bbox/AP75']:>8.1f}"
            f"{res['iteration']:>8}{seconds / 60:>9.1f}"
        )


if __name__ == "__main__":
    main()
