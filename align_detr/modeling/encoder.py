# Copyright (c) align-detr contributors.
"""The multi-scale deformable encoder: levels flattened into one token sequence, each token
attending to points around itself on every level.

Shapes: N images, L levels, S = sum(H_l * W_l) tokens, d = d_model.
"""

from dataclasses import dataclass
from typing import List, Tuple

import torch
from torch import nn

from align_detr.layers import FFN, MSDeformAttn
from align_detr.layers.ms_deform_attn import level_table

__all__ = [
    "DeformableEncoder",
    "EncoderLayer",
    "EncoderMemory",
    "init_deformable_transformer",
    "valid_ratios_of",
]


@dataclass
class EncoderMemory:
    """What the decoder and query selection read from the encoder.

    Attributes:
        memory: (N, S, d) encoded tokens, level by level.
        padding_mask: (N, S) bool, True on padding.
        spatial_shapes: (L, 2) int64 (H_l, W_l), the op's level table, on the CPU.
        level_start_index: (L,) int64, first token of each level, on the CPU.
        valid_ratios: (N, L, 2) fraction of each level that is image, as (w, h).
        shapes: the level sizes as Python ints, for host-side loops.
    """

    memory: torch.Tensor
    padding_mask: torch.Tensor
    spatial_shapes: torch.Tensor
    level_start_index: torch.Tensor
    valid_ratios: torch.Tensor
    shapes: List[Tuple[int, int]]


def valid_ratios_of(masks: List[torch.Tensor]) -> torch.Tensor:
    """Fraction of each level that is real image, per image: (N, L, 2) as (w, h)."""
    ratios = []
    for mask in masks:
        _, h, w = mask.shape
        valid_h = (~mask[:, :, 0]).sum(1).float() / h
        valid_w = (~mask[:, 0, :]).sum(1).float() / w
        ratios.append(torch.stack([valid_w, valid_h], -1))
    return torch.stack(ratios, 1)


def encoder_reference_points(shapes: List[Tuple[int, int]], valid_ratios: torch.Tensor):
    """Pixel centres of every level, normalised to the valid area, seen from every level.

    Returns:
        (N, S, L, 2) normalised (x, y).
    """
    points = []
    dev = valid_ratios.device
    for lvl, (h, w) in enumerate(shapes):
        ys, xs = torch.meshgrid(
            torch.arange(h, dtype=torch.float32, device=dev) + 0.5,
            torch.arange(w, dtype=torch.float32, device=dev) + 0.5,
            indexing="ij",
        )
        ys = ys.reshape(1, -1) / (valid_ratios[:, None, lvl, 1] * h)
        xs = xs.reshape(1, -1) / (valid_ratios[:, None, lvl, 0] * w)
        points.append(torch.stack([xs, ys], -1))
    points = torch.cat(points, 1)
    return points[:, :, None] * valid_ratios[:, None]


class EncoderLayer(nn.Module):
    """Deformable self-attention over all levels, then the FFN (post-norm)."""

    def __init__(self, d_model, n_levels, n_heads, n_points, dim_feedforward, dropout):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)
        self.ffn = FFN(d_model, dim_feedforward, dropout)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask):
        """src, pos: (N, S, d); reference_points: (N, S, L, 2); padding_mask: (N, S) bool."""
        attn = self.self_attn(
            src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask
        )
        return self.ffn(self.norm(src + self.dropout(attn)))


class DeformableEncoder(nn.Module):
    """Flattens the levels (adding a learnt level embedding to the position encoding) and runs
    the encoder layers.

    Args:
        layers: the encoder layers (:class:`EncoderLayer`).
        d_model: d.
        n_levels: L.
    """

    def __init__(self, layers: List[nn.Module], d_model: int, n_levels: int):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.level_embed = nn.Parameter(torch.empty(n_levels, d_model))
        nn.init.normal_(self.level_embed)

    def forward(self, srcs, masks, pos_embeds) -> EncoderMemory:
        """
        Args:
            srcs, pos_embeds: L tensors (N, d, H_l, W_l); masks: L tensors (N, H_l, W_l) bool.
        """
        flat_src, flat_mask, flat_pos, shapes = [], [], [], []
        for lvl, (src, mask, pos) in enumerate(zip(srcs, masks, pos_embeds)):
            shapes.append((src.shape[-2], src.shape[-1]))  # ints, or symbols when exported
            flat_src.append(src.flatten(2).transpose(1, 2))
            flat_mask.append(mask.flatten(1))
            flat_pos.append(pos.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))
        src = torch.cat(flat_src, 1)
        padding_mask = torch.cat(flat_mask, 1)
        pos = torch.cat(flat_pos, 1)
        # The level table stays on the host: the deformable-attention op reads it there, so no
        # call waits for the device (and a CUDA graph can capture the model).
        spatial_shapes, level_start_index = level_table(shapes)
        valid_ratios = valid_ratios_of(masks)
        reference_points = encoder_reference_points(shapes, valid_ratios)
        memory = src
        for layer in self.layers:
            # The sizes, not the table: the reference path (and so an exported graph) needs
            # them as (symbolic) integers.
            memory = layer(memory, pos, reference_points, shapes, None, padding_mask)
        return EncoderMemory(
            memory, padding_mask, spatial_shapes, level_start_index, valid_ratios, shapes
        )


def init_deformable_transformer(root: nn.Module, dense_modules: List[nn.Module]) -> None:
    """The released deformable DETRs' initialisation: Xavier for every matrix of
    ``dense_modules``, then each :class:`MSDeformAttn` under ``root`` back to its own init
    (zero offsets on a fixed ring, uniform attention). Embeddings and modules not listed keep
    theirs."""
    for module in dense_modules:
        for p in module.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
    for m in root.modules():
        if isinstance(m, MSDeformAttn):
            m.reset_parameters()
