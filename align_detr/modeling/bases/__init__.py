# Copyright (c) align-detr contributors.
"""Base detectors: the part of a DETR detector between the backbone and the criterion.

A base is a :class:`DetrBase` subclass registered in :data:`BASE_REGISTRY` under the name that
``MODEL.ALIGN_DETR.BASE`` selects. The meta-architecture (:class:`~align_detr.modeling.AlignDETR`)
owns the backbone, the criterion, pre- and post-processing; the base provides the neck, the
position encoding, the transformer and the prediction heads (:class:`BaseParts`), and says how
many matched outputs it produces. Align-DETR's loss and many-to-one matching act on those
outputs and so work with every base; denoising and SD-DETR's decoupled decoder are parts a base
builds when its config asks for them.

The transformer's contract::

    outputs = transformer(srcs, masks, pos, heads, targets)
    #   srcs, pos: L tensors (N, d, H_l, W_l) from the neck / position encoding
    #   masks:     L tensors (N, H_l, W_l) bool, True on padding
    #   heads:     the base's DetectionHeads
    #   targets:   per image {"labels": (G,), "boxes": (G, 4) normalised cxcywh}, or None
    #   outputs:   {"layers": [{"pred_logits": (N, K, C), "pred_boxes": (N, K, 4)}, ...],
    #               "enc": the same for the encoder proposals, or None,
    #               "dn_layers": per-layer predictions of the DN queries, or None,
    #               "dn_meta": DenoisingMeta, or None,
    #               optional "one2many_layers": per-layer predictions of a one-to-many query
    #               group (H-DETR's hybrid branch, training only), or None}
"""

from typing import Dict, List, NamedTuple

from detectron2.utils.registry import Registry
from torch import nn

__all__ = ["BASE_REGISTRY", "BaseParts", "DetrBase", "build_base"]

BASE_REGISTRY = Registry("ALIGN_DETR_BASE")
BASE_REGISTRY.__doc__ = (
    """Base detectors selected by MODEL.ALIGN_DETR.BASE (DetrBase subclasses)."""
)


class BaseParts(NamedTuple):
    """The modules a base detector contributes to the meta-architecture."""

    neck: nn.Module  # backbone features (dict) -> L maps (N, d, H_l, W_l), finest first
    position_embedding: nn.Module  # (N, H, W) padding mask -> (N, d, H, W)
    transformer: nn.Module  # see the module docstring for its call
    heads: nn.Module  # DetectionHeads


class DetrBase:
    """Interface of a base detector (a namespace of class methods; never instantiated)."""

    @classmethod
    def num_matched_outputs(cls, cfg) -> int:
        """Outputs the criterion matches, in the order of ``LOSS.MATCH_K``."""
        raise NotImplementedError

    @classmethod
    def check_config(cls, cfg) -> List[str]:
        """Problems with the base's own config values (empty when fine)."""
        return []

    @classmethod
    def criterion_options(cls, cfg) -> Dict:
        """Extra :class:`~align_detr.losses.SetCriterion` arguments the base needs (e.g. its
        encoder's class-agnostic targets, its one-to-many branch)."""
        return {}

    @classmethod
    def build(cls, cfg, input_shape) -> BaseParts:
        """Builds the parts for the backbone output shapes ``input_shape``."""
        raise NotImplementedError


def build_base(cfg, input_shape) -> BaseParts:
    """The parts of the base detector named by ``MODEL.ALIGN_DETR.BASE``."""
    return BASE_REGISTRY.get(cfg.MODEL.ALIGN_DETR.BASE).build(cfg, input_shape)


# Importing a base module registers it.
from . import conditional, dino, h_deformable  # noqa: E402,F401
