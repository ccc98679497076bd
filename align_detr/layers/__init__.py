from .ms_deform_attn import MSDeformAttn, ms_deform_attn, ms_deform_attn_grid_sample

__all__ = [k for k in globals().keys() if not k.startswith("_")]
