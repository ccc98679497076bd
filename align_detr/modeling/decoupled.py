"""SD-DETR on the deformable decoder: spatially decoupled classification and localisation.

- DecoupledDecoderLayer: one self-attention shared by the two query streams (classification and
  localisation tokens concatenated, 2Q tokens, the DN mask tiled 2x2), then a separate
  MSDeformAttn cross-attention + FFN per stream. Both streams attend around the same reference
  boxes but predict their own sampling offsets and attention weights, so the two tasks look at
  different places (SD-DETR's "disentangled feature learning"; the paper's Conditional-DETR
  decoder is mapped onto ours as recommended in the reference notes: token concatenation, the
  self-attention and its norm shared, cross-attention / FFN / their norms duplicated).
- TaskAwareQueryGenerator: per stream, predicts M points inside each selected proposal box
  (tanh offsets scaled by half the box size, last layer zero-initialised) from the proposal's
  encoder feature, samples the multi-scale memory there and averages it into that stream's
  content query; it replaces the learnt content embedding. It runs once, before the decoder, as
  in the paper's figure.
"""

from typing import Dict, Tuple

import torch
from torch import nn

from align_detr.layers import MSDeformAttn, ms_deform_attn

from .transformer import FFN, MLP


class DecoupledDecoderLayer(nn.Module):
    def __init__(self, d_model, n_levels, n_heads, n_points, dim_feedforward, dropout):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.norm_self = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        # classification stream
        self.cross_attn_cls = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm_cross_cls = nn.LayerNorm(d_model)
        self.ffn_cls = FFN(d_model, dim_feedforward, dropout)
        # localisation stream
        self.cross_attn_loc = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm_cross_loc = nn.LayerNorm(d_model)
        self.ffn_loc = FFN(d_model, dim_feedforward, dropout)

    def forward(
        self,
        tgt,
        query_pos,
        reference_points,
        memory,
        spatial_shapes,
        level_start_index,
        memory_padding_mask,
        self_attn_mask,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            tgt: (q_cls, q_loc), each (N, Q, d); a single tensor starts both streams from it.
            query_pos: (N, Q, d) from the shared reference boxes.
            reference_points: (N, Q, L, 4).
            self_attn_mask: optional (Q, Q) bool; tiled to (2Q, 2Q) so a classification token
                and its localisation partner keep exactly the original visibility.

        Returns:
            (q_cls, q_loc), each (N, Q, d).
        """
        q_cls, q_loc = tgt if isinstance(tgt, tuple) else (tgt, tgt)
        n_q = q_cls.shape[1]
        x = torch.cat([q_cls, q_loc], 1)
        pos = torch.cat([query_pos, query_pos], 1)
        mask = self_attn_mask.repeat(2, 2) if self_attn_mask is not None else None
        attn = self.self_attn(x + pos, x + pos, x, attn_mask=mask, need_weights=False)[0]
        x = self.norm_self(x + self.dropout(attn))
        q_cls, q_loc = x[:, :n_q], x[:, n_q:]
        outs = []
        for q, cross, norm, ffn in (
            (q_cls, self.cross_attn_cls, self.norm_cross_cls, self.ffn_cls),
            (q_loc, self.cross_attn_loc, self.norm_cross_loc, self.ffn_loc),
        ):
            a = cross(
                q + query_pos,
                reference_points,
                memory,
                spatial_shapes,
                level_start_index,
                memory_padding_mask,
            )
            outs.append(ffn(norm(q + self.dropout(a))))
        return outs[0], outs[1]


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

    def forward(self, enc: Dict, boxes: torch.Tensor, token_features: torch.Tensor):
        """
        Args:
            enc: encoder outputs (memory (N, S, d), spatial_shapes, level_start_index, ...).
            boxes: (N, K, 4) selected proposal boxes, sigmoid cxcywh, detached.
            token_features: (N, K, d) encoder features of the selected tokens.

        Returns:
            (q_cls, q_loc) content queries, each (N, K, d).
        """
        memory = enc["memory"]
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
                value, enc["spatial_shapes"], enc["level_start_index"], loc.contiguous(), weights
            )  # (N, K, d): mean over levels and points
            queries.append(self.norm[stream](self.proj[stream](sampled)))
        return queries[0], queries[1]


def build_sd_detr_parts(cfg):
    """(decoder layer factory or None, query generator or None) for the SD-DETR options."""
    c = cfg.MODEL.ALIGN_DETR
    factory, generator = None, None
    if c.DECODER.DECOUPLED:

        def factory():
            return DecoupledDecoderLayer(
                c.D_MODEL,
                c.NUM_FEATURE_LEVELS,
                c.NHEADS,
                c.DECODER.N_POINTS,
                c.DECODER.DIM_FEEDFORWARD,
                c.DECODER.DROPOUT,
            )

    if c.DECODER.TASK_AWARE_QUERIES:
        if not c.DECODER.DECOUPLED:
            raise ValueError(
                "MODEL.ALIGN_DETR.DECODER.TASK_AWARE_QUERIES needs DECODER.DECOUPLED: True "
                "(it generates one content query per stream)"
            )
        if c.DECODER.TASK_AWARE_POINTS < 1:
            raise ValueError("MODEL.ALIGN_DETR.DECODER.TASK_AWARE_POINTS must be >= 1")
        generator = TaskAwareQueryGenerator(
            c.D_MODEL, c.NUM_FEATURE_LEVELS, c.DECODER.TASK_AWARE_POINTS
        )
    return factory, generator
