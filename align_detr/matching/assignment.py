"""Minimum-cost one-to-one and many-to-one assignment of queries to ground truth.

Many-to-one matching (Align-DETR) gives every GT ``k`` distinct queries by replicating the GT
columns of the cost matrix ``k`` times and solving one rectangular linear assignment; ``k = 1`` is
the usual Hungarian matching of DETR. The solver is SciPy's ``linear_sum_assignment`` (a
Jonker-Volgenant shortest augmenting path, exact).
"""

from typing import Tuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

_EMPTY = np.zeros((0,), dtype=np.int64)


def effective_k(k: int, num_queries: int, num_gt: int) -> int:
    """Queries per GT: ``max(1, min(k, Q // G))``, so that k * G never exceeds Q when it can.

    Computed per image (the official Align-DETR code lets the cap of one image leak into the
    next ones of the batch).
    """
    if num_gt <= 0:
        return max(1, int(k))
    return max(1, min(int(k), num_queries // num_gt))


def assign_numpy(cost: np.ndarray, k: int = 1) -> Tuple[np.ndarray, np.ndarray]:
    """:func:`assign` on a NumPy (Q, G) array; returns NumPy int64 arrays."""
    if cost.ndim != 2:
        raise ValueError(f"assign: cost must be (Q, G), got shape {cost.shape}")
    if int(k) != k or k < 1:
        raise ValueError(f"assign: k must be a positive integer, got {k}")
    num_queries, num_gt = cost.shape
    if num_gt == 0 or num_queries == 0:
        return _EMPTY, _EMPTY
    k_eff = effective_k(k, num_queries, num_gt)
    if k_eff > 1:
        # Column j * G + g is copy j of GT g; the solver then gives each copy its own query.
        cost = np.tile(cost, (1, k_eff))
    rows, cols = linear_sum_assignment(cost)
    if k_eff > 1:
        cols = cols % num_gt
    # The solver returns rows in increasing order; a stable sort on the GT keeps that order
    # inside each GT's group, so the output is deterministic.
    order = np.argsort(cols, kind="stable")
    return rows[order].astype(np.int64, copy=False), cols[order].astype(np.int64, copy=False)


def assign(cost: torch.Tensor, k: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Minimum-total-cost assignment in which every GT gets exactly ``k_eff`` distinct queries.

    ``k_eff = max(1, min(k, Q // G))``; no query is assigned twice. With k = 1 (or Q < G) this is
    the plain Hungarian matching, which pairs min(Q, G) queries and GTs.

    Args:
        cost: (Q, G) cost matrix (any device; solved on the host).
        k: requested queries per GT.

    Returns:
        ``(rows, cols)``, int64 CPU tensors of length ``k_eff * G`` (``min(Q, G)`` when Q < G):
        query ``rows[i]`` is matched to GT ``cols[i]``. Grouped by GT (a stable sort on cols), and
        increasing in the query index within a GT. Empty when G = 0 or Q = 0.
    """
    if cost.dim() != 2:
        raise ValueError(f"assign: cost must be (Q, G), got shape {tuple(cost.shape)}")
    rows, cols = assign_numpy(cost.detach().cpu().numpy(), k)
    return torch.from_numpy(rows), torch.from_numpy(cols)
