# Copyright (c) align-detr contributors.
"""Box conversions and IoU / GIoU used by the criterion and the model.

Boxes are (cx, cy, w, h) or (x0, y0, x1, y1), normalised or absolute; every function works on
any leading shape. Degenerate boxes (zero area) give finite values thanks to the epsilons.
"""

import torch

_EPS = 1e-7


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def paired_iou_and_giou(boxes1: torch.Tensor, boxes2: torch.Tensor):
    """IoU and GIoU of corresponding boxes.

    Args:
        boxes1, boxes2: (..., 4) xyxy, same shape.

    Returns:
        (iou, giou), each of shape (...).
    """
    area1 = (boxes1[..., 2] - boxes1[..., 0]).clamp(min=0) * (
        boxes1[..., 3] - boxes1[..., 1]
    ).clamp(min=0)
    area2 = (boxes2[..., 2] - boxes2[..., 0]).clamp(min=0) * (
        boxes2[..., 3] - boxes2[..., 1]
    ).clamp(min=0)
    lt = torch.max(boxes1[..., :2], boxes2[..., :2])
    rb = torch.min(boxes1[..., 2:], boxes2[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1 + area2 - inter
    iou = inter / (union + _EPS)
    lt_c = torch.min(boxes1[..., :2], boxes2[..., :2])
    rb_c = torch.max(boxes1[..., 2:], boxes2[..., 2:])
    wh_c = (rb_c - lt_c).clamp(min=0)
    enclosure = wh_c[..., 0] * wh_c[..., 1]
    giou = iou - (enclosure - union) / (enclosure + _EPS)
    return iou, giou


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """logit(x) with x clamped to [0, 1] and both sides bounded away from 0 by eps.

    eps 1e-3 is the released DINO / Align-DETR value: a reference box at 0 or 1 (an image-wide
    box, or a two-stage pick of an invalid token) then maps to +-6.9, and the published weights
    were trained with that.
    """
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
