# Copyright (c) align-detr contributors.
"""Synthetic detection inputs (an image with coloured boxes, a model input dict), for tests,
benchmarks and smoke runs that must not depend on any dataset."""

import numpy as np
import torch
from detectron2.structures import Boxes, Instances

__all__ = ["batched_input", "synthetic_image"]


def synthetic_image(h=128, w=128, boxes=((20, 30, 70, 90), (80, 10, 120, 60)), seed=0):
    """(h, w, 3) uint8: a noisy background with a bright, differently coloured rectangle per
    box (xyxy pixels)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
    colours = [(230, 40, 40), (40, 230, 40), (40, 40, 230)]
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        img[y0:y1, x0:x1] = colours[i % len(colours)]
    return img


def batched_input(img, boxes=(), classes=None):
    """A detectron2 model input dict: CHW uint8 image tensor + Instances with absolute xyxy
    ``gt_boxes`` and ``gt_classes`` (class 0 for every box by default)."""
    h, w = img.shape[:2]
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    classes = [0] * len(boxes) if classes is None else classes
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    return {
        "image": torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))),
        "instances": inst,
        "height": h,
        "width": w,
    }
