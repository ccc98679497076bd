# Copyright (c) align-detr contributors.
"""SD-DETR's task-alignment classification loss (TAL)."""

from typing import Optional

import torch

from .align import quality_target
from .soft_bce import dense_soft_bce

# SD-DETR's target t = s^0.25 * IoU^0.75.
TAL_ALPHA = 0.25


def tal_cls_loss(
    logits: torch.Tensor,
    pos_query: torch.Tensor,
    pos_label: torch.Tensor,
    pos_iou: torch.Tensor,
    pos_weight: Optional[torch.Tensor] = None,
    gamma: float = 2.0,
    normalizer: float = 1.0,
) -> torch.Tensor:
    """Positives: |t - s|^gamma * BCE(s, t) with t = s^0.25 IoU^0.75 (detached); every other
    entry: s^gamma * BCE(s, 0). Summed and divided by the normalizer.

    Args:
        logits: (Q, C) raw scores; pos_query, pos_label, pos_iou: (P,) matched entries.
        pos_weight: optional (P,) factor on the positives' targets (rank weights).

    Returns:
        scalar, computed with logsigmoid so it is finite for any logit.
    """
    prob = logits.sigmoid()
    if pos_query.numel() == 0:
        return dense_soft_bce(logits, prob, pos_query, pos_label, None, None, gamma) / normalizer
    s = prob[pos_query, pos_label]
    t = quality_target(s, pos_iou, TAL_ALPHA, floor=0.0)
    if pos_weight is not None:
        t = t * pos_weight.detach()
    focus = (t - s).abs().pow(gamma)  # in the graph, like focal loss's modulating factor
    return (
        dense_soft_bce(logits, prob, pos_query, pos_label, focus * t, focus * (1 - t), gamma)
        / normalizer
    )
