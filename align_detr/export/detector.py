# Copyright (c) align-detr contributors.
"""The whole detector as one traceable function of tensors, for export.

:class:`ExportableDetector` wraps a built :class:`~align_detr.modeling.AlignDETR` (any base) and
runs, inside the graph, everything between a batch of already-resized images and its
detections: normalisation, padding to the backbone's size divisibility, the padding masks of each
image's own size, the model, top-K, box scaling to each image's pixels, clipping and, when
``MODEL.ALIGN_DETR.TEST_NMS_THRESH`` is set, class-wise NMS. It matches the eager model's
``forward`` on the same batch (the tests show it); test-time augmentation is not part of it.
"""

from typing import Tuple

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from align_detr.modeling.meta_arch import AlignDETR, select_top_detections

__all__ = ["ExportableDetector", "padding_mask"]


def padding_mask(image_sizes: torch.Tensor, height, width) -> torch.Tensor:
    """(N, height, width) bool, True outside each image's (h, w) of ``image_sizes`` (N, 2)."""
    ys = torch.arange(height, device=image_sizes.device)[None, :, None]
    xs = torch.arange(width, device=image_sizes.device)[None, None, :]
    return (ys >= image_sizes[:, 0, None, None]) | (xs >= image_sizes[:, 1, None, None])


def _nms_keep(boxes, scores, labels, num_classes: int, iou: float) -> torch.Tensor:
    """(N, K) bool: what class-wise NMS of each image keeps, for all images in one NMS call.

    Boxes of different (image, class) groups are moved apart by a multiple of the largest
    coordinate so that they never overlap (torchvision's batched-NMS trick, over images too).
    """
    n, k = scores.shape
    group = torch.arange(n, device=boxes.device)[:, None] * num_classes + labels
    offsets = group.to(boxes.dtype)[..., None] * (boxes.max() + 1)
    kept = torchvision.ops.nms((boxes + offsets).flatten(0, 1), scores.flatten(), iou)
    keep = torch.zeros(n * k, dtype=torch.bool, device=boxes.device)
    return keep.index_fill(0, kept, True).view(n, k)


class ExportableDetector(nn.Module):
    """``(images, image_sizes) -> (boxes, scores, labels)`` for a batch of resized images.

    Args:
        model: a built AlignDETR in eval mode (its weights loaded).

    Forward args:
        images: (N, 3, H, W) uint8 or float pixel values in the config's ``INPUT.FORMAT`` channel
            order, each image at the top-left, anything in the padding.
        image_sizes: (N, 2) int64 (h, w) of each image inside the batch.

    Returns:
        boxes (N, K, 4) float32 xyxy in each image's pixels, clipped to it; scores (N, K) float32,
        descending except that boxes clipped to nothing score 0 (the eager model drops them) and,
        with NMS, suppressed detections score 0 and come last; labels (N, K) int64.
        K = min(NUM_SELECT, NUM_QUERIES * NUM_CLASSES).
    """

    def __init__(self, model: AlignDETR):
        super().__init__()
        self.model = model.eval()
        self.size_divisibility = int(model.backbone.size_divisibility)
        self.num_classes = int(model.heads.num_classes)

    def forward(
        self, images: torch.Tensor, image_sizes: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m = self.model
        x = (images.to(m.pixel_mean.dtype) - m.pixel_mean) / m.pixel_std
        _, _, h, w = x.shape
        div = self.size_divisibility
        if div > 1:  # detectron2's ImageList pads the batch to a multiple of this
            x = F.pad(x, (0, (div - w % div) % div, 0, (div - h % div) % div))
        mask = padding_mask(image_sizes, x.shape[-2], x.shape[-1])
        # Padding reads as 0 after normalisation, as in ImageList.from_tensors.
        x = x.masked_fill(mask[:, None], 0.0)
        if not m.test_padding_mask:
            mask = torch.zeros_like(mask)
        srcs, masks, pos = m.transformer_inputs(x, mask)
        out = m.transformer(srcs, masks, pos, m.heads, None)["layers"][-1]
        scores, labels, boxes = select_top_detections(out, m.num_select)
        size_wh = image_sizes.flip(-1).to(boxes.dtype)  # (N, 2) as (w, h)
        boxes = boxes * size_wh.repeat(1, 2)[:, None, :]
        if m.test_nms_thresh > 0:
            keep = _nms_keep(boxes, scores, labels, self.num_classes, m.test_nms_thresh)
            # top-K of all K re-sorts (ONNX has TopK but no stable sort)
            scores, order = torch.where(keep, scores, 0.0).topk(scores.shape[1], dim=1)
            labels = labels.gather(1, order)
            boxes = boxes.gather(1, order[..., None].expand(-1, -1, 4))
        limit = size_wh.repeat(1, 2)[:, None, :]
        boxes = torch.minimum(boxes.clamp(min=0), limit)
        nonempty = (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
        return boxes, torch.where(nonempty, scores, 0.0), labels
