"""AlignDETR: the detectron2 meta-architecture (DINO-style deformable DETR + Align-DETR /
SD-DETR options). Configured only through MODEL.ALIGN_DETR (see align_detr/config.py)."""

import copy
import math
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances

from align_detr.layers import PositionEmbeddingSine, box_xyxy_to_cxcywh, inverse_sigmoid
from align_detr.losses import SetCriterion
from align_detr.losses.criterion import LOSS_TYPES
from align_detr.matching import HungarianMatcher

from .denoising import build_denoising_queries
from .neck import ChannelMapper
from .transformer import MLP, DeformableTransformer


@META_ARCH_REGISTRY.register()
class AlignDETR(nn.Module):
    """Backbone -> neck (4 levels) -> deformable encoder -> two-stage top-K queries (+ CDN
    queries) -> decoder with box refinement -> per-layer heads -> set criterion.

    Training returns the loss dict; inference returns one {"instances": Instances} per image
    with pred_boxes, scores and pred_classes (top NUM_SELECT over query x class, no NMS).
    """

    def __init__(self, cfg):
        super().__init__()
        c = cfg.MODEL.ALIGN_DETR
        self.num_classes = c.NUM_CLASSES
        self.num_queries = c.NUM_QUERIES
        self.num_select = c.NUM_SELECT
        self.d_model = c.D_MODEL
        self.dn_enabled = c.DN.ENABLED
        self.dn_num_queries = c.DN.NUM_QUERIES
        self.dn_label_noise = c.DN.LABEL_NOISE_RATIO
        self.dn_box_noise = c.DN.BOX_NOISE_SCALE
        check_config(cfg)

        self.backbone = build_backbone(cfg)
        self.neck = ChannelMapper(
            self.backbone.output_shape(), c.IN_FEATURES, c.D_MODEL, c.NUM_FEATURE_LEVELS
        )
        self.position_embedding = PositionEmbeddingSine(c.D_MODEL // 2, offset=-0.5)

        num_dec = c.DECODER.NUM_LAYERS
        decoder_layer_factory, query_generator = None, None
        if c.DECODER.DECOUPLED or c.DECODER.TASK_AWARE_QUERIES:
            from .decoupled import build_sd_detr_parts  # SD-DETR, only when asked for

            decoder_layer_factory, query_generator = build_sd_detr_parts(cfg)
        self.transformer = DeformableTransformer(
            d_model=c.D_MODEL,
            n_heads=c.NHEADS,
            n_levels=c.NUM_FEATURE_LEVELS,
            num_encoder_layers=c.ENCODER.NUM_LAYERS,
            num_decoder_layers=num_dec,
            enc_n_points=c.ENCODER.N_POINTS,
            dec_n_points=c.DECODER.N_POINTS,
            enc_dim_feedforward=c.ENCODER.DIM_FEEDFORWARD,
            dec_dim_feedforward=c.DECODER.DIM_FEEDFORWARD,
            enc_dropout=c.ENCODER.DROPOUT,
            dec_dropout=c.DECODER.DROPOUT,
            num_queries=c.NUM_QUERIES,
            decoder_layer_factory=decoder_layer_factory,
            query_generator=query_generator,
        )
        # Unshared heads: one per decoder layer, then the encoder (two-stage) head.
        class_head = nn.Linear(c.D_MODEL, c.NUM_CLASSES)
        nn.init.constant_(class_head.bias, -math.log((1 - 0.01) / 0.01))  # prior 0.01
        box_head = MLP(c.D_MODEL, c.D_MODEL, 4, 3)
        nn.init.zeros_(box_head.layers[-1].weight)
        nn.init.zeros_(box_head.layers[-1].bias)
        self.class_heads = nn.ModuleList(copy.deepcopy(class_head) for _ in range(num_dec + 1))
        self.box_heads = nn.ModuleList(copy.deepcopy(box_head) for _ in range(num_dec + 1))
        # CDN label embedding (the extra row is never a real label)
        self.label_embed = nn.Embedding(c.NUM_CLASSES + 1, c.D_MODEL)

        matcher = HungarianMatcher(
            cost_class=c.MATCHER.COST_CLASS,
            cost_bbox=c.MATCHER.COST_BBOX,
            cost_giou=c.MATCHER.COST_GIOU,
            alpha=c.LOSS.FOCAL_ALPHA,
            gamma=c.LOSS.GAMMA,
        )
        self.criterion = SetCriterion(
            num_classes=c.NUM_CLASSES,
            matcher=matcher,
            match_k=c.LOSS.MATCH_K,
            loss_type=c.LOSS.TYPE,
            class_weight=c.LOSS.CLASS_WEIGHT,
            bbox_weight=c.LOSS.BBOX_WEIGHT,
            giou_weight=c.LOSS.GIOU_WEIGHT,
            focal_alpha=c.LOSS.FOCAL_ALPHA,
            alpha=c.LOSS.ALPHA,
            gamma=c.LOSS.GAMMA,
            tau=c.LOSS.TAU,
            dn_enabled=c.DN.ENABLED,
        )
        self.register_buffer("pixel_mean", torch.tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(cfg.MODEL.PIXEL_STD).view(-1, 1, 1), False)

    @property
    def device(self):
        return self.pixel_mean.device

    # ---- inputs ----------------------------------------------------------------------------

    def preprocess_image(self, batched_inputs):
        """Normalises and pads the images. Returns the ImageList and (N, H, W) padding masks."""
        images = [
            (x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs
        ]
        images = ImageList.from_tensors(images, self.backbone.size_divisibility)
        n, _, h, w = images.tensor.shape
        mask = torch.ones(n, h, w, dtype=torch.bool, device=self.device)
        for i, (ih, iw) in enumerate(images.image_sizes):
            mask[i, :ih, :iw] = False
        return images, mask

    def prepare_targets(self, batched_inputs, images):
        """GT boxes normalised by each image's own (unpadded) size, as cxcywh."""
        targets = []
        for x, (h, w) in zip(batched_inputs, images.image_sizes):
            inst = x["instances"].to(self.device)
            scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=self.device)
            boxes = box_xyxy_to_cxcywh(inst.gt_boxes.tensor / scale)
            targets.append({"labels": inst.gt_classes.long(), "boxes": boxes})
        return targets

    # ---- forward ---------------------------------------------------------------------------

    def forward(self, batched_inputs: List[Dict]):
        images, mask = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        srcs = self.neck(features)
        masks = [F.interpolate(mask[None].float(), size=s.shape[-2:])[0].bool() for s in srcs]
        pos = [self.position_embedding(m).to(s.dtype) for m, s in zip(masks, srcs)]

        targets = self.prepare_targets(batched_inputs, images) if self.training else None
        outputs, dn_meta = self.run_transformer(srcs, masks, pos, targets)
        if self.training:
            return self.criterion(outputs, targets, dn_meta)
        return self.postprocess(outputs["layers"][-1], images.image_sizes, batched_inputs)

    def run_transformer(self, srcs, masks, pos, targets):
        """Encoder, query selection, decoder and heads.

        Returns:
            (outputs, dn_meta): outputs has "layers" (per decoder layer pred_logits (N, K, C)
            and pred_boxes (N, K, 4)), "enc" (the selected proposals) and "dn_layers" (per
            layer predictions of the DN queries, or None).
        """
        t = self.transformer
        enc = t.encode(srcs, masks, pos)
        sel = t.select_queries(enc, self.class_heads[-1], self.box_heads[-1])
        tgt, ref_unact = sel["tgt"], sel["ref_unact"]
        dn_meta, attn_mask = None, None
        if self.training and self.dn_enabled:
            dn = build_denoising_queries(
                targets,
                self.dn_num_queries,
                self.dn_label_noise,
                self.dn_box_noise,
                self.num_classes,
                self.label_embed,
                num_matching_queries=(
                    tgt.shape[1] if not isinstance(tgt, tuple) else tgt[0].shape[1]
                ),
            )
            if dn is not None:
                dn_content, dn_ref, attn_mask, dn_meta = dn
                if isinstance(tgt, tuple):  # decoupled streams: both start from the DN content
                    tgt = tuple(torch.cat([dn_content, x], 1) for x in tgt)
                else:
                    tgt = torch.cat([dn_content, tgt], 1)
                ref_unact = torch.cat([dn_ref, ref_unact], 1)
        hidden, references = t.decode(tgt, ref_unact, enc, self.box_heads, attn_mask)

        layers, dn_layers = [], []
        pad = dn_meta.pad_size if dn_meta is not None else 0
        for i, (h, ref) in enumerate(zip(hidden, references)):
            cls_h, loc_h = h if isinstance(h, tuple) else (h, h)
            logits = self.class_heads[i](cls_h)
            # look-forward-twice: this layer's delta on the previous layer's undetached box
            boxes = (self.box_heads[i](loc_h) + inverse_sigmoid(ref)).sigmoid()
            layers.append({"pred_logits": logits[:, pad:], "pred_boxes": boxes[:, pad:]})
            if pad:
                dn_layers.append({"pred_logits": logits[:, :pad], "pred_boxes": boxes[:, :pad]})
        outputs = {
            "layers": layers,
            "enc": {"pred_logits": sel["enc_logits"], "pred_boxes": sel["enc_boxes"]},
            "dn_layers": dn_layers if dn_meta is not None else None,
        }
        return outputs, dn_meta

    def postprocess(self, out, image_sizes, batched_inputs):
        """Top NUM_SELECT (query, class) pairs by sigmoid score; boxes to the input size."""
        prob = out["pred_logits"].sigmoid()
        n, k, c = prob.shape
        num_select = min(self.num_select, k * c)
        scores, index = prob.flatten(1).topk(num_select, dim=1)
        query = torch.div(index, c, rounding_mode="floor")
        labels = index % c
        boxes = torch.gather(out["pred_boxes"], 1, query[..., None].expand(-1, -1, 4))
        cx, cy, w, h = boxes.unbind(-1)
        xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
        results = []
        for i, (ih, iw) in enumerate(image_sizes):
            inst = Instances((ih, iw))
            scale = torch.tensor([iw, ih, iw, ih], dtype=xyxy.dtype, device=xyxy.device)
            inst.pred_boxes = Boxes(xyxy[i] * scale)
            inst.pred_boxes.clip((ih, iw))
            inst.scores = scores[i]
            inst.pred_classes = labels[i]
            x = batched_inputs[i]
            height, width = x.get("height", ih), x.get("width", iw)
            results.append({"instances": detector_postprocess(inst, height, width)})
        return results


#: Upper bound of DN.NUM_QUERIES (DINO uses 100 with 900 matching queries).
MAX_DN_QUERIES = 2000


def check_config(cfg):
    """Fails early, naming the key, on values the model cannot run with."""
    c = cfg.MODEL.ALIGN_DETR
    problems = []
    if c.NUM_CLASSES < 1:
        problems.append(f"NUM_CLASSES must be >= 1, got {c.NUM_CLASSES}")
    if c.D_MODEL % c.NHEADS != 0:
        problems.append(f"D_MODEL ({c.D_MODEL}) must be divisible by NHEADS ({c.NHEADS})")
    if c.D_MODEL % 2 != 0:
        problems.append(f"D_MODEL must be even (sine position encoding), got {c.D_MODEL}")
    if c.NUM_QUERIES < 1 or c.NUM_SELECT < 1:
        problems.append("NUM_QUERIES and NUM_SELECT must be >= 1")
    if len(c.LOSS.MATCH_K) != c.DECODER.NUM_LAYERS + 1:
        problems.append(
            f"LOSS.MATCH_K has {len(c.LOSS.MATCH_K)} entries but needs DECODER.NUM_LAYERS + 1 "
            f"= {c.DECODER.NUM_LAYERS + 1} (encoder, then each decoder layer)"
        )
    if any(int(k) != k or k < 1 for k in c.LOSS.MATCH_K):
        problems.append(f"LOSS.MATCH_K entries must be integers >= 1, got {list(c.LOSS.MATCH_K)}")
    if c.LOSS.TAU <= 0:
        problems.append(f"LOSS.TAU must be > 0, got {c.LOSS.TAU}")
    if c.DN.ENABLED and c.DN.NUM_QUERIES < 1:
        problems.append(f"DN.NUM_QUERIES must be >= 1 when DN is enabled, got {c.DN.NUM_QUERIES}")
    if c.DN.ENABLED and c.DN.NUM_QUERIES > MAX_DN_QUERIES:
        problems.append(
            f"DN.NUM_QUERIES must be <= {MAX_DN_QUERIES} (the DN + matching self-attention mask "
            f"grows with its square), got {c.DN.NUM_QUERIES}"
        )
    if not 0.0 <= c.DN.LABEL_NOISE_RATIO <= 1.0:
        problems.append(f"DN.LABEL_NOISE_RATIO must be in [0, 1], got {c.DN.LABEL_NOISE_RATIO}")
    if c.DN.BOX_NOISE_SCALE < 0:
        problems.append(f"DN.BOX_NOISE_SCALE must be >= 0, got {c.DN.BOX_NOISE_SCALE}")
    if c.LOSS.TYPE not in LOSS_TYPES:
        problems.append(f"LOSS.TYPE must be one of {', '.join(LOSS_TYPES)}, got {c.LOSS.TYPE!r}")
    if not 0.0 <= c.LOSS.ALPHA <= 1.0:
        problems.append(f"LOSS.ALPHA must be in [0, 1], got {c.LOSS.ALPHA}")
    if c.LOSS.GAMMA < 0:
        problems.append(f"LOSS.GAMMA must be >= 0, got {c.LOSS.GAMMA}")
    for key in ("CLASS_WEIGHT", "BBOX_WEIGHT", "GIOU_WEIGHT"):
        if c.LOSS[key] < 0:
            problems.append(f"LOSS.{key} must be >= 0, got {c.LOSS[key]}")
    if not 0.0 <= c.EMA.DECAY < 1.0:
        problems.append(f"EMA.DECAY must be in [0, 1), got {c.EMA.DECAY}")
    if problems:
        raise ValueError("invalid MODEL.ALIGN_DETR config: " + "; ".join(problems))
