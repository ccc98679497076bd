"""Minimum-cost one-to-one and many-to-one assignment of queries to ground truth.

Many-to-one matching (Align-DETR) gives every GT ``k`` distinct queries by replicating the GT
columns of the cost matrix ``k`` times and solving one rectangular linear assignment; ``k = 1`` is
the usual Hungarian matching of DETR. The solver is our compiled
``torch.ops.align_detr.assign_batch`` (csrc/matching/assign_cpu.cpp): the same exact
shortest-augmenting-path algorithm as SciPy's ``linear_sum_assignment``, vectorised, with the
replication done without copies and all images of a batch solved in one parallel call.
:func:`assign_scipy` is the same contract on SciPy (the reference of the tests and benchmark,
and the fallback for costs with inf entries).
"""

from typing import List, Sequence, Tuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from align_detr import _ext, kernels

_EMPTY = np.zeros((0,), dtype=np.int64)


def effective_k(k: int, num_queries: int, num_gt: int) -> int:
    """Queries per GT: ``max(1, min(k, Q // G))``, so that k * G never exceeds Q when it can.

    Computed per image (the official Align-DETR code lets the cap of one image leak into the
    next ones of the batch).
    """
    if num_gt <= 0:
        return max(1, int(k))
    return max(1, min(int(k), num_queries // num_gt))


def check_k(k, caller: str = "assign") -> int:
    """Returns ``k`` as an int; raises a ValueError naming ``k`` unless it is an integer >= 1."""
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"{caller}: k must be a positive integer, got {k}")
    return int(k)


def assign_scipy(cost: np.ndarray, k: int = 1) -> Tuple[np.ndarray, np.ndarray]:
    """:func:`assign` on SciPy for a NumPy (Q, G) array; returns NumPy int64 arrays.

    +inf entries forbid a pair (SciPy raises if no complete assignment is then possible).
    """
    if cost.ndim != 2:
        raise ValueError(f"assign: cost must be (Q, G), got shape {cost.shape}")
    k = check_k(k)
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
    # inside each GT's group.
    order = np.argsort(cols, kind="stable")
    return rows[order].astype(np.int64, copy=False), cols[order].astype(np.int64, copy=False)


def assign_flat(
    flat: torch.Tensor, sizes: Sequence[int], num_queries: int, k: int
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Solves every image of a batch from ``matching_cost``'s flat GT-major output, in one call.

    Args:
        flat: (Q * sum(sizes),) float32 / float64 host tensor, image b's (G_b, Q) block at
            Q * sum(sizes[:b]).
        sizes: G_b of each image.
        num_queries: Q.
        k: requested queries per GT; capped per image.

    Returns:
        B tuples ``(rows, cols)`` as :func:`assign` returns them.
    """
    k = check_k(k)
    offsets = torch.tensor([0] + list(np.cumsum(sizes, dtype=np.int64)), dtype=torch.int64)
    rows, cols, pair_offsets = _ext.ops().assign_batch(flat, offsets, num_queries, k)
    counts = torch.diff(pair_offsets).tolist()
    return list(zip(torch.split(rows, counts), torch.split(cols, counts)))


def assign(cost: torch.Tensor, k: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Minimum-total-cost assignment in which every GT gets exactly ``k_eff`` distinct queries.

    ``k_eff = max(1, min(k, Q // G))``; no query is assigned twice. With k = 1 (or Q < G) this is
    the plain Hungarian matching, which pairs min(Q, G) queries and GTs.

    Args:
        cost: (Q, G) cost matrix (any device and floating dtype; solved on the host in float64
            potentials). +inf entries forbid a pair; NaN raises.
        k: requested queries per GT.

    Returns:
        ``(rows, cols)``, int64 CPU tensors of length ``k_eff * G`` (``min(Q, G)`` when Q < G):
        query ``rows[i]`` is matched to GT ``cols[i]``. Grouped by GT (cols non-decreasing), and
        increasing in the query index within a GT. Empty when G = 0 or Q = 0.
    """
    if cost.dim() != 2:
        raise ValueError(f"assign: cost must be (Q, G), got shape {tuple(cost.shape)}")
    k = check_k(k)
    c = cost.detach().cpu()
    if c.dtype not in (torch.float32, torch.float64):
        c = c.to(torch.float32 if c.dtype in (torch.float16, torch.bfloat16) else torch.float64)
    if not bool(torch.isfinite(c).all()) or not kernels.use_compiled(c.device, "assign"):
        rows, cols = assign_scipy(c.numpy(), k)
        return torch.from_numpy(rows), torch.from_numpy(cols)
    num_queries, num_gt = c.shape
    # GT-major, the layout the solver scans (free when cost is a matching_cost view).
    flat = c.t().contiguous().reshape(-1)
    return assign_flat(flat, [num_gt], num_queries, k)[0]
