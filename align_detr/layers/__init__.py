# Copyright (c) align-detr contributors.
"""Layers: multi-scale deformable attention on the compiled op, position encodings, box
operations, MLP / FFN blocks. Importing this package loads neither detectron2's engine nor the
model."""

from .box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid, paired_iou_and_giou
from .mlp import FFN, MLP
from .ms_deform_attn import MSDeformAttn, ms_deform_attn
from .position_encoding import PositionEmbeddingSine, box_sine_embedding

__all__ = [k for k in globals().keys() if not k.startswith("_")]
