# Copyright (c) align-detr contributors.
"""Conditional DETR's transformer layers (Meng et al., ICCV 2021): the single-scale DETR encoder
layer and the conditional self- and cross-attention blocks of the decoder.

Conditional cross-attention keeps content and position apart: per head, the query is the
content projection concatenated with the projected *spatial query* (the sine embedding of the
query's reference point, scaled by an FFN of the decoder embedding), and the key is the content
projection of the memory concatenated with the projection of its position encoding. The dot
product then sums a content term and a spatial term, so the spatial query alone can steer a
head towards a region (an extremity, the centre) whatever the content says.

Shapes: N images, Q queries, S = H * W memory tokens, d = d_model, h heads.
"""

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from align_detr.layers import FFN
from align_detr.layers.ms_deform_attn import level_table

from .encoder import EncoderMemory, valid_ratios_of

__all__ = [
    "ConditionalCrossAttention",
    "ConditionalCrossAttentionBlock",
    "ConditionalSelfAttention",
    "ConditionalSelfAttentionBlock",
    "DetrEncoder",
    "DetrEncoderLayer",
    "SingleScaleMemory",
]


@dataclass
class SingleScaleMemory(EncoderMemory):
    """The single-scale encoder output (one level), with what conditional cross-attention reads.

    Attributes (besides :class:`~align_detr.modeling.encoder.EncoderMemory`'s):
        pos: (N, S, d) sine position encoding of the memory (the keys' spatial part).
        decoder_mask: (N, S) bool, padding the decoder's cross-attention ignores, or None to
            attend everywhere (detrex's Conditional DETR, whose checkpoints were trained so).
    """

    pos: torch.Tensor = None
    decoder_mask: Optional[torch.Tensor] = None


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(N, L, h * c) -> (N, h, L, c)."""
    n, length, _ = x.shape
    return x.view(n, length, n_heads, -1).transpose(1, 2)


def _attend(q, k, v, n_heads: int, mask: Optional[torch.Tensor], dropout: float):
    """Scaled dot-product attention over heads; ``mask`` True where blocked, broadcast to
    (N, h, Lq, Lk). Returns (N, Lq, h * c_v)."""
    allowed = None if mask is None else ~mask
    out = F.scaled_dot_product_attention(
        _heads(q, n_heads), _heads(k, n_heads), _heads(v, n_heads), allowed, dropout
    )
    return out.transpose(1, 2).flatten(2)


class ConditionalSelfAttention(nn.Module):
    """Self-attention with separate content and position projections:
    ``q = Wqc x + Wqp p``, ``k = Wkc x + Wkp p``, ``v = Wv x``.

    Args:
        d_model: d.
        n_heads: h.
        dropout: on the attention weights.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        for name in ("query_content", "query_pos", "key_content", "key_pos", "value"):
            setattr(self, name + "_proj", nn.Linear(d_model, d_model))
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x, pos, attn_mask: Optional[torch.Tensor] = None):
        """x, pos: (N, Q, d); attn_mask: optional (Q, Q) bool, True where blocked."""
        q = self.query_content_proj(x) + self.query_pos_proj(pos)
        k = self.key_content_proj(x) + self.key_pos_proj(pos)
        drop = self.dropout if self.training else 0.0
        return self.out_proj(_attend(q, k, self.value_proj(x), self.n_heads, attn_mask, drop))


class ConditionalCrossAttention(nn.Module):
    """Cross-attention with per-head concatenated content and spatial parts (2d-wide q / k).

    Args:
        d_model: d.
        n_heads: h.
        dropout: on the attention weights.
        first_layer: the first decoder layer also adds the query's (learnt) positional embedding
            to its content query and the memory's to its content key, before concatenating.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, first_layer=False):
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.first_layer = first_layer
        self.query_content_proj = nn.Linear(d_model, d_model)
        # only the first layer reads the query position outside the spatial query
        self.query_pos_proj = nn.Linear(d_model, d_model) if first_layer else None
        self.query_pos_sine_proj = nn.Linear(d_model, d_model)
        self.key_content_proj = nn.Linear(d_model, d_model)
        self.key_pos_proj = nn.Linear(d_model, d_model)
        self.value_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x, query_pos, spatial_query, memory: SingleScaleMemory):
        """
        Args:
            x: (N, Q, d) decoder embeddings (content queries).
            query_pos: (N, Q, d) positional embedding of the queries.
            spatial_query: (N, Q, d) the conditional spatial query, lambda * sine(reference).
            memory: the encoder output (memory, its position encoding, the padding to ignore).

        Returns:
            (N, Q, d).
        """
        n, q_len, d = x.shape
        h = self.n_heads
        q = self.query_content_proj(x)
        k = self.key_content_proj(memory.memory)
        k_pos = self.key_pos_proj(memory.pos)
        if self.first_layer:
            q = q + self.query_pos_proj(query_pos)
            k = k + k_pos
        q_sp = self.query_pos_sine_proj(spatial_query)
        # concatenate per head: (N, L, h, c) + (N, L, h, c) -> (N, L, h * 2c)
        q = torch.cat([q.view(n, q_len, h, -1), q_sp.view(n, q_len, h, -1)], -1).flatten(2)
        s = k.shape[1]
        k = torch.cat([k.view(n, s, h, -1), k_pos.view(n, s, h, -1)], -1).flatten(2)
        mask = None
        if memory.decoder_mask is not None:
            mask = memory.decoder_mask[:, None, None, :]  # (N, 1, 1, S)
        drop = self.dropout if self.training else 0.0
        out = _attend(q, k, self.value_proj(memory.memory), h, mask, drop)
        return self.out_proj(out)


class ConditionalSelfAttentionBlock(nn.Module):
    """Conditional self-attention, residual, norm (post-norm); the decoder's first block, with
    the ``(x, query_pos, mask)`` contract of :class:`~align_detr.modeling.decoder.
    SelfAttentionBlock` so SD-DETR's decoupled layer takes it as is."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        self.attn = ConditionalSelfAttention(d_model, n_heads, dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, query_pos, attn_mask: Optional[torch.Tensor] = None):
        return self.norm(x + self.dropout(self.attn(x, query_pos, attn_mask)))


class ConditionalCrossAttentionBlock(nn.Module):
    """Conditional cross-attention, residual, norm, then the FFN: ``(x, query_pos,
    spatial_query, memory) -> x`` (the spatial query plays the part of the deformable block's
    reference points)."""

    def __init__(self, d_model, n_heads, dim_feedforward, dropout, first_layer=False):
        super().__init__()
        self.attn = ConditionalCrossAttention(d_model, n_heads, dropout, first_layer)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.ffn = FFN(d_model, dim_feedforward, dropout)

    def forward(self, x, query_pos, spatial_query, memory: SingleScaleMemory):
        out = self.attn(x, query_pos, spatial_query, memory)
        return self.ffn(self.norm(x + self.dropout(out)))


class DetrEncoderLayer(nn.Module):
    """DETR's encoder layer: multi-head self-attention over all tokens (the position encoding
    added to queries and keys, not values), residual, norm, FFN (post-norm)."""

    def __init__(self, d_model, n_heads, dim_feedforward, dropout):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.ffn = FFN(d_model, dim_feedforward, dropout)

    def forward(self, src, pos, padding_mask: Optional[torch.Tensor] = None):
        """src, pos: (N, S, d); padding_mask: (N, S) bool, True on padding (None: attend all)."""
        q = k = src + pos
        out = self.self_attn(q, k, src, key_padding_mask=padding_mask, need_weights=False)[0]
        return self.ffn(self.norm(src + self.dropout(out)))


class DetrEncoder(nn.Module):
    """Flattens the single level and runs the DETR encoder layers.

    Args:
        layers: :class:`DetrEncoderLayer`.
        decoder_padding_mask: whether the decoder's cross-attention ignores the padding.
    """

    def __init__(self, layers: List[nn.Module], decoder_padding_mask: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.decoder_padding_mask = decoder_padding_mask

    def forward(self, src, mask, pos) -> SingleScaleMemory:
        """src, pos: (N, d, H, W); mask: (N, H, W) bool, True on padding."""
        h, w = src.shape[-2], src.shape[-1]  # ints, or symbols when exported
        x = src.flatten(2).transpose(1, 2)
        pos = pos.flatten(2).transpose(1, 2)
        padding = mask.flatten(1)
        for layer in self.layers:
            x = layer(x, pos, padding)
        table, starts = level_table([(h, w)])
        return SingleScaleMemory(
            memory=x,
            padding_mask=padding,
            spatial_shapes=table,
            level_start_index=starts,
            valid_ratios=valid_ratios_of([mask]),
            shapes=[(h, w)],
            pos=pos,
            decoder_mask=padding if self.decoder_padding_mask else None,
        )
