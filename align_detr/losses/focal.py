# Copyright (c) align-detr contributors.
"""Sigmoid focal loss (Lin et al. 2017) as used by Deformable DETR / DINO."""

import torch
import torch.nn.functional as F


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Summed focal loss over every entry.

    Args:
        logits: (..., C) raw scores.
        targets: same shape, in [0, 1] (one-hot for the matched (query, class) entries).

    Returns:
        scalar sum; the caller divides by the GT count.
    """
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss.sum()
