# Copyright (c) align-detr contributors.
"""Checkpoint formats of other implementations, converted to ours in memory.

:func:`to_ours` recognises a state dict's format and renames it to this project's names; the
checkpointer calls it for every file ``MODEL.WEIGHTS`` names (training initialisation,
``--eval-only``, the demo), and ``tools/convert_checkpoint.py`` writes converted files, both
ways.
"""

from typing import Dict, Tuple

from .detrex_conditional import (
    detrex_conditional_to_ours,
    is_detrex_conditional,
    ours_to_detrex_conditional,
)
from .detrex_dino import detrex_dino_to_ours, is_detrex_dino, ours_to_detrex_dino
from .detrex_h_deformable import (
    detrex_h_deformable_to_ours,
    is_detrex_h_deformable,
    is_ours_h_deformable,
    ours_to_detrex_h_deformable,
)

__all__ = ["FORMATS", "detect_format", "detrex_format_of_ours", "from_ours", "to_ours"]

#: name -> (description, detect(state) -> bool, to_ours(state), from_ours(state)). Tried in
#: order: H-Deformable-DETR's names include DINO's markers, so it comes first.
FORMATS = {
    "detrex-h-deformable": (
        "detrex H-Deformable-DETR (detrex names)",
        is_detrex_h_deformable,
        detrex_h_deformable_to_ours,
        ours_to_detrex_h_deformable,
    ),
    "detrex-dino": (
        "detrex DINO / official Align-DETR (detrex names)",
        is_detrex_dino,
        detrex_dino_to_ours,
        ours_to_detrex_dino,
    ),
    "detrex-conditional": (
        "detrex Conditional DETR (detrex names)",
        is_detrex_conditional,
        detrex_conditional_to_ours,
        ours_to_detrex_conditional,
    ),
}


def detect_format(state: Dict) -> str:
    """The name of a state dict's format in :data:`FORMATS`, or "ours" for anything else (this
    project's checkpoints, backbone-only files, ...)."""
    for name, (_, detect, _, _) in FORMATS.items():
        if detect(state):
            return name
    return "ours"


def to_ours(state: Dict) -> Tuple[Dict, str]:
    """(state dict with our names, the format it was in)."""
    fmt = detect_format(state)
    if fmt == "ours":
        return state, fmt
    return FORMATS[fmt][2](state), fmt


def from_ours(state: Dict, fmt: str) -> Dict:
    """Our state dict in another format of :data:`FORMATS`."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; known: {sorted(FORMATS)}")
    return FORMATS[fmt][3](state)


def detrex_format_of_ours(state: Dict) -> str:
    """The detrex format our state dict converts to, by its base: Conditional DETR (its decoder
    has the conditional spatial-query FFN), H-Deformable-DETR or DINO."""
    if "transformer.decoder.query_scale.layers.0.weight" in state:
        return "detrex-conditional"
    if is_ours_h_deformable(state):
        return "detrex-h-deformable"
    return "detrex-dino"
