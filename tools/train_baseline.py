#!/usr/bin/env python
# Copyright (c) align-detr contributors.
"""Trains the quickstart's peer, detectron2's Faster R-CNN, for a wall-clock budget, then scores
it like the quickstart model (same datasets, pycocotools COCO evaluation).

The budget is the seconds ``make quickstart`` spent training Align-DETR (read from
``<quickstart OUTPUT_DIR>/train_seconds.txt``), or ``--seconds``. Training stops at the first
iteration boundary past the budget; the model then is saved and evaluated, and
``OUTPUT_DIR/summary.json`` records iterations, seconds and the COCO metrics (also with the
quickstart's test-time augmentation, ``"bbox_TTA"``, when ``TEST.AUG.ENABLED``).

    python tools/train_baseline.py --config-file configs/quickstart/faster_rcnn_mnv2_trees.yaml \\
        --budget-from output/quickstart
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from align_detr.utils.quiet import quiet_third_party_warnings  # noqa: E402

quiet_third_party_warnings()  # first: some of detectron2's warnings come when it is imported

from detectron2.engine import DefaultTrainer, HookBase, default_setup  # noqa: E402
from detectron2.evaluation import COCOEvaluator  # noqa: E402

import align_detr.modeling  # noqa: E402,F401  (registers the MobileNetV2 FPN backbone)
from align_detr.config import load_config  # noqa: E402
from align_detr.data import register_trees  # noqa: E402
from align_detr.engine import test_with_tta  # noqa: E402


class BudgetReached(BaseException):
    """Ends training at an iteration boundary (a BaseException: detectron2's loop then runs its
    after_train hooks without logging it as a failure)."""


class TimeBudget(HookBase):
    """Stops training once ``seconds`` of training have passed."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = None
        self.steps = 0  # iterations done (detectron2's trainer.iter is off by one at MAX_ITER)

    def before_train(self):
        self.start = time.perf_counter()

    def after_step(self):
        self.steps += 1
        if time.perf_counter() - self.start >= self.seconds:
            raise BudgetReached


class BaselineTrainer(DefaultTrainer):
    """detectron2's trainer (SGD, its dataset mapper) with the quickstart's evaluator."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return COCOEvaluator(dataset_name, tasks=("bbox",), output_dir=folder, use_fast_impl=False)


def read_budget(folder: str) -> float:
    path = os.path.join(folder, "train_seconds.txt")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: run `make quickstart` first (it records its training time), or "
            "give --seconds"
        )
    with open(path) as f:
        return float(f.read().strip())


def train(cfg, seconds: float) -> dict:
    """Trains for ``seconds`` (or MAX_ITER), evaluates, writes and returns the summary."""
    trainer = BaselineTrainer(cfg)
    trainer.resume_or_load(resume=False)
    budget = TimeBudget(seconds)
    trainer.register_hooks([budget])
    start = time.perf_counter()
    try:
        trainer.train()
    except BudgetReached:
        pass
    train_seconds = time.perf_counter() - start
    iterations = budget.steps
    trainer.checkpointer.save("model_final")
    results = BaselineTrainer.test(cfg, trainer.model)
    summary = {
        "model": "Faster R-CNN, MobileNetV2 + FPN",
        "iterations": iterations,
        "train_seconds": round(train_seconds, 1),
        "budget_seconds": round(seconds, 1),
        "bbox": results.get("bbox", {}),
    }
    if cfg.TEST.AUG.ENABLED:  # the same test-time augmentation as the quickstart model
        summary["bbox_TTA"] = test_with_tta(BaselineTrainer, cfg, trainer.model)["bbox_TTA"]
    with open(os.path.join(cfg.OUTPUT_DIR, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def _scores(bbox: dict) -> str:
    nan = float("nan")
    return " / ".join(f"{k} {bbox.get(k, nan):.1f}" for k in ("AP", "AP50", "AP75"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--seconds", type=float, help="training budget in seconds")
    group.add_argument("--budget-from", help="OUTPUT_DIR of the quickstart run to match")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides")
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else read_budget(args.budget_from)
    register_trees()
    cfg = load_config(args.config_file, args.opts)
    default_setup(cfg, argparse.Namespace(config_file=args.config_file, eval_only=False))
    summary = train(cfg, seconds)
    print(
        f"Faster R-CNN: {summary['iterations']} iterations in {summary['train_seconds']:.0f} s "
        f"(budget {summary['budget_seconds']:.0f} s); held-out {_scores(summary['bbox'])}"
    )
    if "bbox_TTA" in summary:
        print(f"  with test-time augmentation: {_scores(summary['bbox_TTA'])}")
    return summary


if __name__ == "__main__":
    main()
