# Copyright (c) align-detr contributors.
"""The model: importing this package registers the ``AlignDETR`` meta-architecture, the
MobileNetV2 backbone and the base detectors (``MODEL.ALIGN_DETR.BASE``) with detectron2."""

from .bases import BASE_REGISTRY, BaseParts, DetrBase, build_base
from .denoising import ContrastiveDenoising, DenoisingMeta, build_denoising_queries
from .meta_arch import AlignDETR, build_criterion
from .mobilenet import MobileNetV2Backbone, build_mobilenet_v2_backbone
from .neck import ChannelMapper
from .streams import Streams
from .test_time_augmentation import DihedralTTA, build_tta_model, weighted_box_fusion

__all__ = [k for k in globals().keys() if not k.startswith("_")]
