# Copyright (c) align-detr contributors.
"""Per-output class and box prediction heads."""

import copy
import math

from torch import nn

from align_detr.layers import MLP

__all__ = ["DetectionHeads"]


class DetectionHeads(nn.Module):
    """A class head (linear, focal prior) and a box head (3-layer MLP, last layer zeroed, so
    every query starts at its reference box) per matched output.

    The class heads map (..., d_model) to (..., num_classes) logits, the box heads to (..., 4)
    deltas in inverse-sigmoid space; how a delta is applied is the base detector's business.

    Args:
        d_model: width of the decoder outputs.
        num_classes: C.
        num_outputs: number of (class, box) head pairs, e.g. one per decoder layer plus one
            for the encoder proposals (DINO's order: decoder layers first, encoder last).
        prior_prob: initial foreground probability of the class heads.
    """

    def __init__(self, d_model: int, num_classes: int, num_outputs: int, prior_prob: float = 0.01):
        super().__init__()
        class_head = nn.Linear(d_model, num_classes)
        nn.init.constant_(class_head.bias, -math.log((1 - prior_prob) / prior_prob))
        box_head = MLP(d_model, d_model, 4, 3)
        nn.init.zeros_(box_head.layers[-1].weight)
        nn.init.zeros_(box_head.layers[-1].bias)
        self.num_classes = num_classes
        self.class_heads = nn.ModuleList(copy.deepcopy(class_head) for _ in range(num_outputs))
        self.box_heads = nn.ModuleList(copy.deepcopy(box_head) for _ in range(num_outputs))
