"""Shared helpers for tests that build the real model from configs/tiny_test.yaml."""

import os

import numpy as np
import torch

from detectron2.config import get_cfg
from detectron2.structures import Boxes, Instances

from align_detr.config import add_align_detr_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_cfg(*opts):
    cfg = get_cfg()
    add_align_detr_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", "tiny_test.yaml"))
    cfg.merge_from_list(list(opts))
    return cfg


def synthetic_image(h=128, w=128, boxes=((20, 30, 70, 90), (80, 10, 120, 60)), seed=0):
    """A noisy background with a bright, differently coloured rectangle per box (xyxy)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
    colours = [(230, 40, 40), (40, 230, 40), (40, 40, 230)]
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        img[y0:y1, x0:x1] = colours[i % len(colours)]
    return img


def batched_input(img, boxes=(), classes=None):
    """A detectron2 model input dict (CHW uint8 tensor + Instances with absolute xyxy)."""
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
