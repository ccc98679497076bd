#!/usr/bin/env python
# Copyright (c) align-detr contributors.
"""End of ``make quickstart``: held-out drawings, the metrics plot and a short summary.

Reads ``OUTPUT_DIR`` of the config (``output/quickstart``): ``model_final.pth`` and
``metrics.json``. Writes ``demo/<image>.png`` (predictions red with scores, ground truth green)
for every image of ``DATASETS.TEST[0]`` (with the test-time augmentation when
``TEST.AUG.ENABLED``), and ``metrics.png``; prints AP, AP50, AP75 of the last evaluation (and of
the one with test-time augmentation) and the time since ``--start`` (a Unix time, e.g. from
``date +%s``).

Example::

    python tools/quickstart_report.py --config-file configs/quickstart/align_mnv2_trees.yaml
"""

import argparse
import os
import sys
import time

import cv2

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from align_detr.utils.quiet import quiet_third_party_warnings  # noqa: E402

quiet_third_party_warnings()  # first: some of detectron2's warnings come when it is imported

from detectron2.data import DatasetCatalog  # noqa: E402
from plot_metrics import last_eval, plot  # noqa: E402

import align_detr.modeling  # noqa: E402,F401  (registers the model)
from align_detr.config import load_config  # noqa: E402
from align_detr.data import register_trees  # noqa: E402
from align_detr.engine.predictor import Predictor, draw_predictions  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--start", type=float, help="Unix time the run started")
    parser.add_argument("--confidence-threshold", type=float, default=0.3)
    parser.add_argument("--scale", type=float, default=1.5, help="drawing scale")
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)

    register_trees()
    cfg = load_config(args.config_file, args.opts, freeze=False)
    out_dir = cfg.OUTPUT_DIR
    if not cfg.MODEL.WEIGHTS:
        cfg.MODEL.WEIGHTS = os.path.join(out_dir, "model_final.pth")
    cfg.freeze()

    metrics = os.path.join(out_dir, "metrics.json")
    print(f"plot: {plot(metrics, os.path.join(out_dir, 'metrics.png'))}")

    predictor = Predictor(cfg, confidence_threshold=args.confidence_threshold)
    demo_dir = os.path.join(out_dir, "demo")
    os.makedirs(demo_dir, exist_ok=True)
    for d in DatasetCatalog.get(cfg.DATASETS.TEST[0]):
        img = cv2.imread(d["file_name"], cv2.IMREAD_COLOR)
        instances = predictor(img)
        # detectron2 dataset dicts hold XYWH_ABS boxes for COCO json.
        gt = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in d["annotations"])]
        drawing = draw_predictions(
            img[:, :, ::-1], instances, predictor.metadata, gt_boxes=gt, scale=args.scale
        )
        out = os.path.join(demo_dir, os.path.basename(d["file_name"]))
        cv2.imwrite(out, drawing[:, :, ::-1])
        print(
            f"demo: {out} ({len(instances)} detections >= {args.confidence_threshold}, "
            f"{len(gt)} ground-truth boxes)"
        )

    print("=" * 64)
    print(f"quickstart summary ({cfg.DATASETS.TEST[0]}, held out, COCO bbox metrics):")
    found = False
    for task, what in (("bbox", "one view"), ("bbox_TTA", "test-time augmentation")):
        res = last_eval(metrics, f"{task}/AP")
        if res:
            found = True
            print(
                f"  {what:>22}: AP {res[f'{task}/AP']:.1f}   AP50 {res[f'{task}/AP50']:.1f}   "
                f"AP75 {res[f'{task}/AP75']:.1f}   (after iteration {res['iteration']})"
            )
    if not found:
        print("  no evaluation found in metrics.json")
    if args.start:
        minutes, seconds = divmod(int(time.time() - args.start), 60)
        print(f"  total time {minutes} min {seconds:02d} s")
    print(f"  outputs: {out_dir}/ (metrics.json, metrics.png, demo/, model_final.pth)")
    print("=" * 64)


if __name__ == "__main__":
    main()
