"""DETR matcher on the compiled matching cost: one-to-one (Hungarian) and many-to-one."""

from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from align_detr import kernels

from .assignment import assign_flat, assign_scipy, check_k
from .cost import check_error_word, matching_cost_flat
from .cost_reference import matching_cost_reference


class HungarianMatcher(nn.Module):
    """Matches queries to ground truth by minimum focal + L1 + (-GIoU) cost, ``k`` queries per GT.

    The costs of the whole batch come from one compiled call (each image against its own GT),
    reach the host in one copy (the only device synchronisation of a call; data errors found on
    the device travel with it) and are solved there by one compiled call (images in parallel),
    with ``k_eff = max(1, min(k, Q // G_b))`` computed for each image alone. ``k = 1`` is the
    one-to-one matching of DETR; ``k > 1`` the many-to-one matching of Align-DETR.

    Args:
        cost_class, cost_bbox, cost_giou: weights of the focal class cost, the L1 box cost on
            normalised cxcywh and the (-GIoU) cost.
        alpha, gamma: focal-cost parameters.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
    ):
        super().__init__()
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.alpha = alpha
        self.gamma = gamma

    @torch.no_grad()
    def forward(
        self,
        outputs: Dict[str, torch.Tensor],
        targets: Sequence[Dict[str, torch.Tensor]],
        k: int = 1,
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Matches one output (one decoder layer or the encoder proposals) of a batch.

        Args:
            outputs: ``pred_logits`` (B, Q, C) raw logits and ``pred_boxes`` (B, Q, 4)
                normalised cxcywh.
            targets: B dicts with ``labels`` (G_b,) int64 and ``boxes`` (G_b, 4) normalised
                cxcywh.
            k: queries per GT (a positive integer; capped per image).

        Returns:
            B tuples ``(query_idx, gt_idx)`` of int64 CPU tensors, grouped by GT index; each GT of
            image b appears exactly ``max(1, min(k, Q // G_b))`` times (once per query when
            Q < G_b, which then leaves GTs unmatched) and no query appears twice.
        """
        k = check_k(k, "matcher")
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if len(targets) != logits.shape[0]:
            raise ValueError(
                f"matcher: {len(targets)} targets for a batch of {logits.shape[0]} images"
            )
        num_queries = logits.shape[1]
        labels = [t["labels"] for t in targets]
        gt_boxes = [t["boxes"] for t in targets]
        if not kernels.use_compiled(logits.device, "matching"):
            return self._match_reference(logits, boxes, labels, gt_boxes, k)
        flat, sizes = matching_cost_flat(
            logits, boxes, labels, gt_boxes, *self._cost_weights(), defer_errors=True
        )
        # The one device-to-host copy of the batch (costs and error word), then all images
        # solved in one call.
        costs = check_error_word(flat.cpu(), logits, boxes, labels, gt_boxes)
        return assign_flat(costs, sizes, num_queries, k)

    def _cost_weights(self):
        """The cost's (class, bbox, giou) weights and focal (alpha, gamma), in call order."""
        return self.cost_class, self.cost_bbox, self.cost_giou, self.alpha, self.gamma

    def _match_reference(self, logits, boxes, labels, gt_boxes, k):
        """The same matching on the PyTorch cost and SciPy's solver (the reference path)."""
        costs = matching_cost_reference(logits, boxes, labels, gt_boxes, *self._cost_weights())
        indices = []
        for cost in costs:
            rows, cols = assign_scipy(cost.cpu().double().numpy(), k)
            indices.append((torch.from_numpy(rows), torch.from_numpy(cols)))
        return indices

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, "
            f"cost_giou={self.cost_giou}, alpha={self.alpha}, gamma={self.gamma}"
        )
