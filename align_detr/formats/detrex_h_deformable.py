# Copyright (c) align-detr contributors.
"""detrex H-Deformable-DETR checkpoints (``projects/h_deformable_detr``; ``{"model": state_dict}``
with detrex's names), such as its model zoo's "H-Deformable-DETR + tricks" files.

The layout is detrex DINO's (see :mod:`.detrex_dino`) without the denoising label embedding, the
box query-position MLP and the final decoder norm, plus the proposal position projection
(``transformer.pos_trans`` / ``pos_trans_norm``) and the learnt content queries as
``query_embedding`` (one-to-one first, then one-to-many). The heads are stored twice, as in DINO
(``transformer.decoder.class_embed.*`` / ``bbox_embed.*`` aliases).
"""

from typing import Dict

from .detrex_dino import DETREX_DINO_RULES
from .rename import RenameRules

__all__ = [
    "DETREX_H_DEFORMABLE_RULES",
    "detrex_h_deformable_to_ours",
    "is_detrex_h_deformable",
    "ours_to_detrex_h_deformable",
]

#: DINO's rules for what both share; H-Deformable-DETR has no ref_point_head, decoder norm,
#: tgt_embed or label_enc.
_NOT_IN_H_DETR = ("ref_point_head", "decoder.norm", "tgt_embed", "label_enc")

DETREX_H_DEFORMABLE_RULES = RenameRules(
    [rule for rule in DETREX_DINO_RULES.rules if not any(x in rule[0] for x in _NOT_IN_H_DETR)]
    + [
        ("transformer.pos_trans.{p}", "transformer.pos_trans.{p}"),
        ("transformer.pos_trans_norm.{p}", "transformer.pos_trans_norm.{p}"),
        ("query_embedding.{p}", "transformer.query_selector.content.embed.{p}"),
    ]
)

_ALIASES = ("transformer.decoder.class_embed.", "transformer.decoder.bbox_embed.")


def is_detrex_h_deformable(state: Dict) -> bool:
    """A detrex H-Deformable-DETR state dict (detection weights, detrex names)."""
    return "transformer.pos_trans.weight" in state and "query_embedding.weight" in state


def is_ours_h_deformable(state: Dict) -> bool:
    """One of our state dicts of the HDeformableDETR base."""
    return "transformer.pos_trans.weight" in state and "heads.class_heads.0.weight" in state


def detrex_h_deformable_to_ours(state: Dict) -> Dict:
    """Our state dict (HDeformableDETR base) of a detrex H-Deformable-DETR one; drops the head
    aliases. Keys no rule knows are kept as they are (the checkpointer reports them)."""
    kept = {k: v for k, v in state.items() if not k.startswith(_ALIASES)}
    out, unmatched = DETREX_H_DEFORMABLE_RULES.rename(kept)
    out.update({k: kept[k] for k in unmatched})
    return out


def ours_to_detrex_h_deformable(state: Dict) -> Dict:
    """A detrex H-Deformable-DETR state dict of ours (HDeformableDETR base), with the head
    aliases detrex's two-stage model has.

    Raises:
        ValueError: for a key detrex's H-Deformable-DETR has no place for.
    """
    out, unmatched = DETREX_H_DEFORMABLE_RULES.rename(state, to_ours=False)
    unmatched = [k for k in unmatched if k not in ("pixel_mean", "pixel_std")]
    if unmatched:
        raise ValueError(
            f"{len(unmatched)} weights have no detrex H-Deformable-DETR name, e.g. "
            f"{unmatched[:3]}: only the HDeformableDETR base converts to it"
        )
    for key in list(out):
        if key.startswith(("class_embed.", "bbox_embed.")):
            out["transformer.decoder." + key] = out[key]
    return out
