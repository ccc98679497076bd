from .box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid, paired_iou_and_giou
from .ms_deform_attn import MSDeformAttn, ms_deform_attn, ms_deform_attn_grid_sample
from .position_encoding import PositionEmbeddingSine, box_sine_embedding

__all__ = [k for k in globals().keys() if not k.startswith("_")]
