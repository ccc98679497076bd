#!/usr/bin/env python
# Copyright (c) align-detr contributors.
"""Converts checkpoints between this project's names and detrex's (detrex DINO, the official
Align-DETR, detrex H-Deformable-DETR, detrex Conditional DETR), both ways.

Loading through ``MODEL.WEIGHTS`` already converts in memory; this writes the converted file,
e.g. to evaluate a model trained here with detrex's tools::

    python tools/convert_checkpoint.py aligndetr_r50_12ep.pth ours.pth             # -> ours
    python tools/convert_checkpoint.py output/align_r50/model_final.pth dx.pth --to detrex

Only the model weights are kept (``{"model": state_dict}``); optimizer and scheduler states are
dropped. With ``--to ours`` the input's format is detected; a file already in our names is
refused rather than copied. With ``--to detrex`` the detrex project follows from the weights'
base (Conditional DETR or DINO).
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from align_detr.utils.quiet import quiet_third_party_warnings  # noqa: E402

quiet_third_party_warnings()  # first: some of detectron2's warnings come when it is imported

from align_detr.formats import (  # noqa: E402
    FORMATS,
    detect_format,
    detrex_format_of_ours,
    from_ours,
    to_ours,
)

#: --to choices; "detrex" picks the detrex format of the checkpoint's base detector.
_TARGETS = ("ours", "detrex")


def convert(src: str, dst: str, to: str = "ours") -> str:
    """Writes ``dst`` converted from ``src``; returns a one-line summary."""
    checkpoint = torch.load(src, map_location="cpu", weights_only=False)
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{src} holds no state dict of weights")
    fmt = detect_format(state)
    if to == "ours":
        if fmt == "ours":
            raise ValueError(f"{src} is not in a known foreign format ({sorted(FORMATS)})")
        out, _ = to_ours(state)
        what = f"{FORMATS[fmt][0]} -> align-detr"
    else:
        if fmt != "ours":
            raise ValueError(f"{src} is already in another format ({FORMATS[fmt][0]})")
        target = detrex_format_of_ours(state)
        out = from_ours(state, target)
        what = f"align-detr -> {FORMATS[target][0]}"
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    torch.save({"model": out}, dst)
    return f"{src} ({len(state)} tensors) -> {dst} ({len(out)} tensors): {what}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--to", choices=_TARGETS, default="ours")
    args = parser.parse_args(argv)
    try:
        print(convert(args.input, args.output, args.to))
    except (ValueError, FileNotFoundError) as e:
        print(f"convert_checkpoint.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
