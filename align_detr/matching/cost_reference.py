"""The DETR matching cost as dense PyTorch tensor maths: the path ``MODEL.ALIGN_DETR.KERNELS``
"reference" (or "auto" without our build) runs instead of the compiled
``torch.ops.align_detr.matching_cost``.

Same contract and formula as :func:`align_detr.matching.matching_cost` (the focal class cost
written with the stable sigmoid, GIoU divisions guarded by 1e-12, negative box sizes counted as 0
in the GIoU term), computed per image as a (Q, G_b) matrix; the data checks that the op makes on
the device are made here with plain comparisons.
"""

from typing import List, Sequence

import torch

__all__ = ["matching_cost_reference"]

_GIOU_EPS = 1e-12


def _corners(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) cxcywh -> (..., 4) xyxy with negative sizes clamped to 0 (as the op does)."""
    cx, cy, w, h = boxes.unbind(-1)
    hw, hh = w.clamp(min=0) * 0.5, h.clamp(min=0) * 0.5
    return torch.stack([cx - hw, cy - hh, cx + hw, cy + hh], -1)


def _check_finite(name: str, t: torch.Tensor) -> None:
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise RuntimeError(f"matching_cost: {name} contains non-finite values (NaN or inf)")


def matching_cost_reference(
    pred_logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    gt_labels: Sequence[torch.Tensor],
    gt_boxes: Sequence[torch.Tensor],
    class_weight: float = 2.0,
    bbox_weight: float = 5.0,
    giou_weight: float = 2.0,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> List[torch.Tensor]:
    """B tensors (Q, G_b) of focal + L1 + (-GIoU) costs, float64 if a prediction is, else float32.

    Raises:
        ValueError: inconsistent batch sizes or box shapes.
        RuntimeError: NaN / inf in predictions or GT boxes, labels outside [0, C).
    """
    if pred_logits.dim() != 3 or pred_boxes.dim() != 3 or pred_boxes.shape[-1] != 4:
        raise ValueError(
            "matching_cost: pred_logits must be (B, Q, C) and pred_boxes (B, Q, 4), got "
            f"{tuple(pred_logits.shape)} and {tuple(pred_boxes.shape)}"
        )
    if len(gt_labels) != pred_logits.shape[0] or len(gt_boxes) != pred_logits.shape[0]:
        raise ValueError(
            f"matching_cost: got {len(gt_labels)} label tensors and {len(gt_boxes)} box tensors "
            f"for a batch of {pred_logits.shape[0]} images"
        )
    dtype = torch.float64 if torch.float64 in (pred_logits.dtype, pred_boxes.dtype) else None
    dtype = dtype or torch.float32
    logits, boxes = pred_logits.to(dtype), pred_boxes.to(dtype)
    _check_finite("pred_logits", logits)
    _check_finite("pred_boxes", boxes)
    num_classes = logits.shape[-1]
    # focal cost of every (query, class); 1 - p as sigmoid(-x): no cancellation
    p, not_p = torch.sigmoid(logits), torch.sigmoid(-logits)
    pos = alpha * not_p.pow(gamma) * -torch.log(p + 1e-8)
    neg = (1 - alpha) * p.pow(gamma) * -torch.log(not_p + 1e-8)
    class_cost = pos - neg  # (B, Q, C)
    pred_xyxy = _corners(boxes)
    costs = []
    for b, (labels, gts) in enumerate(zip(gt_labels, gt_boxes)):
        labels = labels.reshape(-1).to(logits.device)
        gts = gts.reshape(-1, 4).to(logits.device, dtype)
        if gts.shape[0] != labels.shape[0]:
            raise ValueError(
                f"matching_cost: image {b} has {labels.shape[0]} GT labels but GT boxes of "
                f"shape {tuple(gt_boxes[b].shape)}"
            )
        _check_finite("gt_boxes", gts)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise RuntimeError(f"matching_cost: gt_labels has values outside [0, {num_classes})")
        cost_class = class_cost[b][:, labels.long()]  # (Q, G)
        l1 = (boxes[b][:, None, :] - gts[None, :, :]).abs().sum(-1)
        a, g = pred_xyxy[b][:, None, :], _corners(gts)[None, :, :]
        inter = torch.minimum(a[..., 2:], g[..., 2:]) - torch.maximum(a[..., :2], g[..., :2])
        inter = inter.clamp(min=0).prod(-1)
        area_a = (a[..., 2:] - a[..., :2]).prod(-1)
        area_g = (g[..., 2:] - g[..., :2]).prod(-1)
        union = area_a + area_g - inter
        enclosure = torch.maximum(a[..., 2:], g[..., 2:]) - torch.minimum(a[..., :2], g[..., :2])
        enclosure = enclosure.prod(-1)
        giou = inter / union.clamp(min=_GIOU_EPS) - (enclosure - union) / enclosure.clamp(
            min=_GIOU_EPS
        )
        costs.append(class_weight * cost_class + bbox_weight * l1 - giou_weight * giou)
    return costs
