# Copyright (c) align-detr contributors.
"""DINO-style deformable DETR: 4-scale neck, deformable encoder, two-stage query selection with
mixed queries, contrastive denoising, deformable decoder with box refinement and
look-forward-twice, unshared heads (one per decoder layer, plus one for the encoder).

The SD-DETR options swap in the decoupled decoder layer and the task-aware query generator.
"""

from typing import Dict, List, Optional

import torch
from torch import nn

from align_detr.layers import PositionEmbeddingSine, inverse_sigmoid

from ..decoder import (
    DecoderLayer,
    DeformableCrossAttentionBlock,
    DeformableDecoder,
    SelfAttentionBlock,
)
from ..decoupled import DecoupledDecoderLayer, TaskAwareQueryGenerator
from ..denoising import ContrastiveDenoising
from ..streams import StreamEmbedding
from ..encoder import DeformableEncoder, EncoderLayer, init_deformable_transformer
from ..heads import DetectionHeads
from ..neck import ChannelMapper
from ..two_stage import LearntContentQueries, TwoStageQuerySelector
from . import BASE_REGISTRY, BaseParts, DetrBase

__all__ = ["DINO", "DINOTransformer"]


class DINOTransformer(nn.Module):
    """Encoder, two-stage selection (+ denoising queries), decoder, and the per-layer outputs.

    Args:
        encoder: :class:`DeformableEncoder`.
        query_selector: :class:`TwoStageQuerySelector` (reads the heads' last pair).
        decoder: :class:`DeformableDecoder`.
        denoising: :class:`ContrastiveDenoising`, or None for no DN queries.
        stream_embed: SD-DETR's learnt per-stream vector added to the content, or None.
    """

    def __init__(
        self,
        encoder: DeformableEncoder,
        query_selector: TwoStageQuerySelector,
        decoder: DeformableDecoder,
        denoising: Optional[ContrastiveDenoising] = None,
        stream_embed: Optional[StreamEmbedding] = None,
    ):
        super().__init__()
        self.encoder = encoder
        self.query_selector = query_selector
        self.decoder = decoder
        self.denoising = denoising
        self.stream_embed = stream_embed
        self._reset_parameters()

    def _reset_parameters(self):
        # Xavier for the matrices of the encoder, decoder and proposal projection; the
        # deformable attentions, embeddings and the query generator keep their own init.
        init_deformable_transformer(
            self, [self.encoder.layers, self.decoder, self.query_selector.enc_output]
        )

    def forward(self, srcs, masks, pos, heads: DetectionHeads, targets=None) -> Dict:
        """See :mod:`align_detr.modeling.bases` for the contract."""
        memory = self.encoder(srcs, masks, pos)
        sel = self.query_selector(memory, heads.class_heads[-1], heads.box_heads[-1])
        queries, ref_unact, attn_mask, dn = sel.queries, sel.ref_unact, None, None
        if self.training and self.denoising is not None and targets is not None:
            dn = self.denoising(targets, ref_unact.shape[1])
        cls_offset = None
        if sel.centres is not None:
            # the classification stream's points, relative to the proposal centre (detached,
            # like the reference boxes)
            cls_offset = (sel.centres.cls - ref_unact.sigmoid()[..., :2]).detach()
        if dn is not None:
            queries = queries.map(lambda x: torch.cat([dn.content.to(x.dtype), x], 1))
            ref_unact = torch.cat([dn.ref_unact.to(ref_unact.dtype), ref_unact], 1)
            attn_mask = dn.attn_mask
            if cls_offset is not None:  # the DN queries have no points: no shift
                zeros = cls_offset.new_zeros(cls_offset.shape[0], dn.meta.pad_size, 2)
                cls_offset = torch.cat([zeros, cls_offset], 1)
        if self.stream_embed is not None:
            queries = self.stream_embed(queries)
        hidden, references = self.decoder(
            queries, ref_unact, memory, heads.box_heads, attn_mask, cls_offset=cls_offset
        )

        pad = dn.meta.pad_size if dn is not None else 0
        layers, dn_layers = [], []
        for i, (h, ref) in enumerate(zip(hidden, references)):
            logits = heads.class_heads[i](h.cls)
            # look-forward-twice: this layer's delta on the previous layer's undetached box
            boxes = (heads.box_heads[i](h.loc) + inverse_sigmoid(ref)).sigmoid()
            layers.append({"pred_logits": logits[:, pad:], "pred_boxes": boxes[:, pad:]})
            dn_layers.append({"pred_logits": logits[:, :pad], "pred_boxes": boxes[:, :pad]})
        return {
            "layers": layers,
            "enc": {"pred_logits": sel.enc_logits, "pred_boxes": sel.enc_boxes},
            "dn_layers": dn_layers if dn is not None else None,
            "dn_meta": dn.meta if dn is not None else None,
        }


def _decoder_layers(cfg) -> List[nn.Module]:
    """Plain or (SD-DETR) decoupled decoder layers of the config."""
    c = cfg.MODEL.ALIGN_DETR
    dec = c.DECODER

    def self_attention():
        return SelfAttentionBlock(c.D_MODEL, c.NHEADS, dec.DROPOUT)

    def cross_attention():
        return DeformableCrossAttentionBlock(
            c.D_MODEL,
            c.NUM_FEATURE_LEVELS,
            c.NHEADS,
            dec.N_POINTS,
            dec.DIM_FEEDFORWARD,
            dec.DROPOUT,
        )

    if dec.DECOUPLED:
        return [
            DecoupledDecoderLayer(self_attention, cross_attention, dec.SPLIT_SELF_ATTN)
            for _ in range(dec.NUM_LAYERS)
        ]
    return [DecoderLayer(self_attention(), cross_attention()) for _ in range(dec.NUM_LAYERS)]


@BASE_REGISTRY.register()
class DINO(DetrBase):
    """``MODEL.ALIGN_DETR.BASE: "DINO"``; matched outputs: the encoder, then each decoder layer."""

    @classmethod
    def num_matched_outputs(cls, cfg) -> int:
        return cfg.MODEL.ALIGN_DETR.DECODER.NUM_LAYERS + 1

    @classmethod
    def build(cls, cfg, input_shape) -> BaseParts:
        c = cfg.MODEL.ALIGN_DETR
        d, levels = c.D_MODEL, c.NUM_FEATURE_LEVELS
        encoder = DeformableEncoder(
            [
                EncoderLayer(
                    d,
                    levels,
                    c.NHEADS,
                    c.ENCODER.N_POINTS,
                    c.ENCODER.DIM_FEEDFORWARD,
                    c.ENCODER.DROPOUT,
                )
                for _ in range(c.ENCODER.NUM_LAYERS)
            ],
            d,
            levels,
        )
        if c.DECODER.TASK_AWARE_QUERIES:
            content = TaskAwareQueryGenerator(
                d, levels, c.DECODER.TASK_AWARE_POINTS, c.DECODER.TASK_AWARE_POINT_PREDICTOR
            )
        else:
            content = LearntContentQueries(c.NUM_QUERIES, d)
        stream_positions = c.DECODER.DECOUPLED and c.DECODER.STREAM_POSITIONS
        denoising = None
        if c.DN.ENABLED:
            denoising = ContrastiveDenoising(
                c.NUM_CLASSES, d, c.DN.NUM_QUERIES, c.DN.LABEL_NOISE_RATIO, c.DN.BOX_NOISE_SCALE
            )
        transformer = DINOTransformer(
            encoder,
            TwoStageQuerySelector(d, c.NUM_QUERIES, content, c.TWO_STAGE_SELECTION),
            DeformableDecoder(_decoder_layers(cfg), d, stream_positions=stream_positions),
            denoising,
            StreamEmbedding(d) if c.DECODER.DECOUPLED and c.DECODER.STREAM_EMBED else None,
        )
        return BaseParts(
            neck=ChannelMapper(input_shape, c.IN_FEATURES, d, levels),
            position_embedding=PositionEmbeddingSine(d // 2, offset=-0.5),
            transformer=transformer,
            # one pair per decoder layer, then the encoder's (two-stage) pair
            heads=DetectionHeads(d, c.NUM_CLASSES, cls.num_matched_outputs(cfg)),
        )
