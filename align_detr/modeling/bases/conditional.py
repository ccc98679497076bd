# Copyright (c) align-detr contributors.
"""Conditional DETR (Meng et al., ICCV 2021), the base of every SD-DETR result: single-scale
C5 (or DC5: ``MODEL.RESNETS.RES5_DILATION: 2``) features, a 1x1 projection to d_model, the sine
position encoding, a DETR encoder (multi-head self-attention, post-norm), and a decoder whose
cross-attention is conditional: each query's reference point (an MLP of its learnt positional
embedding, fixed across layers) gives a spatial query, the sine of the point scaled by an FFN of
the decoder embedding (not in the first layer). One class / box head pair is shared by every
layer; the box head's centre offset is added to the reference point in inverse-sigmoid space.

SD-DETR options (``DECODER.DECOUPLED`` and friends): the decoupled layer with conditional blocks
(shared self-attention, a conditional cross-attention + FFN per stream), and task-aware query
generation from a mini-detector's top-N boxes on the encoder output (the two-stage selector on
the single-scale memory, its class / box head pair supervised as an extra output); each stream
then has its own content, reference point and positional query.
"""

from typing import Dict, List, Optional

import torch
from torch import nn

from align_detr.layers import MLP, PositionEmbeddingSine, box_sine_embedding, inverse_sigmoid

from ..conditional_layers import (
    ConditionalCrossAttentionBlock,
    ConditionalSelfAttentionBlock,
    DetrEncoder,
    DetrEncoderLayer,
    SingleScaleMemory,
)
from ..decoder import DecoderLayer
from ..decoupled import DecoupledDecoderLayer, per_stream
from ..heads import DetectionHeads
from ..streams import StreamEmbedding, Streams
from ..task_aware import TaskAwareQueryGenerator
from ..two_stage import TwoStageQuerySelector
from . import BASE_REGISTRY, BaseParts, DetrBase

__all__ = ["ConditionalDETR", "ConditionalDETRTransformer", "InputProjection"]


class InputProjection(nn.Module):
    """The last of ``in_features`` through a 1x1 conv to d_model: one level (a list of one)."""

    def __init__(self, input_shapes, in_features: List[str], d_model: int):
        super().__init__()
        self.in_feature = in_features[-1]
        if self.in_feature not in input_shapes:
            raise ValueError(f"backbone has no feature {self.in_feature!r}: {sorted(input_shapes)}")
        self.proj = nn.Conv2d(input_shapes[self.in_feature].channels, d_model, kernel_size=1)

    def forward(self, features: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        return [self.proj(features[self.in_feature])]


class ConditionalDecoder(nn.Module):
    """Runs the decoder layers with conditional spatial queries (no box refinement).

    Args:
        layers: decoder layers ``(Streams, query_pos, spatial_query, memory) -> Streams``.
        d_model: d.
        stream_scales: a second lambda-FFN for the localisation stream (SD-DETR's per-stream
            positions); otherwise both streams share one.
    """

    def __init__(self, layers: List[nn.Module], d_model: int, stream_scales: bool = False):
        super().__init__()
        self.d_model = d_model
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(d_model)
        self.query_scale = MLP(d_model, d_model, d_model, 2)
        self.query_scale_loc = MLP(d_model, d_model, d_model, 2) if stream_scales else None
        self.ref_point_head = MLP(d_model, d_model, 2, 2)

    def spatial_query(self, layer_id: int, x, reference, loc_stream: bool = False):
        """(N, Q, d): sine(reference (N, Q, 2)), scaled by lambda(x) after the first layer."""
        sine = box_sine_embedding(reference, self.d_model).to(x.dtype)
        if layer_id == 0:
            return sine
        scale = self.query_scale_loc if loc_stream and self.query_scale_loc else self.query_scale
        return sine * scale(x)

    def forward(self, queries: Streams, query_pos, references, memory: SingleScaleMemory):
        """
        Args:
            queries: (N, Q, d) content per stream (one stream: a plain decoder).
            query_pos: (N, Q, d), or Streams of one per stream.
            references: (N, Q, 2) sigmoid reference points, or Streams of one per stream.

        Returns:
            per layer, Streams of the normalised (N, Q, d) outputs.
        """
        pos, refs = per_stream(query_pos), per_stream(references)
        hidden = []
        for layer_id, layer in enumerate(self.layers):
            if queries.is_single and pos.is_single and refs.is_single:
                spatial = self.spatial_query(layer_id, queries.cls, refs.cls)
                queries = layer(queries, pos.cls, spatial, memory)
            else:
                spatial = Streams(
                    self.spatial_query(layer_id, queries.cls, refs.cls),
                    self.spatial_query(layer_id, queries.loc, refs.loc, loc_stream=True),
                )
                queries = layer(queries, pos, spatial, memory)
            hidden.append(queries.map(self.norm))
        return hidden


class ConditionalDETRTransformer(nn.Module):
    """Encoder, queries (learnt, or task-aware from the encoder), decoder, per-layer outputs.

    Args:
        encoder: :class:`DetrEncoder`.
        decoder: :class:`ConditionalDecoder`.
        num_queries: Q learnt positional queries (without a query selector).
        query_selector: SD-DETR's mini-detector + task-aware query generator
            (:class:`~align_detr.modeling.two_stage.TwoStageQuerySelector` reading the heads'
            last pair), or None for Conditional DETR's learnt queries.
        stream_embed: add a learnt vector per stream to the content queries.
        stream_positions: each stream positioned at its own task-aware points (with a query
            selector); otherwise both at the proposal's centre.
    """

    def __init__(
        self,
        encoder: DetrEncoder,
        decoder: ConditionalDecoder,
        num_queries: int,
        query_selector: Optional[TwoStageQuerySelector] = None,
        stream_embed: bool = False,
        stream_positions: bool = False,
    ):
        super().__init__()
        d = decoder.d_model
        self.encoder = encoder
        self.decoder = decoder
        self.query_selector = query_selector
        if query_selector is None:
            self.query_embed = nn.Embedding(num_queries, d)
        else:
            # positional query of a task-aware point (the learnt embedding's part)
            self.query_pos_head = MLP(d, d, d, 2)
        self.stream_embed = StreamEmbedding(d) if stream_embed else None
        self.stream_positions = stream_positions
        for module in (self.encoder, self.decoder):  # Xavier, as Conditional DETR
            for p in module.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)

    def queries(self, memory: SingleScaleMemory, heads: DetectionHeads):
        """(content Streams, positional queries, reference points, box-size base, enc output)."""
        if self.query_selector is None:
            n = memory.memory.shape[0]
            query_pos = self.query_embed.weight[None].expand(n, -1, -1)
            refs = self.decoder.ref_point_head(query_pos).sigmoid()
            content = Streams.single(torch.zeros_like(query_pos))
            return content, query_pos, refs, None, None
        sel = self.query_selector(memory, heads.class_heads[-1], heads.box_heads[-1])
        anchors = sel.ref_unact.sigmoid()
        if self.stream_positions and sel.centres is not None:
            refs = sel.centres.map(lambda p: p.clamp(0.0, 1.0))
        else:
            refs = Streams.single(anchors[..., :2])
        query_pos = refs.map(
            lambda p: self.query_pos_head(box_sine_embedding(p, self.decoder.d_model))
        )
        enc = {"pred_logits": sel.enc_logits, "pred_boxes": sel.enc_boxes}
        # (re-clamped, as DINO does: an invalid pick's unactivated anchor is infinite)
        return sel.queries, query_pos, refs, inverse_sigmoid(anchors[..., 2:]), enc

    def forward(self, srcs, masks, pos, heads: DetectionHeads, targets=None) -> Dict:
        """See :mod:`align_detr.modeling.bases` for the contract (one level)."""
        memory = self.encoder(srcs[-1], masks[-1], pos[-1])
        content, query_pos, refs, wh_unact, enc = self.queries(memory, heads)
        if self.stream_embed is not None:
            content = self.stream_embed(content)
        hidden = self.decoder(content, query_pos, refs, memory)
        ref_loc = per_stream(refs).loc
        base = inverse_sigmoid(ref_loc)
        # Conditional DETR: the box head's centre is an offset to the reference point and its
        # size is absolute; with task-aware proposals the size is relative to the anchor's
        size = wh_unact if wh_unact is not None else torch.zeros_like(base)
        base = torch.cat([base, size.to(base.dtype)], -1)
        layers = []
        for h in hidden:
            boxes = (heads.box_heads[0](h.loc) + base).sigmoid()
            layers.append({"pred_logits": heads.class_heads[0](h.cls), "pred_boxes": boxes})
        return {
            "layers": layers,
            "enc": enc,
            "dn_layers": None,
            "dn_meta": None,
            "reference": ref_loc,
        }


def _decoder_layers(cfg) -> List[nn.Module]:
    """Plain or (SD-DETR) decoupled conditional decoder layers."""
    c = cfg.MODEL.ALIGN_DETR
    dec = c.DECODER
    layers = []
    for i in range(dec.NUM_LAYERS):

        def self_attention():
            return ConditionalSelfAttentionBlock(c.D_MODEL, c.NHEADS, dec.DROPOUT)

        def cross_attention(first=(i == 0)):
            return ConditionalCrossAttentionBlock(
                c.D_MODEL, c.NHEADS, dec.DIM_FEEDFORWARD, dec.DROPOUT, first_layer=first
            )

        if dec.DECOUPLED:
            layers.append(
                DecoupledDecoderLayer(self_attention, cross_attention, dec.SPLIT_SELF_ATTN)
            )
        else:
            layers.append(DecoderLayer(self_attention(), cross_attention()))
    return layers


@BASE_REGISTRY.register()
class ConditionalDETR(DetrBase):
    """``MODEL.ALIGN_DETR.BASE: "ConditionalDETR"``; matched outputs: (the mini-detector, with
    task-aware queries, then) each decoder layer."""

    @classmethod
    def num_matched_outputs(cls, cfg) -> int:
        dec = cfg.MODEL.ALIGN_DETR.DECODER
        return dec.NUM_LAYERS + (1 if dec.TASK_AWARE_QUERIES else 0)

    @classmethod
    def check_config(cls, cfg) -> List[str]:
        c = cfg.MODEL.ALIGN_DETR
        problems = []
        if c.DN.ENABLED:
            problems.append("DN.ENABLED must be False for BASE ConditionalDETR (no denoising)")
        if c.NUM_FEATURE_LEVELS != 1:
            problems.append(
                f"NUM_FEATURE_LEVELS must be 1 for BASE ConditionalDETR (single scale: the last "
                f"of IN_FEATURES), got {c.NUM_FEATURE_LEVELS}"
            )
        return problems

    @classmethod
    def build(cls, cfg, input_shape) -> BaseParts:
        c = cfg.MODEL.ALIGN_DETR
        d, dec = c.D_MODEL, c.DECODER
        enc = c.ENCODER
        encoder = DetrEncoder(
            [
                DetrEncoderLayer(d, c.NHEADS, enc.DIM_FEEDFORWARD, enc.DROPOUT)
                for _ in range(enc.NUM_LAYERS)
            ],
            decoder_padding_mask=c.CONDITIONAL.DECODER_PADDING_MASK,
        )
        selector = None
        if dec.TASK_AWARE_QUERIES:
            generator = TaskAwareQueryGenerator(
                d, 1, dec.TASK_AWARE_POINTS, dec.TASK_AWARE_POINT_PREDICTOR, roi_level=0
            )
            selector = TwoStageQuerySelector(d, c.NUM_QUERIES, generator, c.TWO_STAGE_SELECTION)
        stream_positions = dec.DECOUPLED and dec.STREAM_POSITIONS
        transformer = ConditionalDETRTransformer(
            encoder,
            ConditionalDecoder(_decoder_layers(cfg), d, stream_scales=stream_positions),
            c.NUM_QUERIES,
            selector,
            stream_embed=dec.DECOUPLED and dec.STREAM_EMBED,
            stream_positions=stream_positions,
        )
        return BaseParts(
            neck=InputProjection(input_shape, c.IN_FEATURES, d),
            # normalised to the valid area, no half-pixel offset (Conditional DETR's)
            position_embedding=PositionEmbeddingSine(d // 2, offset=0.0),
            transformer=transformer,
            # one pair shared by every decoder layer (+ the mini-detector's, last)
            heads=DetectionHeads(d, c.NUM_CLASSES, 1 + (1 if dec.TASK_AWARE_QUERIES else 0)),
        )
