# Copyright (c) align-detr contributors.
"""Align-DETR's classification loss (released IA-BCE form) and rank-based down-weighting."""

from typing import Optional

import torch

from .soft_bce import dense_soft_bce


def quality_target(
    pos_score: torch.Tensor, pos_iou: torch.Tensor, alpha: float, floor: float = 0.01
) -> torch.Tensor:
    """t = s^alpha * IoU^(1 - alpha), clamped at `floor` and detached (no gradient through t)."""
    s = pos_score.detach().clamp(min=0)
    u = pos_iou.detach().clamp(min=0)
    return (s.pow(alpha) * u.pow(1 - alpha)).clamp(min=floor)


def rank_weights(quality: torch.Tensor, gt_index: torch.Tensor, tau: float) -> torch.Tensor:
    """exp(-rank / tau), rank of each positive among the positives of its GT by quality.

    Args:
        quality: (P,) detached quality t of each positive.
        gt_index: (P,) int64 GT id of each positive (ids of different images must differ).
        tau: temperature, > 0.

    Returns:
        (P,) weights; the best positive of each GT gets 1. Ties are ranked by position (the
        matcher's order), so equal qualities still get distinct ranks.
    """
    if tau <= 0:
        raise ValueError(f"rank_weights: tau must be > 0, got {tau}")
    p = quality.numel()
    if p == 0:
        return quality.new_zeros(0)
    position = torch.arange(p, device=quality.device)
    # sort by quality (descending), then stably by GT: positives of a GT become contiguous and
    # ordered best first; the rank is the offset from the first entry of the GT's run
    by_quality = torch.sort(quality.detach(), descending=True, stable=True).indices
    order = by_quality[torch.sort(gt_index[by_quality], stable=True).indices]
    sorted_gt = gt_index[order]
    run_start = torch.ones(p, dtype=torch.bool, device=quality.device)
    run_start[1:] = sorted_gt[1:] != sorted_gt[:-1]
    start_pos = torch.cummax(torch.where(run_start, position, 0), 0).values
    ranks = torch.empty(p, dtype=quality.dtype, device=quality.device)
    ranks[order] = (position - start_pos).to(quality.dtype)
    return torch.exp(-ranks / tau)


def align_cls_loss(
    logits: torch.Tensor,
    pos_query: torch.Tensor,
    pos_label: torch.Tensor,
    pos_iou: torch.Tensor,
    pos_weight: Optional[torch.Tensor] = None,
    alpha: float = 0.25,
    gamma: float = 2.0,
    normalizer: float = 1.0,
) -> torch.Tensor:
    """Align loss: soft-target BCE towards w * t on the matched entries, p^gamma * BCE(p, 0)
    on every other entry; summed and divided by the normalizer.

    Args:
        logits: (Q, C) raw scores.
        pos_query, pos_label: (P,) int64 matched query and its GT class.
        pos_iou: (P,) IoU of each matched pair.
        pos_weight: (P,) rank weights w (default 1).

    Returns:
        scalar. Written as neg_w * x - (pos_w + neg_w) * logsigmoid(x), finite for any logit.
    """
    prob = logits.sigmoid()
    if pos_query.numel() == 0:
        return dense_soft_bce(logits, prob, pos_query, pos_label, None, None, gamma) / normalizer
    t = quality_target(prob[pos_query, pos_label], pos_iou, alpha)
    if pos_weight is not None:
        t = t * pos_weight.detach()
    return dense_soft_bce(logits, prob, pos_query, pos_label, t, 1 - t, gamma) / normalizer
