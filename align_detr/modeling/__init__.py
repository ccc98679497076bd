from .align_detr import AlignDETR
from .denoising import DenoisingMeta, build_denoising_queries
from .mobilenet import MobileNetV2Backbone, build_mobilenet_v2_backbone
from .neck import ChannelMapper
from .transformer import DeformableTransformer

__all__ = [k for k in globals().keys() if not k.startswith("_")]
