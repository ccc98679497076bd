# Copyright (c) align-detr contributors.
"""H-Deformable-DETR (Jia et al., "DETRs with Hybrid Matching", CVPR 2023), as detrex's
``projects/h_deformable_detr`` two-stage config builds it ("H-Deformable-DETR + tricks"):

- Deformable DETR: 4-scale neck, deformable encoder (post-norm layers, no final norm: detrex's
  ``post_norm=False`` only drops that final norm), deformable decoder without a final norm;
- two-stage proposals ranked by the encoder head's class-0 logit (the encoder is trained
  class-agnostically), iterative box refinement, look-forward-twice;
- mixed query selection: learnt content queries, query position = a projection of the sine
  embedding of the selected proposal, fixed for every decoder layer;
- the hybrid branch: in training, K1 one-to-one + K2 one-to-many queries (300 + 1500) come from
  one top-(K1 + K2) selection; a self-attention mask keeps the two groups apart; the one-to-many
  group is matched with every GT k times (``HYBRID.K``) and its losses are weighted
  ``HYBRID.WEIGHT``. At inference only the top-K1 one-to-one queries are built, which are the
  same queries as in training (the top-K1 of the same ranking, unaffected by the other group).

Shapes: N images, K1 one-to-one and K2 one-to-many queries, S encoder tokens, d = d_model.
"""

from typing import Dict, List, Optional

import torch
from torch import nn

from align_detr.layers import (
    PositionEmbeddingSine,
    box_sine_embedding,
    inverse_sigmoid,
)

from ..decoder import (
    DecoderLayer,
    DeformableCrossAttentionBlock,
    DeformableDecoder,
    SelfAttentionBlock,
)
from ..encoder import DeformableEncoder, EncoderLayer, init_deformable_transformer
from ..heads import DetectionHeads
from ..neck import ChannelMapper
from ..two_stage import LearntContentQueries, TwoStageQuerySelector
from . import BASE_REGISTRY, BaseParts, DetrBase

__all__ = ["HDeformableDETR", "HDeformableTransformer", "hybrid_self_attn_mask"]


def hybrid_self_attn_mask(num_one2one: int, num_queries: int, device=None) -> torch.Tensor:
    """The decoder self-attention mask that keeps the two query groups apart.

    Args:
        num_one2one: K1, the one-to-one queries (first in the sequence).
        num_queries: K1 + K2.

    Returns:
        (K1 + K2, K1 + K2) bool, True where attention is blocked: between a one-to-one and a
        one-to-many query, either way. The one-to-one queries therefore compute exactly what they
        compute at inference, without the other group.
    """
    mask = torch.zeros(num_queries, num_queries, dtype=torch.bool, device=device)
    mask[num_one2one:, :num_one2one] = True
    mask[:num_one2one, num_one2one:] = True
    return mask


class HDeformableTransformer(nn.Module):
    """Encoder, two-stage selection of K1 (+ K2 in training) queries, decoder, per-layer outputs.

    Args:
        encoder: :class:`DeformableEncoder`.
        query_selector: :class:`TwoStageQuerySelector` with ``score="first"`` and learnt content
            queries for K1 + K2 queries.
        decoder: :class:`DeformableDecoder` without final norm and box query position.
        d_model: d.
        num_one2one: K1.
        num_one2many: K2 (0: no hybrid branch).
    """

    def __init__(
        self,
        encoder: DeformableEncoder,
        query_selector: TwoStageQuerySelector,
        decoder: DeformableDecoder,
        d_model: int,
        num_one2one: int,
        num_one2many: int,
    ):
        super().__init__()
        self.encoder = encoder
        self.query_selector = query_selector
        self.decoder = decoder
        self.d_model = d_model
        self.num_one2one = num_one2one
        self.num_one2many = num_one2many
        # query position of a proposal: LayerNorm(Linear(sine embedding (x, y, w, h))), first
        # half (the second half is the content query of plain two-stage Deformable DETR, which
        # mixed selection replaces by learnt embeddings)
        self.pos_trans = nn.Linear(2 * d_model, 2 * d_model)
        self.pos_trans_norm = nn.LayerNorm(2 * d_model)
        self._reset_parameters()

    def _reset_parameters(self):
        # Xavier for every matrix of the transformer (as detrex's init_weights); then the
        # deformable attentions' own init. The level embedding and the content queries keep
        # their N(0, 1).
        init_deformable_transformer(
            self,
            [self.encoder.layers, self.decoder, self.query_selector.enc_output, self.pos_trans],
        )

    @property
    def hybrid(self) -> bool:
        """The one-to-many group is built (training with K2 > 0)."""
        return self.training and self.num_one2many > 0

    def forward(self, srcs, masks, pos, heads: DetectionHeads, targets=None) -> Dict:
        """See :mod:`align_detr.modeling.bases` for the contract; ``enc`` holds every encoder
        token (N, S, ...) and ``one2many_layers`` the one-to-many group (training only)."""
        memory = self.encoder(srcs, masks, pos)
        k1 = self.num_one2one
        num = k1 + (self.num_one2many if self.hybrid else 0)
        sel = self.query_selector(
            memory, heads.class_heads[-1], heads.box_heads[-1], num_queries=num
        )
        # sigmoid(+inf) = 1 for an invalid token's proposal, as in detrex
        embed = box_sine_embedding(sel.ref_unact.sigmoid(), self.d_model, yx_order=False)
        query_pos = self.pos_trans_norm(self.pos_trans(embed))[..., : self.d_model]
        attn_mask: Optional[torch.Tensor] = None
        if self.hybrid:
            attn_mask = hybrid_self_attn_mask(k1, sel.ref_unact.shape[1], query_pos.device)
        hidden, references = self.decoder(
            sel.queries, sel.ref_unact, memory, heads.box_heads, attn_mask, query_pos=query_pos
        )
        one2one: List[Dict] = []
        one2many: List[Dict] = []
        for i, (h, ref) in enumerate(zip(hidden, references)):
            logits = heads.class_heads[i](h.cls)
            # look-forward-twice: this layer's delta on the previous layer's undetached box
            boxes = (heads.box_heads[i](h.loc) + inverse_sigmoid(ref)).sigmoid()
            one2one.append({"pred_logits": logits[:, :k1], "pred_boxes": boxes[:, :k1]})
            one2many.append({"pred_logits": logits[:, k1:], "pred_boxes": boxes[:, k1:]})
        return {
            "layers": one2one,
            "enc": {"pred_logits": sel.token_logits, "pred_boxes": sel.token_boxes},
            "dn_layers": None,
            "dn_meta": None,
            "one2many_layers": one2many if self.hybrid else None,
        }


@BASE_REGISTRY.register()
class HDeformableDETR(DetrBase):
    """``MODEL.ALIGN_DETR.BASE: "HDeformableDETR"``; ``NUM_QUERIES`` one-to-one queries (300),
    ``HYBRID.NUM_QUERIES`` one-to-many queries (1500). Matched outputs (``LOSS.MATCH_K``, the
    one-to-one branch): the encoder (every token, class-agnostic), then each decoder layer; the
    one-to-many layers are matched with ``HYBRID.K`` queries per GT."""

    @classmethod
    def num_matched_outputs(cls, cfg) -> int:
        return cfg.MODEL.ALIGN_DETR.DECODER.NUM_LAYERS + 1

    @classmethod
    def check_config(cls, cfg) -> List[str]:
        c = cfg.MODEL.ALIGN_DETR
        h = c.HYBRID
        problems = []
        if c.DN.ENABLED:
            problems.append("BASE HDeformableDETR has no denoising queries: set DN.ENABLED False")
        if c.DECODER.DECOUPLED or c.DECODER.TASK_AWARE_QUERIES:
            problems.append(
                "BASE HDeformableDETR has no SD-DETR decoder: set DECODER.DECOUPLED and "
                "DECODER.TASK_AWARE_QUERIES False"
            )
        if h.NUM_QUERIES < 0:
            problems.append(f"HYBRID.NUM_QUERIES must be >= 0, got {h.NUM_QUERIES}")
        if int(h.K) != h.K or h.K < 1:
            problems.append(f"HYBRID.K must be an integer >= 1, got {h.K}")
        if h.WEIGHT < 0:
            problems.append(f"HYBRID.WEIGHT must be >= 0, got {h.WEIGHT}")
        return problems

    @classmethod
    def criterion_options(cls, cfg) -> Dict:
        h = cfg.MODEL.ALIGN_DETR.HYBRID
        return {
            "class_agnostic_enc": True,
            "hybrid_k": int(h.K),
            "hybrid_weight": float(h.WEIGHT),
            "hybrid_rank_weighted": bool(h.RANK_WEIGHTS),
        }

    @classmethod
    def build(cls, cfg, input_shape) -> BaseParts:
        c = cfg.MODEL.ALIGN_DETR
        d, levels = c.D_MODEL, c.NUM_FEATURE_LEVELS
        enc, dec = c.ENCODER, c.DECODER
        encoder = DeformableEncoder(
            [
                EncoderLayer(d, levels, c.NHEADS, enc.N_POINTS, enc.DIM_FEEDFORWARD, enc.DROPOUT)
                for _ in range(enc.NUM_LAYERS)
            ],
            d,
            levels,
        )
        decoder = DeformableDecoder(
            [
                DecoderLayer(
                    SelfAttentionBlock(d, c.NHEADS, dec.DROPOUT),
                    DeformableCrossAttentionBlock(
                        d, levels, c.NHEADS, dec.N_POINTS, dec.DIM_FEEDFORWARD, dec.DROPOUT
                    ),
                )
                for _ in range(dec.NUM_LAYERS)
            ],
            d,
            final_norm=False,
            box_query_pos=False,
        )
        content = LearntContentQueries(c.NUM_QUERIES + c.HYBRID.NUM_QUERIES, d, init="normal")
        selector = TwoStageQuerySelector(
            d, c.NUM_QUERIES, content, c.TWO_STAGE_SELECTION, score="first"
        )
        transformer = HDeformableTransformer(
            encoder, selector, decoder, d, c.NUM_QUERIES, c.HYBRID.NUM_QUERIES
        )
        return BaseParts(
            neck=ChannelMapper(input_shape, c.IN_FEATURES, d, levels),
            position_embedding=PositionEmbeddingSine(d // 2, offset=-0.5),
            transformer=transformer,
            # one pair per decoder layer, then the encoder's (two-stage) pair
            heads=DetectionHeads(d, c.NUM_CLASSES, cls.num_matched_outputs(cfg)),
        )
