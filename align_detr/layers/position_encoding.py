# Copyright (c) align-detr contributors.
"""Sine position encodings: for feature maps (encoder) and for boxes (decoder queries)."""

import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """DETR's 2-d sine encoding of pixel positions, normalised to the valid (unpadded) area.

    Args:
        num_pos_feats: features per axis; the output has 2 * num_pos_feats channels.
        temperature: wavelength base.
        offset: added to the cumulative position before normalisation (-0.5 = pixel centres).
    """

    def __init__(
        self, num_pos_feats: int = 128, temperature: float = 10000.0, offset: float = -0.5
    ):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.offset = offset
        self.scale = 2 * math.pi

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            mask: (N, H, W) bool, True on padding.

        Returns:
            (N, 2 * num_pos_feats, H, W) float32.
        """
        not_mask = (~mask).float()
        y_embed = not_mask.cumsum(1)
        x_embed = not_mask.cumsum(2)
        eps = 1e-6
        y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + eps) * self.scale
        x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (
            2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats
        )
        pos_x = x_embed[..., None] / dim_t
        pos_y = y_embed[..., None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def box_sine_embedding(
    boxes: torch.Tensor, d_model: int, temperature: float = 10000.0, yx_order: bool = True
):
    """Sine encoding of normalised boxes, d_model / 2 features per coordinate.

    Args:
        boxes: (N, Q, 4) normalised (cx, cy, w, h) or (N, Q, 2) points.
        yx_order: put y before x, as DINO does; Deformable / H-Deformable DETR's proposal
            embedding keeps the (x, y, w, h) order.

    Returns:
        (N, Q, boxes.shape[-1] * d_model / 2), coordinates ordered (y, x, w, h) as in DINO, or
        (x, y, w, h) with ``yx_order=False``.
    """
    half = d_model // 2
    dim_t = torch.arange(half, dtype=torch.float32, device=boxes.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / half)
    embeds = []
    for i in range(boxes.shape[-1]):
        e = boxes[..., i, None].float() * (2 * math.pi) / dim_t
        embeds.append(torch.stack((e[..., 0::2].sin(), e[..., 1::2].cos()), dim=-1).flatten(-2))
    if yx_order and len(embeds) >= 2:
        embeds[0], embeds[1] = embeds[1], embeds[0]  # (y, x, ...) order
    return torch.cat(embeds, dim=-1)
