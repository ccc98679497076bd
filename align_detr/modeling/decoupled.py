# Copyright (c) align-detr contributors.
"""SD-DETR: spatially decoupled classification and localisation in the decoder.

- :class:`DecoupledDecoderLayer`: one self-attention shared by the two query streams
  (classification and localisation tokens concatenated, 2Q tokens, the DN mask tiled 2x2), then
  a separate cross-attention block (cross-attention + norm + FFN) per stream. Both streams
  attend around the same reference boxes but predict their own sampling offsets and attention
  weights, so the two tasks look at different places (SD-DETR's "disentangled feature
  learning"). The blocks come from the base detector, so the layer works on any base whose
  decoder layer is "self-attention, then a cross-attention block".
- :class:`TaskAwareQueryGenerator`: per stream, predicts M points inside each selected proposal
  box (tanh offsets scaled by half the box size, last layer zero-initialised) from the
  proposal's encoder feature, samples the multi-scale memory there and averages it into that
  stream's content query; it replaces the learnt content embedding. It runs once, before the
  decoder, as in the paper's figure.
"""

from typing import Callable

import torch
from torch import nn

from align_detr.layers import MLP, ms_deform_attn

from .encoder import EncoderMemory
from .streams import Streams

__all__ = ["DecoupledDecoderLayer", "TaskAwareQueryGenerator"]


class DecoupledDecoderLayer(nn.Module):
    """Shared self-attention over both streams, then one cross-attention block per stream.

    Args:
        self_attn: block ``(x (N, 2Q, d), pos (N, 2Q, d), mask (2Q, 2Q) or None) -> x``.
        make_cross_block: builds a cross-attention block ``(x, query_pos, reference_points,
            memory) -> x``; called twice (classification, localisation).
    """

    def __init__(self, self_attn: nn.Module, make_cross_block: Callable[[], nn.Module]):
        super().__init__()
        self.self_attn = self_attn
        self.cross_cls = make_cross_block()
        self.cross_loc = make_cross_block()

    def forward(self, queries: Streams, query_pos, reference_points, memory, self_attn_mask=None):
        """
        Args:
            queries: the two streams, each (N, Q, d); a single stream starts both from it.
            query_pos: (N, Q, d) from the shared reference boxes.
            reference_points: the base's reference points for the cross-attention.
            self_attn_mask: optional (Q, Q) bool; tiled to (2Q, 2Q) so a classification token
                and its localisation partner keep exactly the original visibility.

        Returns:
            Streams, each (N, Q, d).
        """
        n_q = queries.cls.shape[1]
        x = torch.cat([queries.cls, queries.loc], 1)
        pos = torch.cat([query_pos, query_pos], 1)
        mask = self_attn_mask.repeat(2, 2) if self_attn_mask is not None else None
        x = self.self_attn(x, pos, mask)
        return Streams(
            self.cross_cls(x[:, :n_q], query_pos, reference_points, memory),
            self.cross_loc(x[:, n_q:], query_pos, reference_points, memory),
        )


class TaskAwareQueryGenerator(nn.Module):
    """Content queries sampled inside each proposal, one point predictor per stream.

    Args:
        d_model: channels.
        n_levels: memory levels sampled (each point is read on every level).
        num_points: M points per proposal and stream.
    """

    def __init__(self, d_model: int, n_levels: int, num_points: int = 8):
        super().__init__()
        self.n_levels = n_levels
        self.num_points = num_points
        self.point_heads = nn.ModuleList(MLP(d_model, d_model, 2 * num_points, 2) for _ in range(2))
        self.proj = nn.ModuleList(nn.Linear(d_model, d_model) for _ in range(2))
        self.norm = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(2))
        for head in self.point_heads:
            nn.init.zeros_(head.layers[-1].weight)  # all points start at the box centre
            nn.init.zeros_(head.layers[-1].bias)

    def points(self, token_features: torch.Tensor, boxes: torch.Tensor, stream: int):
        """(N, K, M, 2) normalised points inside boxes (N, K, 4) cxcywh for one stream."""
        n, k, _ = boxes.shape
        offsets = self.point_heads[stream](token_features).view(n, k, self.num_points, 2).tanh()
        return boxes[:, :, None, :2] + offsets * boxes[:, :, None, 2:] * 0.5

    def forward(self, enc: EncoderMemory, boxes: torch.Tensor, token_features: torch.Tensor):
        """
        Args:
            enc: the encoder output.
            boxes: (N, K, 4) selected proposal boxes, sigmoid cxcywh, detached.
            token_features: (N, K, d) encoder features of the selected tokens.

        Returns:
            Streams of (N, K, d) content queries (classification, localisation).
        """
        memory = enc.memory
        n, s, d = memory.shape
        value = memory.view(n, s, 1, d)  # one "head" holding all channels
        k = boxes.shape[1]
        weights = memory.new_full(
            (n, k, 1, self.n_levels, self.num_points), 1.0 / (self.n_levels * self.num_points)
        )
        queries = []
        for stream in range(2):
            pts = self.points(token_features, boxes, stream)  # (N, K, M, 2)
            loc = pts[:, :, None, None].expand(n, k, 1, self.n_levels, self.num_points, 2)
            sampled = ms_deform_attn(
                value, enc.spatial_shapes, enc.level_start_index, loc.contiguous(), weights
            )  # (N, K, d): mean over levels and points
            queries.append(self.norm[stream](self.proj[stream](sampled)))
        return Streams(queries[0], queries[1])
