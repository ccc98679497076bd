#!/usr/bin/env python
# Copyright (c) align-detr contributors.
"""Runs a trained align-detr model on images or a video and draws its detections.

Boxes, class names and scores are drawn with detectron2's ``Visualizer``. Works on the CPU
(``--opts MODEL.DEVICE cpu``; the quickstart config already runs there).

Examples::

    python demo/demo.py --config-file configs/quickstart/align_mnv2_trees.yaml \\
        --input datasets/trees/val/*.png --output output/demo \\
        --opts MODEL.WEIGHTS output/quickstart/model_final.pth
    python demo/demo.py --config-file configs/align_r50.yaml --input photos/ --output out/ \\
        --confidence-threshold 0.3 --opts MODEL.WEIGHTS model_final.pth MODEL.DEVICE cpu
    python demo/demo.py --config-file ... --video-input clip.mp4 --output clip_out.mp4 --opts ...
"""

import argparse
import glob
import os
import sys
import time
from typing import List

import cv2
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from align_detr.utils.quiet import quiet_third_party_warnings  # noqa: E402

quiet_third_party_warnings()  # first: some of detectron2's warnings come when it is imported

from detectron2.utils.logger import setup_logger  # noqa: E402

import align_detr.modeling  # noqa: E402,F401  (registers the model, backbones and bases)
from align_detr.config import load_config  # noqa: E402
from align_detr.data import register_trees  # noqa: E402
from align_detr.engine.predictor import Predictor, draw_predictions  # noqa: E402

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="align-detr demo (images or a video)")
    parser.add_argument(
        "--config-file",
        metavar="FILE",
        help="path to config (required unless --exported is given)",
    )
    parser.add_argument(
        "--exported",
        metavar="FILE",
        help="run an exported .onnx (ONNX Runtime) or .pt2 file from tools/export_model.py "
        "instead of the PyTorch model; class names and resize come from the file",
    )
    parser.add_argument(
        "--input", nargs="+", help="image files, glob patterns (quoted or expanded) or folders"
    )
    parser.add_argument("--video-input", help="a video file")
    parser.add_argument(
        "--output",
        help="a folder (one drawing per input, same file name), or a file for a single image "
        "or the video; without it, the number of detections is printed only",
    )
    parser.add_argument("--confidence-threshold", type=float, default=0.5)
    parser.add_argument(
        "--opts", default=[], nargs=argparse.REMAINDER, help="config overrides: KEY VALUE pairs"
    )
    return parser


def setup_cfg(args):
    register_trees()  # the quickstart's class names, when its data exists
    return load_config(args.config_file, args.opts)


def exported_predictor(path: str, confidence_threshold: float):
    """An :class:`~align_detr.export.ExportedPredictor` with the metadata the drawing needs."""
    from detectron2.data.catalog import Metadata

    from align_detr.export import ExportedPredictor

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--exported file not found: {path}")
    predictor = ExportedPredictor(path, confidence_threshold)
    names = predictor.metadata.get("class_names") or []
    predictor.drawing_metadata = Metadata(name=os.path.basename(path), thing_classes=names)
    return predictor


def expand_inputs(patterns: List[str]) -> List[str]:
    """Files named, matched by a glob, or inside a folder (images only), in order, unique."""
    paths = []
    for p in patterns:
        if os.path.isdir(p):
            found = sorted(
                os.path.join(p, f) for f in os.listdir(p) if f.lower().endswith(IMAGE_EXTS)
            )
        elif any(c in p for c in "*?["):
            found = sorted(glob.glob(os.path.expanduser(p)))
        else:
            found = [p]
        if not found:
            raise FileNotFoundError(f"--input {p!r} matches no image")
        paths += [f for f in found if f not in paths]
    return paths


def read_image_bgr(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input image not found: {path}")
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"cannot read {path} as an image (unsupported or corrupt file)")
    return img


def _drawing_metadata(predictor):
    """detectron2 Metadata with thing_classes, for a PyTorch or an exported predictor."""
    return getattr(predictor, "drawing_metadata", None) or predictor.metadata


def run_images(predictor: Predictor, paths: List[str], output: str, logger) -> None:
    to_folder = output and (
        len(paths) > 1 or os.path.isdir(output) or not os.path.splitext(output)[1]
    )
    if to_folder:
        os.makedirs(output, exist_ok=True)
    for path in paths:
        img = read_image_bgr(path)
        start = time.perf_counter()
        instances = predictor(img)
        logger.info(f"{path}: {len(instances)} detections in {time.perf_counter() - start:.2f}s")
        if not output:
            continue
        drawing = draw_predictions(img[:, :, ::-1], instances, _drawing_metadata(predictor))
        out = os.path.join(output, os.path.basename(path)) if to_folder else output
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        if not cv2.imwrite(out, drawing[:, :, ::-1]):
            raise ValueError(f"cannot write {out} (unknown image extension?)")


def run_video(predictor: Predictor, path: str, output: str, logger) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video not found: {path}")
    video = cv2.VideoCapture(path)
    if not video.isOpened():
        raise ValueError(f"cannot open {path} as a video")
    fps = video.get(cv2.CAP_PROP_FPS) or 25.0
    writer, frames = None, 0
    if output and os.path.isdir(output):
        output = os.path.join(output, os.path.splitext(os.path.basename(path))[0] + ".mp4")
    try:
        while True:
            ok, frame = video.read()
            if not ok:
                break
            instances = predictor(frame)
            frames += 1
            if not output:
                continue
            drawing = draw_predictions(frame[:, :, ::-1], instances, _drawing_metadata(predictor))
            if writer is None:
                h, w = drawing.shape[:2]
                writer = cv2.VideoWriter(output, cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
            writer.write(np.ascontiguousarray(drawing[:, :, ::-1]))
    finally:
        video.release()
        if writer is not None:
            writer.release()
    logger.info(f"{path}: {frames} frames" + (f" -> {output}" if output else ""))


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    logger = setup_logger(name="align_detr.demo")
    if not args.input and not args.video_input:
        get_parser().error("give --input or --video-input")
    if not args.config_file and not args.exported:
        get_parser().error("give --config-file (a PyTorch model) or --exported FILE")
    try:
        paths = expand_inputs(args.input) if args.input else []
        if args.exported:
            predictor = exported_predictor(args.exported, args.confidence_threshold)
        else:
            predictor = Predictor(setup_cfg(args), confidence_threshold=args.confidence_threshold)
        if paths:
            run_images(predictor, paths, args.output, logger)
        if args.video_input:
            run_video(predictor, args.video_input, args.output, logger)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"demo.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
