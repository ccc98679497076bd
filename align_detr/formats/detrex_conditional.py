# Copyright (c) align-detr contributors.
"""detrex Conditional DETR checkpoints (``projects/conditional_detr``; ``{"model": state_dict}``
with detrex's names).

The R50 models use detrex's copy of detectron2's ResNet (our backbone names); the DC5 models use
torchvision's ResNet (``backbone.body.layer4...``), whose names are mapped to detectron2's on
the way in (FrozenBN buffers as they are). Converting ours back writes the detectron2 layout.
The class and box heads are single modules shared by every decoder layer (ours: pair 0).
"""

from typing import Dict

from .rename import RenameRules

__all__ = [
    "DETREX_CONDITIONAL_RULES",
    "detrex_conditional_to_ours",
    "is_detrex_conditional",
    "ours_to_detrex_conditional",
]

_ENC = "transformer.encoder.layers.{i}"
_DEC = "transformer.decoder.layers.{i}"

DETREX_CONDITIONAL_RULES = RenameRules(
    [
        ("backbone.{p}", "backbone.{p}"),
        ("input_proj.{p}", "neck.proj.{p}"),
        (_ENC + ".attentions.0.attn.{p}", _ENC + ".self_attn.{p}"),
        (_ENC + ".norms.0.{p}", _ENC + ".norm.{p}"),
        (_ENC + ".ffns.0.layers.0.0.{p}", _ENC + ".ffn.linear1.{p}"),
        (_ENC + ".ffns.0.layers.1.{p}", _ENC + ".ffn.linear2.{p}"),
        (_ENC + ".norms.1.{p}", _ENC + ".ffn.norm.{p}"),
        (_DEC + ".attentions.0.{p}", _DEC + ".self_attn.attn.{p}"),
        (_DEC + ".norms.0.{p}", _DEC + ".self_attn.norm.{p}"),
        (_DEC + ".attentions.1.{p}", _DEC + ".cross.attn.{p}"),
        (_DEC + ".norms.1.{p}", _DEC + ".cross.norm.{p}"),
        (_DEC + ".ffns.0.layers.0.0.{p}", _DEC + ".cross.ffn.linear1.{p}"),
        (_DEC + ".ffns.0.layers.1.{p}", _DEC + ".cross.ffn.linear2.{p}"),
        (_DEC + ".norms.2.{p}", _DEC + ".cross.ffn.norm.{p}"),
        ("transformer.decoder.query_scale.{p}", "transformer.decoder.query_scale.{p}"),
        ("transformer.decoder.ref_point_head.{p}", "transformer.decoder.ref_point_head.{p}"),
        ("transformer.decoder.post_norm_layer.{p}", "transformer.decoder.norm.{p}"),
        ("query_embed.{p}", "transformer.query_embed.{p}"),
        ("class_embed.{p}", "heads.class_heads.0.{p}"),
        ("bbox_embed.{p}", "heads.box_heads.0.{p}"),
    ]
)


def _torchvision_resnet_rules() -> RenameRules:
    """torchvision ResNet (detrex's TorchvisionResNet, ``backbone.body.*``) -> detectron2."""
    tv, d2 = "backbone.body.", "backbone."
    rules = [
        (tv + "conv1.{p}", d2 + "stem.conv1.{p}"),
        (tv + "bn1.{p}", d2 + "stem.conv1.norm.{p}"),
    ]
    for layer in range(1, 5):
        a, b = f"{tv}layer{layer}.{{i}}.", f"{d2}res{layer + 1}.{{i}}."
        for k in (1, 2, 3):
            rules.append((a + f"conv{k}.{{p}}", b + f"conv{k}.{{p}}"))
            rules.append((a + f"bn{k}.{{p}}", b + f"conv{k}.norm.{{p}}"))
        rules.append((a + "downsample.0.{p}", b + "shortcut.{p}"))
        rules.append((a + "downsample.1.{p}", b + "shortcut.norm.{p}"))
    return RenameRules(rules)


_TORCHVISION_RULES = _torchvision_resnet_rules()


def is_detrex_conditional(state: Dict) -> bool:
    """A detrex Conditional DETR state dict (detection weights, detrex names)."""
    return "query_embed.weight" in state and "transformer.decoder.query_scale.layers.0.weight" in (
        state
    )


def detrex_conditional_to_ours(state: Dict) -> Dict:
    """Our state dict (ConditionalDETR base) of a detrex Conditional DETR one. Keys no rule
    knows are kept as they are (the checkpointer reports them as unexpected)."""
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    tv = {k: v for k, v in state.items() if k.startswith("backbone.body.")}
    rest = {k: v for k, v in state.items() if k not in tv}
    backbone, tv_unmatched = _TORCHVISION_RULES.rename(tv)
    out, unmatched = DETREX_CONDITIONAL_RULES.rename(rest)
    out.update(backbone)
    out.update({k: state[k] for k in unmatched + tv_unmatched})
    return out


def ours_to_detrex_conditional(state: Dict) -> Dict:
    """A detrex Conditional DETR state dict of ours (ConditionalDETR base, plain decoder).

    Raises:
        ValueError: for a key detrex's Conditional DETR has no place for (e.g. SD-DETR's second
            stream or its mini-detector).
    """
    out, unmatched = DETREX_CONDITIONAL_RULES.rename(state, to_ours=False)
    unmatched = [k for k in unmatched if k not in ("pixel_mean", "pixel_std")]
    if unmatched:
        raise ValueError(
            f"{len(unmatched)} weights have no detrex Conditional DETR name, e.g. "
            f"{unmatched[:3]}: only the ConditionalDETR base with the plain decoder converts"
        )
    return out
