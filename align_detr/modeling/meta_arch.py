# Copyright (c) align-detr contributors.
"""AlignDETR: the detectron2 meta-architecture of every model in this project.

backbone -> base detector (neck, position encoding, transformer, heads; ``MODEL.ALIGN_DETR.BASE``)
-> per-output predictions -> set criterion (focal / Align / TAL loss, one-to-one or many-to-one
matching per output) in training, top-k post-processing at inference.
"""

from typing import Dict, List

import torch
from detectron2.config import configurable
from detectron2.layers import batched_nms
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from torch import nn

from align_detr.config import resolve_match_k, validate_config
from align_detr.kernels import check_mode, kernel_mode
from align_detr.layers import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from align_detr.losses import SetCriterion
from align_detr.matching import HungarianMatcher

from .bases import BASE_REGISTRY

__all__ = ["AlignDETR", "build_criterion", "select_top_detections"]


def _to_float(x):
    """The floating tensors of a nested dict / list structure as float32."""
    if isinstance(x, torch.Tensor):
        return x.float() if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: _to_float(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_float(v) for v in x)
    return x


def build_criterion(cfg, num_matched_outputs: int, **base_options) -> SetCriterion:
    """The set criterion of the config, for a base with ``num_matched_outputs`` outputs;
    ``base_options``: the base's own SetCriterion arguments (``DetrBase.criterion_options``)."""
    c = cfg.MODEL.ALIGN_DETR
    matcher = HungarianMatcher(
        cost_class=c.MATCHER.COST_CLASS,
        cost_bbox=c.MATCHER.COST_BBOX,
        cost_giou=c.MATCHER.COST_GIOU,
        alpha=c.LOSS.FOCAL_ALPHA,
        gamma=c.LOSS.GAMMA,
    )
    return SetCriterion(
        num_classes=c.NUM_CLASSES,
        matcher=matcher,
        match_k=resolve_match_k(c.LOSS.MATCH_K, num_matched_outputs),
        loss_type=c.LOSS.TYPE,
        class_weight=c.LOSS.CLASS_WEIGHT,
        bbox_weight=c.LOSS.BBOX_WEIGHT,
        giou_weight=c.LOSS.GIOU_WEIGHT,
        focal_alpha=c.LOSS.FOCAL_ALPHA,
        alpha=c.LOSS.ALPHA,
        gamma=c.LOSS.GAMMA,
        tau=c.LOSS.TAU,
        dn_enabled=c.DN.ENABLED,
        **base_options,
    )


def _nearest_index(out_size, in_size, device) -> torch.Tensor:
    """(out_size,) int64 source index of each output pixel, computed exactly as PyTorch's
    "nearest" interpolation does it: floor(i * float32(in / out)) in float32, clamped.

    Written as tensor maths rather than ``F.interpolate`` because ONNX Runtime's Resize divides
    by out / in instead, which lands one pixel off for some sizes (e.g. 120 -> 8): an exported
    model would then mask a different column than the PyTorch one.
    """
    scale = torch.scalar_tensor(in_size, dtype=torch.float32) / torch.scalar_tensor(
        out_size, dtype=torch.float32
    )
    index = (torch.arange(out_size, dtype=torch.float32, device=device) * scale.to(device)).floor()
    return index.long().clamp(max=in_size - 1)


def nearest_resize_mask(mask: torch.Tensor, height, width) -> torch.Tensor:
    """(N, H, W) bool padding mask -> (N, height, width), as ``F.interpolate`` "nearest"."""
    rows = _nearest_index(height, mask.shape[1], mask.device)
    cols = _nearest_index(width, mask.shape[2], mask.device)
    return mask.index_select(1, rows).index_select(2, cols)


def select_top_detections(out: Dict[str, torch.Tensor], num_select: int):
    """The top ``num_select`` (query, class) pairs of a batch by sigmoid score.

    Args:
        out: ``pred_logits`` (N, Q, C) and ``pred_boxes`` (N, Q, 4) normalised cxcywh.
        num_select: pairs kept per image (at most Q * C).

    Returns:
        (scores, labels, boxes): (N, K) descending, (N, K) int64, (N, K, 4) normalised xyxy;
        K = min(num_select, Q * C).
    """
    prob = out["pred_logits"].sigmoid()
    n, k, c = prob.shape
    scores, index = prob.flatten(1).topk(min(num_select, k * c), dim=1)
    query = torch.div(index, c, rounding_mode="floor")
    labels = index % c
    boxes = torch.gather(out["pred_boxes"], 1, query[..., None].expand(-1, -1, 4))
    return scores, labels, box_cxcywh_to_xyxy(boxes)


@META_ARCH_REGISTRY.register()
class AlignDETR(nn.Module):
    """A DETR detector: training returns the loss dict; inference returns one
    ``{"instances": Instances}`` per image with pred_boxes, scores and pred_classes (top
    ``num_select`` over query x class of the last decoder layer; NMS only when asked).

    Args:
        backbone: a detectron2 Backbone.
        neck, position_embedding, transformer, heads: the base detector's parts
            (:class:`~align_detr.modeling.bases.BaseParts`).
        criterion: :class:`~align_detr.losses.SetCriterion`.
        num_select: detections kept per image.
        pixel_mean, pixel_std: per-channel input normalisation.
        test_padding_mask: mask the padding of batched images at inference (the released DINO /
            Align-DETR code treats it as image there).
        test_nms_thresh: IoU of the class-wise NMS over each image's kept detections; 0: none.
        kernels: "auto", "compiled" or "reference": what runs the deformable attention and the
            matching (see :mod:`align_detr.kernels`).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: nn.Module,
        neck: nn.Module,
        position_embedding: nn.Module,
        transformer: nn.Module,
        heads: nn.Module,
        criterion: nn.Module,
        num_select: int,
        pixel_mean: List[float],
        pixel_std: List[float],
        test_padding_mask: bool = True,
        test_nms_thresh: float = 0.0,
        kernels: str = "auto",
    ):
        super().__init__()
        self.kernels = check_mode(kernels)
        self.backbone = backbone
        self.neck = neck
        self.position_embedding = position_embedding
        self.transformer = transformer
        self.heads = heads
        self.criterion = criterion
        self.num_select = num_select
        self.test_padding_mask = test_padding_mask
        if not 0.0 <= test_nms_thresh <= 1.0:
            raise ValueError(
                f"test_nms_thresh must be in [0, 1] (0: no NMS), got {test_nms_thresh}"
            )
        self.test_nms_thresh = test_nms_thresh
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        validate_config(cfg)
        backbone = build_backbone(cfg)
        base = BASE_REGISTRY.get(cfg.MODEL.ALIGN_DETR.BASE)
        parts = base.build(cfg, backbone.output_shape())
        return {
            "backbone": backbone,
            **parts._asdict(),
            "criterion": build_criterion(
                cfg, base.num_matched_outputs(cfg), **base.criterion_options(cfg)
            ),
            "num_select": cfg.MODEL.ALIGN_DETR.NUM_SELECT,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "test_padding_mask": cfg.MODEL.ALIGN_DETR.TEST_PADDING_MASK,
            "test_nms_thresh": cfg.MODEL.ALIGN_DETR.TEST_NMS_THRESH,
            "kernels": cfg.MODEL.ALIGN_DETR.KERNELS,
        }

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
        if not self.training and not self.test_padding_mask:
            mask.zero_()
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

    def transformer_inputs(self, images: torch.Tensor, mask: torch.Tensor):
        """The neck's levels with their padding masks and position encodings.

        Args:
            images: (N, 3, H, W) normalised, padded images; mask: (N, H, W) bool, True on padding.

        Returns:
            (srcs, masks, pos): L tensors (N, d, H_l, W_l), (N, H_l, W_l) bool, (N, d, H_l, W_l).
        """
        srcs = self.neck(self.backbone(images))
        masks = [nearest_resize_mask(mask, s.shape[-2], s.shape[-1]) for s in srcs]
        pos = [self.position_embedding(m).to(s.dtype) for m, s in zip(masks, srcs)]
        return srcs, masks, pos

    # ---- forward ---------------------------------------------------------------------------

    def forward(self, batched_inputs: List[Dict]):
        # Our compiled ops or their PyTorch reference paths, as MODEL.ALIGN_DETR.KERNELS says.
        with kernel_mode(self.kernels):
            return self._forward(batched_inputs)

    def _forward(self, batched_inputs: List[Dict]):
        images, mask = self.preprocess_image(batched_inputs)
        srcs, masks, pos = self.transformer_inputs(images.tensor, mask)
        targets = self.prepare_targets(batched_inputs, images) if self.training else None
        outputs = self.transformer(srcs, masks, pos, self.heads, targets)
        if self.training:
            # Matching and losses in fp32, also under mixed precision (sigmoids of saturated
            # logits, IoUs of small boxes and the assignment need the precision).
            with torch.autocast(self.device.type, enabled=False):
                return self.criterion(_to_float(outputs), targets)
        return self.postprocess(outputs["layers"][-1], images.image_sizes, batched_inputs)

    def postprocess(self, out, image_sizes, batched_inputs):
        """Top ``num_select`` (query, class) pairs by sigmoid score; boxes to the input size."""
        scores, labels, xyxy = select_top_detections(out, self.num_select)
        results = []
        for i, (ih, iw) in enumerate(image_sizes):
            inst = Instances((ih, iw))
            scale = torch.tensor([iw, ih, iw, ih], dtype=xyxy.dtype, device=xyxy.device)
            inst.pred_boxes = Boxes(xyxy[i] * scale)
            inst.scores = scores[i]
            inst.pred_classes = labels[i]
            if self.test_nms_thresh > 0:
                inst = inst[
                    batched_nms(inst.pred_boxes.tensor, scores[i], labels[i], self.test_nms_thresh)
                ]
            x = batched_inputs[i]
            height, width = x.get("height", ih), x.get("width", iw)
            # detector_postprocess rescales to the requested size and clips to it
            results.append({"instances": detector_postprocess(inst, height, width)})
        return results
