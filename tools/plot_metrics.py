#!/usr/bin/env python
# Copyright (c) align-detr contributors.
"""Plots training losses and evaluation AP over iterations from detectron2's ``metrics.json``.

Example::

    python tools/plot_metrics.py output/quickstart/metrics.json -o output/quickstart/metrics.png
"""

import argparse
import json
import os
from collections import defaultdict
from typing import Dict, List, Tuple

Series = Dict[str, List[Tuple[int, float]]]
# The sum and the final decoder layer's terms (the auxiliary and DN terms follow them).
PLOTTED_LOSSES = ("total_loss", "loss_class", "loss_bbox", "loss_giou")


def read_metrics(path: str) -> Tuple[Series, Series]:
    """Returns ({loss name: [(iteration, value)]}, {"AP"/"AP50"/"AP75": [(iteration, value)]}).

    ``metrics.json`` holds one json object per line (detectron2's JSONWriter); a run resumed in
    the same folder appends to it, so a later line for an iteration replaces an earlier one.
    """
    losses: Dict[str, Dict[int, float]] = defaultdict(dict)
    aps: Dict[str, Dict[int, float]] = defaultdict(dict)
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by an interrupted run
            it = rec.get("iteration")
            if it is None:
                continue
            for k, v in rec.items():
                if k in PLOTTED_LOSSES:
                    losses[k][it] = v
                elif k in ("bbox/AP", "bbox/AP50", "bbox/AP75"):
                    aps[k.split("/")[1]][it] = v
    as_series = lambda d: {k: sorted(v.items()) for k, v in d.items()}  # noqa: E731
    return as_series(losses), as_series(aps)


def last_eval(metrics_path: str, key: str = "bbox/AP") -> dict:
    """The last record of ``metrics.json`` that holds ``key`` (empty dict if none); e.g.
    ``"bbox_TTA/AP"`` for the score with test-time augmentation."""
    found = {}
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if key in rec:
                    found = rec
    return found


def plot(metrics_path: str, out_path: str, max_losses: int = 4) -> str:
    """Writes the figure (losses left, AP right) to ``out_path`` and returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses, aps = read_metrics(metrics_path)
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(11, 4))
    # total_loss first, then the final-layer terms (the most informative few).
    names = ["total_loss"] if "total_loss" in losses else []
    names += sorted(k for k in losses if k != "total_loss")[: max_losses - len(names)]
    for name in names:
        xs, ys = zip(*losses[name])
        ax_l.plot(xs, ys, label=name, lw=1.2)
    ax_l.set_xlabel("iteration")
    ax_l.set_ylabel("loss")
    ax_l.set_yscale("log")
    ax_l.set_title("training losses")
    if names:
        ax_l.legend(fontsize=8)
    for name in ("AP", "AP50", "AP75"):
        if name in aps:
            xs, ys = zip(*aps[name])
            ax_a.plot(xs, ys, marker="o", label=f"bbox/{name}")
    ax_a.set_xlabel("iteration")
    ax_a.set_ylabel("COCO AP (%)")
    ax_a.set_title("held-out evaluation")
    ax_a.set_ylim(bottom=0)
    if aps:
        ax_a.legend(fontsize=8)
    else:
        ax_a.text(0.5, 0.5, "no evaluation yet", ha="center", transform=ax_a.transAxes)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("metrics", help="metrics.json of a run")
    parser.add_argument("-o", "--output", help="image to write (default: metrics.png beside it)")
    args = parser.parse_args(argv)
    out = args.output or os.path.join(os.path.dirname(args.metrics), "metrics.png")
    print(f"wrote {plot(args.metrics, out)}")


if __name__ == "__main__":
    main()
