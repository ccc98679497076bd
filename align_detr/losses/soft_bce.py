# Copyright (c) align-detr contributors.
"""The dense weighted binary cross-entropy shared by the Align loss and TAL."""

import torch
import torch.nn.functional as F

__all__ = ["dense_soft_bce"]


def dense_soft_bce(
    logits: torch.Tensor, prob: torch.Tensor, pos_query, pos_label, pos_w, pos_neg_w, gamma: float
) -> torch.Tensor:
    """Sum over every (query, class) entry of neg_w * x - (pos_w + neg_w) * logsigmoid(x):
    a weighted BCE, finite for any logit x. Every entry gets neg_w = p^gamma (in the graph, as
    in focal loss) and pos_w = 0, except the matched entries, which get (pos_w, pos_neg_w).

    Args:
        logits, prob: (Q, C) raw scores and their sigmoid.
        pos_query, pos_label: (P,) matched entries; pos_w, pos_neg_w: (P,) or None when P = 0.
    """
    neg_w = prob.pow(gamma)
    pos = torch.zeros_like(logits)
    if pos_query.numel() > 0:
        pos = pos.index_put((pos_query, pos_label), pos_w)
        neg_w = neg_w.index_put((pos_query, pos_label), pos_neg_w)
    return (neg_w * logits - (pos + neg_w) * F.logsigmoid(logits)).sum()
