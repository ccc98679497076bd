#!/usr/bin/env python
# Copyright (c) align-detr contributors.
"""Exports a trained model, the whole detector, to ONNX or to ``torch.export`` (pt2).

The graph takes a batch of resized images, (N, 3, H, W) uint8 in the config's INPUT.FORMAT
channel order with each image at the top-left, and their (N, 2) int64 sizes (h, w); it returns
boxes (N, K, 4) in each image's pixels, scores (N, K) and labels (N, K). Batch size and image size
are dynamic. The file is checked against the PyTorch model on the sample batch before this
returns. See docs/deploy.md.

Examples::

    python tools/export_model.py --config-file configs/align_r50.yaml --format onnx \\
        --output align.onnx MODEL.WEIGHTS output/align_r50/model_final.pth MODEL.DEVICE cpu
    python tools/export_model.py --config-file configs/align_r50.yaml --format onnx \\
        --msda plugin --output align_trt.onnx MODEL.WEIGHTS model_final.pth MODEL.DEVICE cpu
    python tools/export_model.py --config-file configs/align_r50.yaml --format pt2 \\
        --output align.pt2 --sample-image photo.jpg MODEL.WEIGHTS model_final.pth MODEL.DEVICE cpu
"""

import argparse
import logging
import os
import sys
import time

import cv2
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from align_detr.utils.quiet import quiet_third_party_warnings  # noqa: E402

quiet_third_party_warnings()  # first: some of detectron2's warnings come when it is imported

from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

import align_detr.modeling  # noqa: E402,F401  (registers the model, backbones and bases)
from align_detr.config import load_config  # noqa: E402
from align_detr.engine.checkpoint import load_for_inference  # noqa: E402
from align_detr.engine.predictor import dataset_metadata  # noqa: E402
from align_detr.export import (  # noqa: E402
    MSDA_FLAVOURS,
    ExportableDetector,
    ExportedPredictor,
    compare_detections,
    export_metadata,
    export_onnx,
    export_pt2,
    resized_batch,
    trace,
)

#: detectron2's ImageNet backbone initialisations: a training start, not a detector to export.
_BACKBONE_INIT_PREFIX = "detectron2://ImageNetPretrained/"


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="export an align-detr model to ONNX or pt2")
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to config")
    parser.add_argument("--format", choices=("onnx", "pt2"), required=True)
    parser.add_argument("--output", required=True, metavar="FILE", help=".onnx or .pt2 file")
    parser.add_argument(
        "--msda",
        choices=MSDA_FLAVOURS,
        default="grid_sample",
        help="ONNX only: deformable attention as standard GridSample nodes (runs in any ONNX "
        "runtime) or as TensorRT's MultiscaleDeformableAttnPlugin_TRT nodes",
    )
    parser.add_argument(
        "--sample-image",
        metavar="FILE",
        help="an image to trace and check with (else a synthetic one); it is resized as at test",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE")
    return parser


def _synthetic_image(height: int = 480, width: int = 640) -> np.ndarray:
    """A deterministic BGR picture with shapes and texture (no file needed)."""
    rng = np.random.default_rng(0)
    image = (rng.random((height, width, 3)) * 60 + 90).astype(np.uint8)
    cv2.rectangle(image, (60, 80), (260, 300), (40, 160, 220), -1)
    cv2.circle(image, (450, 240), 90, (200, 60, 40), -1)
    return image


def sample_batch(image_bgr: np.ndarray, metadata):
    """Two images of different sizes (the sample and its top-left 3/4) as one padded batch:
    an example with batch 2 and unequal sides keeps every size dynamic in the trace."""
    h, w = image_bgr.shape[:2]
    crop = image_bgr[: max(32, h * 3 // 4), : max(32, w * 3 // 4)]
    images, sizes, _ = resized_batch([image_bgr, crop], metadata)
    if images.shape[2] == images.shape[3]:  # square batch: make the sides differ
        images = torch.nn.functional.pad(images, (0, 32))
    return images, sizes


def build_for_export(cfg, logger):
    """The model of ``cfg`` in eval mode with its weights (random when there are none)."""
    model = build_model(cfg).eval()
    weights = cfg.MODEL.WEIGHTS
    if not weights or weights.startswith(_BACKBONE_INIT_PREFIX):
        logger.warning(
            "MODEL.WEIGHTS is %s, not a trained detector: exporting RANDOM weights (set "
            "MODEL.WEIGHTS path/to/model_final.pth)",
            repr(weights) if weights else "empty",
        )
    else:
        load_for_inference(cfg, model)
    return model


def check_against_pytorch(path, detector, images, sizes):
    """:func:`~align_detr.export.compare_detections` of the exported file (run as a user would)
    against the PyTorch detector on the sample batch."""
    with torch.no_grad():
        expected = detector(images, sizes)
    return compare_detections(ExportedPredictor(path).run(images, sizes), expected)


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    logger = setup_logger(name="align_detr.export")
    logging.getLogger("align_detr").setLevel(logging.INFO)
    cfg = load_config(args.config_file, args.opts)
    if cfg.MODEL.DEVICE != "cpu":
        logger.warning("export traces on the CPU (MODEL.DEVICE %s ignored)", cfg.MODEL.DEVICE)
        cfg.defrost()
        cfg.MODEL.DEVICE = "cpu"
        cfg.freeze()
    ext = ".onnx" if args.format == "onnx" else ".pt2"
    if not args.output.endswith(ext):
        raise SystemExit(f"--output must end in {ext} for --format {args.format}")
    if args.sample_image:
        image = cv2.imread(args.sample_image, cv2.IMREAD_COLOR)
        if image is None:
            raise SystemExit(f"cannot read --sample-image {args.sample_image}")
    else:
        image = _synthetic_image()
    model = build_for_export(cfg, logger)
    metadata = export_metadata(cfg, dataset_metadata(cfg).thing_classes)
    detector = ExportableDetector(model)
    images, sizes = sample_batch(image, metadata)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    start = time.perf_counter()
    if args.format == "pt2":
        export_pt2(trace(detector, images, sizes), args.output, metadata)
    else:
        export_onnx(detector, images, sizes, args.output, metadata, msda=args.msda)
    logger.info("wrote %s in %.0f s", args.output, time.perf_counter() - start)
    if args.format == "onnx" and args.msda == "plugin":
        logger.info("plugin nodes need TensorRT's plugin library; not run here")
        return 0
    check = check_against_pytorch(args.output, detector, images, sizes)
    logger.info(
        "check against PyTorch on the sample batch %s: %.1f%% of the detections agree (same "
        "label, box within 0.01 px, score within 1e-4; largest differences %.2g px, %.2g)",
        tuple(images.shape),
        100 * check["matched"],
        check["box_px"],
        check["score"],
    )
    if check["matched"] < 0.9:
        logger.error("the exported model does not reproduce the PyTorch detections")
        return 1
    if check["matched"] < 1.0:
        logger.warning(
            "the rest differ where scores are within numerical noise of each other (near-ties "
            "at a top-K cut, common with random weights); see docs/deploy.md"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
