#!/usr/bin/env python
# Copyright (c) align-detr contributors.
"""Chooses a trained quickstart model's post-hoc inference settings on the validation split.

The settings that do not change training (test image size ``INPUT.MIN_SIZE_TEST``, the NMS
threshold and the number of test-time views ``TEST.AUG.VIEWS``) are scored on every combination
of a grid, on ``--dataset`` (default ``trees_tune``, the strip of the training region that
``tools/prepare_trees.py`` keeps out of training), never on the config's own test split
(``DATASETS.TEST``, ``trees_val``), which is refused. The best AP50 wins (ties: higher AP, then
fewer views, a smaller image, a lower threshold). The test split is then scored once, with the
chosen settings fixed in the config (``train_net.py --eval-only`` for Align-DETR,
``tools/train_baseline.py --eval-only`` for the Faster R-CNN peer).

Both of the quickstart's models are tuned by the same rule, each with the keys its own detector
reads: Align-DETR (``META_ARCHITECTURE`` "AlignDETR") ``MODEL.ALIGN_DETR.TEST_NMS_THRESH``
(0: no NMS), detectron2's Faster R-CNN ("GeneralizedRCNN") ``MODEL.ROI_HEADS.NMS_THRESH_TEST``
(1: no NMS). One view is the plain model (``TEST.AUG.ENABLED False``); 2, 4 and 8 views are the
project's dihedral test-time augmentation (``align_detr.modeling.test_time_augmentation``).

Each setting is scored by the evaluation path of ``--eval-only``: the trainer's test loader
(``MIN_SIZE_TEST`` resize), the test-time-augmentation wrapper and detectron2's
``COCOEvaluator`` (pycocotools), through the trainer's ``test``. Only the network's forward pass
is shared: it runs once per distinct input image (tile, view and size) with the detector's
output before NMS kept, and each NMS threshold re-runs only the detector's own post-processing
(Align-DETR's ``postprocess``, Faster R-CNN's ``box_predictor.inference``) on it; a test checks
that this gives exactly the detections of a model built with that threshold.

Writes ``<OUTPUT_DIR>/tune/<dataset>.json`` (every setting's AP / AP50 / AP75 and the choice)
and ``<OUTPUT_DIR>/tune/<dataset>_choice.yaml`` (the chosen keys, a config fragment), prints a
table and the command-line overrides of the choice.

Example::

    python tools/tune_quickstart.py --config-file configs/quickstart/align_mnv2_trees.yaml \\
        OUTPUT_DIR output/quickstart
    python tools/tune_quickstart.py --config-file configs/quickstart/faster_rcnn_mnv2_trees.yaml \\
        OUTPUT_DIR output/quickstart_baseline
"""

import argparse
import contextlib
import copy
import hashlib
import io
import itertools
import json
import logging
import os
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

from align_detr.utils.quiet import quiet_third_party_warnings  # noqa: E402

quiet_third_party_warnings()  # first: some of detectron2's warnings come when it is imported

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.modeling.meta_arch.rcnn import GeneralizedRCNN  # noqa: E402
from torch import nn  # noqa: E402

import align_detr.modeling  # noqa: E402,F401  (registers the model and the backbones)
from align_detr.config import load_config  # noqa: E402
from align_detr.data import register_trees  # noqa: E402
from align_detr.engine import Trainer  # noqa: E402
from align_detr.modeling.test_time_augmentation import build_tta_model  # noqa: E402

DEFAULT_DATASET = "trees_tune"
VIEW_COUNTS = (1, 2, 4, 8)


class Detector:
    """What differs between the two quickstart detectors: their NMS key, the threshold meaning
    "no NMS", the default grid (around each model's own training sizes and NMS default), how the
    weights are loaded, and the trainer whose ``test`` / ``build_evaluator`` score them."""

    nms_key: str
    nms_off: float
    sizes: Tuple[int, ...]
    nms: Tuple[float, ...]

    def trainer(self):
        raise NotImplementedError

    def load(self, cfg, model) -> None:
        raise NotImplementedError

    def capture(self, model, inputs: List[Dict]):
        """Runs the model on ``inputs``; returns what its NMS step starts from."""
        raise NotImplementedError

    def finish(self, model, raw, inputs: List[Dict], nms: float) -> List[Dict]:
        """The model's outputs for ``inputs`` from ``raw``, with NMS at ``nms``."""
        raise NotImplementedError


class AlignDETRStages(Detector):
    """Align-DETR: ``postprocess`` (top ``NUM_SELECT``, class-wise NMS at ``test_nms_thresh``,
    rescale) runs on the last decoder layer's outputs, which are kept."""

    nms_key = "MODEL.ALIGN_DETR.TEST_NMS_THRESH"
    nms_off = 0.0
    sizes = (480, 560, 640, 720, 800)  # trained at 544-704
    nms = (0.0, 0.4, 0.5, 0.6, 0.7, 0.8)

    def trainer(self):
        return Trainer

    def load(self, cfg, model) -> None:
        Trainer.load_for_evaluation(cfg, model)  # the EMA weights, as --eval-only

    def capture(self, model, inputs):
        kept = {}
        post = model.postprocess

        def keep(out, image_sizes, batched_inputs):
            kept["raw"] = (out, image_sizes)
            return post(out, image_sizes, batched_inputs)

        model.postprocess = keep  # shadows the method on this instance only
        try:
            model(inputs)
        finally:
            del model.postprocess
        return kept["raw"]

    def finish(self, model, raw, inputs, nms):
        model.test_nms_thresh = nms
        return model.postprocess(*raw, inputs)


class FasterRCNNStages(Detector):
    """detectron2's Faster R-CNN: ``box_predictor.inference`` (score threshold, class-wise NMS
    at ``test_nms_thresh``, top ``DETECTIONS_PER_IMAGE``) runs on the box head's predictions
    and the proposals, which are kept; then ``GeneralizedRCNN._postprocess`` rescales."""

    nms_key = "MODEL.ROI_HEADS.NMS_THRESH_TEST"
    nms_off = 1.0
    sizes = (320, 360, 400, 480, 560)  # trained at 352-448
    nms = (0.3, 0.4, 0.5, 0.6, 0.7, 1.0)

    def trainer(self):
        from train_baseline import BaselineTrainer

        return BaselineTrainer

    def load(self, cfg, model) -> None:
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)

    def capture(self, model, inputs):
        heads = model.roi_heads
        if getattr(heads, "mask_on", False) or getattr(heads, "keypoint_on", False):
            raise ValueError("only box-only Faster R-CNN models can be tuned here")
        predictor, kept = heads.box_predictor, {}
        inference = predictor.inference

        def keep(predictions, proposals):
            kept["raw"] = (predictions, proposals)
            return inference(predictions, proposals)

        predictor.inference = keep
        try:
            model(inputs)
        finally:
            del predictor.inference
        return kept["raw"]

    def finish(self, model, raw, inputs, nms):
        predictions, proposals = raw
        predictor = model.roi_heads.box_predictor
        predictor.test_nms_thresh = nms
        instances, _ = predictor.inference(predictions, proposals)
        sizes = [p.image_size for p in proposals]
        return GeneralizedRCNN._postprocess(instances, inputs, sizes)


DETECTORS = {"AlignDETR": AlignDETRStages, "GeneralizedRCNN": FasterRCNNStages}


def detector_of(cfg) -> Detector:
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch not in DETECTORS:
        raise ValueError(f"cannot tune MODEL.META_ARCHITECTURE {arch!r} (known: {list(DETECTORS)})")
    return DETECTORS[arch]()


def _image_key(x: Dict) -> Tuple:
    """What makes an input distinct for the network: the pixels (tile, view and size) and the
    size its boxes are reported in."""
    image = x["image"]
    digest = hashlib.sha1(image.contiguous().cpu().numpy().tobytes()).hexdigest()
    return (x.get("file_name"), tuple(image.shape), digest, x.get("height"), x.get("width"))


class ReplayDetector(nn.Module):
    """A detector whose network runs once per distinct input image; every call re-runs only its
    NMS and post-processing, at ``nms_thresh``. It is called as detectron2 calls a model at
    inference (a list of input dicts, here one image per call as the test loader and the
    test-time augmentation give them) and returns what the detector itself would return with
    that threshold."""

    def __init__(self, model: nn.Module, stages: Detector):
        super().__init__()
        self.model = model
        self.stages = stages
        self.nms_thresh = stages.nms_off
        self.cache: Dict[Tuple, object] = {}
        self.forward_passes = 0

    def forward(self, batched_inputs: List[Dict]) -> List[Dict]:
        results = []
        for x in batched_inputs:
            key = _image_key(x)
            if key not in self.cache:
                self.cache[key] = self.stages.capture(self.model, [x])
                self.forward_passes += 1
            results += self.stages.finish(self.model, self.cache[key], [x], self.nms_thresh)
        return results


def setting_cfg(cfg, dataset: str, size: int, nms: float, views: int, nms_key: str):
    """A copy of ``cfg`` that scores ``dataset`` with these settings."""
    c = copy.deepcopy(cfg)
    c.defrost()
    c.DATASETS.TEST = (dataset,)
    c.INPUT.MIN_SIZE_TEST = int(size)
    c.merge_from_list([nms_key, float(nms)])
    c.TEST.AUG.ENABLED = views > 1
    c.TEST.AUG.VIEWS = int(views)
    c.DATALOADER.NUM_WORKERS = 0  # a worker process per setting costs more than it saves
    c.freeze()
    return c


@contextlib.contextmanager
def _quiet():
    """detectron2's evaluation logs and pycocotools' prints, once per setting, are hidden."""
    loggers = [logging.getLogger(n) for n in ("detectron2", "d2", "align_detr", "fvcore")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def score(trainer_cls, cfg, model: nn.Module, folder: str) -> Dict[str, float]:
    """COCO bbox metrics of ``model`` on ``cfg.DATASETS.TEST[0]`` through ``trainer_cls.test``
    (its test loader and evaluator), with test-time augmentation when ``TEST.AUG.ENABLED``."""
    if cfg.TEST.AUG.ENABLED:
        model = build_tta_model(cfg, model)
    evaluator = trainer_cls.build_evaluator(cfg, cfg.DATASETS.TEST[0], folder)
    results = trainer_cls.test(cfg, model, [evaluator])
    return {k: float(results["bbox"][k]) for k in ("AP", "AP50", "AP75")}


def _rank(row: Dict) -> Tuple:
    # Best AP50; ties: higher AP, then the cheaper setting (fewer views, smaller image), then
    # the lower threshold.
    return (row["AP50"], row["AP"], -row["views"], -row["size"], -row["nms"])


def tune(
    cfg,
    dataset: str = DEFAULT_DATASET,
    sizes: Optional[Sequence[int]] = None,
    nms: Optional[Sequence[float]] = None,
    views: Sequence[int] = VIEW_COUNTS,
    model: Optional[nn.Module] = None,
) -> Dict:
    """Scores every (size, NMS threshold, views) setting of the grid on ``dataset``.

    Args:
        cfg: the trained model's config; ``MODEL.WEIGHTS`` the checkpoint to tune.
        sizes, nms: the grid (default: the detector's, see :class:`Detector`).
        model: an already loaded model (else built from ``cfg`` and its weights loaded).

    Returns:
        ``{"dataset", "nms_key", "results": [row, ...], "choice": row, "forward_passes",
        "seconds"}``, each row ``{"size", "nms", "views", "AP", "AP50", "AP75"}``.

    Raises:
        ValueError: ``dataset`` is one of the config's test datasets (``DATASETS.TEST``).
    """
    if dataset in cfg.DATASETS.TEST:
        raise ValueError(
            f"{dataset!r} is the config's test split (DATASETS.TEST): choosing settings on it "
            "would make its numbers optimistic. Tune on a validation split (e.g. trees_tune)."
        )
    stages = detector_of(cfg)
    sizes = list(sizes or stages.sizes)
    nms = list(stages.nms if nms is None else nms)
    trainer_cls = stages.trainer()
    if model is None:
        model = trainer_cls.build_model(cfg)
        stages.load(cfg, model)
    replay = ReplayDetector(model, stages).eval()
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as folder, _quiet():
        for size, thresh, n in itertools.product(sizes, nms, views):
            c = setting_cfg(cfg, dataset, size, thresh, n, stages.nms_key)
            replay.nms_thresh = float(thresh)
            metrics = score(trainer_cls, c, replay, folder)
            rows.append({"size": int(size), "nms": float(thresh), "views": int(n), **metrics})
    return {
        "dataset": dataset,
        "meta_architecture": cfg.MODEL.META_ARCHITECTURE,
        "weights": cfg.MODEL.WEIGHTS,
        "nms_key": stages.nms_key,
        "nms_off": stages.nms_off,
        "results": rows,
        "choice": max(rows, key=_rank),
        "forward_passes": replay.forward_passes,
        "seconds": round(time.perf_counter() - start, 1),
    }


def choice_opts(report: Dict) -> List[str]:
    """The chosen settings as config overrides (``KEY VALUE`` pairs)."""
    c = report["choice"]
    return [
        "INPUT.MIN_SIZE_TEST",
        str(c["size"]),
        report["nms_key"],
        f"{c['nms']:g}",
        "TEST.AUG.ENABLED",
        str(c["views"] > 1),
        "TEST.AUG.VIEWS",
        str(c["views"]),
    ]


def choice_yaml(report: Dict) -> str:
    """The chosen settings as a config fragment, with where and how they were chosen."""
    c = report["choice"]
    keys = dict(zip(choice_opts(report)[::2], choice_opts(report)[1::2]))
    lines = [
        f"# Chosen on {report['dataset']} by tools/tune_quickstart.py: best AP50 of "
        f"{len(report['results'])} settings",
        f"# ({report['dataset']}: AP {c['AP']:.1f}, AP50 {c['AP50']:.1f}, AP75 {c['AP75']:.1f}; "
        f"weights {report['weights']})",
    ]
    tree: Dict = {}
    for key, value in keys.items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value

    def emit(node, indent):
        for k, v in node.items():
            if isinstance(v, dict):
                lines.append(" " * indent + f"{k}:")
                emit(v, indent + 2)
            else:
                lines.append(" " * indent + f"{k}: {v}")

    emit(tree, 0)
    return "\n".join(lines) + "\n"


def table(report: Dict) -> str:
    """AP50 of every setting: one row per (size, NMS threshold), one column per view count;
    the choice starred."""
    rows = report["results"]
    views = sorted({r["views"] for r in rows})
    by = {(r["size"], r["nms"], r["views"]): r for r in rows}
    choice = report["choice"]
    off = report["nms_off"]
    head = f"{'size':>5} {'NMS':>5} | " + " ".join(
        f"{f'{v} view' + 's' * (v > 1):>9}" for v in views
    )
    lines = [f"AP50 on {report['dataset']} ({report['meta_architecture']})", head, "-" * len(head)]
    for size, thresh in dict.fromkeys((r["size"], r["nms"]) for r in rows):
        cells = []
        for v in views:
            r = by[(size, thresh, v)]
            star = "*" if r is choice else " "
            cells.append(f"{r['AP50']:8.1f}{star}")
        label = "off" if thresh == off else f"{thresh:g}"
        lines.append(f"{size:>5} {label:>5} | " + " ".join(cells))
    lines.append(
        f"* chosen: size {choice['size']}, NMS "
        f"{'off' if choice['nms'] == off else format(choice['nms'], 'g')}, "
        f"{choice['views']} view(s): AP {choice['AP']:.1f}  AP50 {choice['AP50']:.1f}  "
        f"AP75 {choice['AP75']:.1f}"
    )
    return "\n".join(lines)


def _ints(text: str) -> List[int]:
    return [int(v) for v in text.split(",")]


def _floats(text: str) -> List[float]:
    return [float(v) for v in text.split(",")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config-file", required=True, help="the config the model was trained with"
    )
    parser.add_argument("--dataset", default=DEFAULT_DATASET, help="the validation split")
    # Comma-separated lists: a space-separated one would swallow the config overrides after it.
    parser.add_argument("--sizes", type=_ints, help="INPUT.MIN_SIZE_TEST values, e.g. 560,640")
    parser.add_argument(
        "--nms",
        type=_floats,
        help="NMS thresholds, e.g. 0,0.7 (Align-DETR: 0 = off; R-CNN: 1 = off)",
    )
    parser.add_argument("--views", type=_ints, default=list(VIEW_COUNTS), help="e.g. 1,2,4,8")
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, help="config overrides, e.g. OUTPUT_DIR output/quickstart"
    )
    args = parser.parse_args(argv)
    register_trees()
    cfg = load_config(args.config_file, args.opts, freeze=False)
    if not cfg.MODEL.WEIGHTS:
        cfg.MODEL.WEIGHTS = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    if not os.path.isfile(cfg.MODEL.WEIGHTS):
        sys.exit(f"no trained model at {cfg.MODEL.WEIGHTS}: train first, or set MODEL.WEIGHTS")
    cfg.freeze()
    try:
        report = tune(cfg, args.dataset, args.sizes, args.nms, args.views)
    except ValueError as e:
        sys.exit(str(e))
    folder = os.path.join(cfg.OUTPUT_DIR, "tune")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{args.dataset}.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(folder, f"{args.dataset}_choice.yaml"), "w") as f:
        f.write(choice_yaml(report))
    print(table(report))
    print(
        f"{len(report['results'])} settings, {report['forward_passes']} forward passes, "
        f"{report['seconds']:.0f} s; written to {folder}/"
    )
    print("overrides: " + " ".join(choice_opts(report)))
    return report


if __name__ == "__main__":
    main()
