# Copyright (c) align-detr contributors.
"""The deformable decoder with iterative box refinement (DINO).

A decoder layer is self-attention among the queries followed by a cross-attention block
(cross-attention into the memory, norm, FFN). SD-DETR's decoupled layer (decoupled.py) reuses
both blocks: one shared self-attention, one cross-attention block per stream.

Shapes: N images, Q decoder queries (DN queries first, then the matching queries), L levels,
d = d_model.
"""

from typing import List, Optional, Tuple

import torch
from torch import nn

from align_detr.layers import FFN, MLP, MSDeformAttn, box_sine_embedding, inverse_sigmoid

from .encoder import EncoderMemory
from .streams import Streams

__all__ = [
    "DecoderLayer",
    "DeformableCrossAttentionBlock",
    "DeformableDecoder",
    "SelfAttentionBlock",
]


class SelfAttentionBlock(nn.Module):
    """Multi-head self-attention among the queries, residual, norm (post-norm)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, query_pos, attn_mask: Optional[torch.Tensor] = None):
        """x, query_pos: (N, Q, d); attn_mask: optional (Q, Q) bool, True where blocked."""
        q = k = x + query_pos
        out = self.attn(q, k, x, attn_mask=attn_mask, need_weights=False)[0]
        return self.norm(x + self.dropout(out))


class DeformableCrossAttentionBlock(nn.Module):
    """Deformable cross-attention into the multi-scale memory, residual, norm, then the FFN."""

    def __init__(self, d_model, n_levels, n_heads, n_points, dim_feedforward, dropout):
        super().__init__()
        self.attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.ffn = FFN(d_model, dim_feedforward, dropout)

    def forward(self, x, query_pos, reference_points, memory: EncoderMemory):
        """
        Args:
            x, query_pos: (N, Q, d).
            reference_points: (N, Q, L, 4) boxes scaled to each level's valid area.
            memory: the encoder output.
        """
        out = self.attn(
            x + query_pos,
            reference_points,
            memory.memory,
            memory.shapes,  # the sizes (not the table): an exported graph keeps them symbolic
            None,
            memory.padding_mask,
        )
        return self.ffn(self.norm(x + self.dropout(out)))


class DecoderLayer(nn.Module):
    """Self-attention block, then one cross-attention block: a single-stream decoder layer."""

    def __init__(self, self_attn: nn.Module, cross: nn.Module):
        super().__init__()
        self.self_attn = self_attn
        self.cross = cross

    def forward(self, queries: Streams, query_pos, reference_points, memory, self_attn_mask=None):
        if not queries.is_single:
            raise ValueError("DecoderLayer takes one query stream; DecoupledDecoderLayer takes two")
        x = self.self_attn(queries.cls, query_pos, self_attn_mask)
        return Streams.single(self.cross(x, query_pos, reference_points, memory))


class DeformableDecoder(nn.Module):
    """Runs the decoder layers with iterative box refinement.

    Each layer's query position is an MLP of the sine embedding of its reference box (DINO), or
    one fixed per-query tensor given to ``forward`` (Deformable / H-Deformable DETR, which embed
    the initial proposal once); after each layer the box heads refine the reference (the next
    layer starts from it detached; the next layer's prediction adds its delta to it undetached:
    look-forward-twice).

    Args:
        layers: decoder layers taking ``(Streams, query_pos, reference_points, memory,
            self_attn_mask)`` and returning Streams.
        d_model: d.
        final_norm: a LayerNorm shared by every layer's output (DINO); H-Deformable-DETR's heads
            read the layer outputs as they are.
        box_query_pos: build the query position from each layer's reference box (DINO's
            ``ref_point_head``); without it ``forward`` needs ``query_pos``.
        stream_positions: (decoupled layers) the classification stream gets its own reference
            box, the localisation reference re-centred by ``cls_offset``, and its own
            positional-query MLP (SD-DETR's task-aware positional queries; needs
            ``box_query_pos``).
    """

    def __init__(
        self,
        layers: List[nn.Module],
        d_model: int,
        final_norm: bool = True,
        box_query_pos: bool = True,
        stream_positions: bool = False,
    ):
        super().__init__()
        if stream_positions and not box_query_pos:
            raise ValueError("DeformableDecoder: stream_positions needs box_query_pos")
        self.d_model = d_model
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(d_model) if final_norm else nn.Identity()
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2) if box_query_pos else None
        # SD-DETR: the classification stream's own positional query (of its own reference)
        self.ref_point_head_cls = (
            MLP(2 * d_model, d_model, d_model, 2) if stream_positions else None
        )

    def forward(
        self,
        queries: Streams,
        ref_unact: torch.Tensor,
        memory: EncoderMemory,
        box_heads: nn.ModuleList,
        self_attn_mask: Optional[torch.Tensor] = None,
        query_pos: Optional[torch.Tensor] = None,
        cls_offset: Optional[torch.Tensor] = None,
    ) -> Tuple[List[Streams], List[torch.Tensor]]:
        """
        Args:
            queries: (N, Q, d) content queries per stream.
            ref_unact: (N, Q, 4) initial references in inverse-sigmoid space (detached).
            memory: the encoder output.
            box_heads: per-layer box MLPs used for refinement (reading the localisation stream).
            self_attn_mask: optional (Q, Q) bool.
            query_pos: (N, Q, d) fixed query position of every layer; required without
                ``box_query_pos``, ignored with it.
            cls_offset: (N, Q, 2) shift of the classification stream's reference centre from
                the localisation reference (with ``stream_positions``; None: no shift).

        Returns:
            hidden: per layer, the normalised (N, Q, d) outputs of each stream;
            references: per layer, the (N, Q, 4) sigmoid reference that layer's box head adds
                its delta to (undetached from layer 2 on).
        """
        if self.ref_point_head is None and query_pos is None:
            raise ValueError("DeformableDecoder: built without box_query_pos, needs query_pos")
        reference = ref_unact.sigmoid()
        reference_for_loss = reference
        ratios = torch.cat([memory.valid_ratios, memory.valid_ratios], -1)[:, None]
        hidden, references = [], []
        for layer_id, layer in enumerate(self.layers):
            ref_input = reference[:, :, None] * ratios
            layer_pos = query_pos
            if self.ref_point_head is not None:
                layer_pos = self.ref_point_head(
                    box_sine_embedding(ref_input[:, :, 0], self.d_model)
                )
            if self.ref_point_head_cls is not None:
                cls_ref = reference
                if cls_offset is not None:
                    centre = (reference[..., :2] + cls_offset).clamp(0.0, 1.0)
                    cls_ref = torch.cat([centre, reference[..., 2:]], -1)
                cls_input = cls_ref[:, :, None] * ratios
                cls_pos = self.ref_point_head_cls(
                    box_sine_embedding(cls_input[:, :, 0], self.d_model)
                )
                layer_pos = Streams(cls_pos, layer_pos)
                ref_input = Streams(cls_input, ref_input)
            queries = layer(queries, layer_pos, ref_input, memory, self_attn_mask)
            hidden.append(queries.map(self.norm))
            references.append(reference_for_loss)
            delta = box_heads[layer_id](queries.loc)
            new_reference = (delta + inverse_sigmoid(reference)).sigmoid()
            reference_for_loss = new_reference
            reference = new_reference.detach()
        return hidden, references
