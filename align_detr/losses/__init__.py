# Copyright (c) align-detr contributors.
"""Losses: Align-DETR's Align loss and rank weights, SD-DETR's TAL, focal loss, the criterion."""

from .align import align_cls_loss, quality_target, rank_weights
from .criterion import CLASS_LOSSES, SetCriterion
from .focal import sigmoid_focal_loss
from .soft_bce import dense_soft_bce
from .tal import tal_cls_loss

__all__ = [k for k in globals().keys() if not k.startswith("_")]
