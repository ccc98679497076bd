# Copyright (c) align-detr contributors.
"""detrex DINO / official Align-DETR checkpoints (``{"model": state_dict}`` with detrex's names).

The official Align-DETR code is detrex's DINO with another criterion, so both zoos share one
layout. Differences beyond names: the heads are stored twice (``class_embed.*`` and the aliases
``transformer.decoder.class_embed.*`` left by ``decoder.class_embed = class_embed``; same for
``bbox_embed``), and the denoising label embedding ``label_enc`` has C rows where ours has
C + 1 (our extra row is never used as a label).
"""

from typing import Dict

import torch

from .rename import RenameRules

__all__ = ["DETREX_DINO_RULES", "detrex_dino_to_ours", "is_detrex_dino", "ours_to_detrex_dino"]

_ENC = "transformer.encoder.layers.{i}"
_DEC = "transformer.decoder.layers.{i}"
_OUR_ENC = "transformer.encoder.layers.{i}"
_OUR_DEC = "transformer.decoder.layers.{i}"

DETREX_DINO_RULES = RenameRules(
    [
        ("backbone.{p}", "backbone.{p}"),
        ("neck.convs.{i}.conv.{p}", "neck.lateral.{i}.0.{p}"),
        ("neck.convs.{i}.norm.{p}", "neck.lateral.{i}.1.{p}"),
        ("neck.extra_convs.{i}.conv.{p}", "neck.extra.{i}.0.{p}"),
        ("neck.extra_convs.{i}.norm.{p}", "neck.extra.{i}.1.{p}"),
        ("transformer.level_embeds", "transformer.encoder.level_embed"),
        (_ENC + ".attentions.0.{p}", _OUR_ENC + ".self_attn.{p}"),
        (_ENC + ".norms.0.{p}", _OUR_ENC + ".norm.{p}"),
        (_ENC + ".ffns.0.layers.0.0.{p}", _OUR_ENC + ".ffn.linear1.{p}"),
        (_ENC + ".ffns.0.layers.1.{p}", _OUR_ENC + ".ffn.linear2.{p}"),
        (_ENC + ".norms.1.{p}", _OUR_ENC + ".ffn.norm.{p}"),
        (_DEC + ".attentions.0.attn.{p}", _OUR_DEC + ".self_attn.attn.{p}"),
        (_DEC + ".norms.0.{p}", _OUR_DEC + ".self_attn.norm.{p}"),
        (_DEC + ".attentions.1.{p}", _OUR_DEC + ".cross.attn.{p}"),
        (_DEC + ".norms.1.{p}", _OUR_DEC + ".cross.norm.{p}"),
        (_DEC + ".ffns.0.layers.0.0.{p}", _OUR_DEC + ".cross.ffn.linear1.{p}"),
        (_DEC + ".ffns.0.layers.1.{p}", _OUR_DEC + ".cross.ffn.linear2.{p}"),
        (_DEC + ".norms.2.{p}", _OUR_DEC + ".cross.ffn.norm.{p}"),
        ("transformer.decoder.ref_point_head.{p}", "transformer.decoder.ref_point_head.{p}"),
        ("transformer.decoder.norm.{p}", "transformer.decoder.norm.{p}"),
        ("transformer.tgt_embed.{p}", "transformer.query_selector.content.embed.{p}"),
        ("transformer.enc_output.{p}", "transformer.query_selector.enc_output.{p}"),
        ("transformer.enc_output_norm.{p}", "transformer.query_selector.enc_output_norm.{p}"),
        ("class_embed.{i}.{p}", "heads.class_heads.{i}.{p}"),
        ("bbox_embed.{i}.{p}", "heads.box_heads.{i}.{p}"),
        ("label_enc.{p}", "transformer.denoising.label_embed.{p}"),
    ]
)

_ALIASES = ("transformer.decoder.class_embed.", "transformer.decoder.bbox_embed.")
_LABEL = "transformer.denoising.label_embed.weight"


def is_detrex_dino(state: Dict) -> bool:
    """A detrex DINO / official Align-DETR state dict (detection weights, detrex names)."""
    return "transformer.level_embeds" in state and any(k.startswith("class_embed.") for k in state)


def detrex_dino_to_ours(state: Dict) -> Dict:
    """Our state dict (DINO base) of a detrex DINO / official Align-DETR one.

    Drops the head aliases and appends the never-used padding row of our label embedding (zeros).
    Keys no rule knows are kept as they are (the checkpointer reports them as unexpected).
    """
    kept = {k: v for k, v in state.items() if not k.startswith(_ALIASES)}
    out, unmatched = DETREX_DINO_RULES.rename(kept)
    out.update({k: kept[k] for k in unmatched})
    if _LABEL in out:
        label = out[_LABEL]
        out[_LABEL] = torch.cat([label, label.new_zeros(1, label.shape[1])], 0)
    return out


def ours_to_detrex_dino(state: Dict) -> Dict:
    """A detrex DINO / official Align-DETR state dict of ours (DINO base, plain decoder).

    Drops our label embedding's padding row and writes the head aliases detrex expects.

    Raises:
        ValueError: for a key detrex's DINO has no place for (e.g. SD-DETR's second stream).
    """
    out, unmatched = DETREX_DINO_RULES.rename(state, to_ours=False)
    unmatched = [k for k in unmatched if k not in ("pixel_mean", "pixel_std")]
    if unmatched:
        raise ValueError(
            f"{len(unmatched)} weights have no detrex DINO name, e.g. {unmatched[:3]}: only the "
            "DINO base with the plain decoder converts to detrex"
        )
    if "label_enc.weight" in out:
        out["label_enc.weight"] = out["label_enc.weight"][:-1]
    for key in list(out):
        if key.startswith(("class_embed.", "bbox_embed.")):
            out["transformer.decoder." + key] = out[key]
    return out
