# Copyright (c) align-detr contributors.
"""SD-DETR's task-aware query generation (TQG): per stream, M salient points inside each
selected proposal box; the memory sampled there, averaged, is that stream's content query, and
the points' mean is that stream's position (the paper's Fig. 3: task-aware *content and
positional* embeddings).

Two point predictors:

- ``"roi"`` (the paper's Eq. 5, ``R = MLP(ConvNet(RoIAlign(F)))``): 7x7 RoIAlign of the memory
  inside the box, a 1x1 conv (d -> d/4) + ReLU, flattened, a 3-layer MLP to 2M offsets
  (SAM-DETR's design, which Eq. 5 reuses);
- ``"token"``: a 2-layer MLP on the selected encoder token alone (cheaper; no RoI features).

Both end in tanh offsets scaled by half the box size (the last layer zero-initialised: every
point starts at the box centre). Coordinates: boxes and points are normalised to each image's
own (unpadded) size, as the boxes of the whole project; sampling the padded memory maps them by
the valid ratios, and the padding's memory is zeroed first (as MSDeformAttn does), so an image
gets the same queries alone and inside a padded batch.

Shapes: N images, K proposals, M points, L levels, S tokens, d = d_model.
"""

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from align_detr.layers import MLP, ms_deform_attn

from .encoder import EncoderMemory
from .streams import Streams

__all__ = ["POINT_PREDICTORS", "TaskAwareQueryGenerator"]

#: DECODER.TASK_AWARE_POINT_PREDICTOR values.
POINT_PREDICTORS = ("token", "roi")

#: RoIAlign output size of the "roi" predictor (SAM-DETR's 7x7).
ROI_SIZE = 7


class _RoIPointHead(nn.Module):
    """``MLP(ConvNet(RoIAlign(F)))`` -> (N * K, 2M) raw offsets."""

    def __init__(self, d_model: int, num_points: int):
        super().__init__()
        mid = max(d_model // 4, 1)
        self.conv = nn.Sequential(nn.Conv2d(d_model, mid, 1), nn.ReLU(inplace=True))
        self.mlp = MLP(mid * ROI_SIZE * ROI_SIZE, d_model, 2 * num_points, 3)

    def forward(self, roi_features: torch.Tensor) -> torch.Tensor:
        """roi_features: (N * K, d, 7, 7)."""
        return self.mlp(self.conv(roi_features).flatten(1))


class TaskAwareQueryGenerator(nn.Module):
    """Content queries sampled inside each proposal, one point predictor per stream.

    Args:
        d_model: channels.
        n_levels: memory levels sampled (each point is read on every level, equally weighted).
        num_points: M points per proposal and stream.
        predictor: "token" or "roi" (see the module docstring).
        roi_level: the level RoIAlign reads ("roi"); the stride-16 level of DINO's 4 scales by
            default (1), the only level of a single-scale base.
    """

    def __init__(
        self,
        d_model: int,
        n_levels: int,
        num_points: int = 8,
        predictor: str = "token",
        roi_level: int = 1,
    ):
        super().__init__()
        if predictor not in POINT_PREDICTORS:
            raise ValueError(f"predictor must be one of {POINT_PREDICTORS}, got {predictor!r}")
        self.n_levels = n_levels
        self.num_points = num_points
        self.predictor = predictor
        self.roi_level = min(roi_level, n_levels - 1)
        if predictor == "roi":
            heads = [_RoIPointHead(d_model, num_points) for _ in range(2)]
        else:
            heads = [MLP(d_model, d_model, 2 * num_points, 2) for _ in range(2)]
        self.point_heads = nn.ModuleList(heads)
        self.proj = nn.ModuleList(nn.Linear(d_model, d_model) for _ in range(2))
        self.norm = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(2))
        for head in self.point_heads:
            last = head.mlp.layers[-1] if predictor == "roi" else head.layers[-1]
            nn.init.zeros_(last.weight)  # all points start at the box centre
            nn.init.zeros_(last.bias)

    @staticmethod
    def masked_memory(enc: EncoderMemory) -> torch.Tensor:
        """(N, S, d) memory with the padding zeroed (it must not leak into the queries)."""
        if enc.padding_mask is None:
            return enc.memory
        return enc.memory.masked_fill(enc.padding_mask[..., None], 0.0)

    def roi_features(self, enc: EncoderMemory, memory: torch.Tensor, boxes: torch.Tensor):
        """(N * K, d, 7, 7) RoIAlign of ``roi_level`` inside boxes (N, K, 4) cxcywh."""
        n, k, _ = boxes.shape
        h, w = enc.shapes[self.roi_level]
        start = sum(lh * lw for lh, lw in enc.shapes[: self.roi_level])
        fmap = memory[:, start : start + h * w].transpose(1, 2).reshape(n, -1, h, w)
        # image-normalised -> this level's pixels (the valid area is ratio * size)
        # (N, 2) as (w, h); the sizes as 0-d tensors, not new_tensor([w, h]), keep them symbols
        # in an exported graph
        wh = torch.stack([torch.scalar_tensor(w), torch.scalar_tensor(h)]).to(fmap)
        size = enc.valid_ratios[:, self.roi_level] * wh
        centre, half = boxes[..., :2] * size[:, None], boxes[..., 2:] * size[:, None] / 2
        xyxy = torch.cat([centre - half, centre + half], -1).flatten(0, 1)  # (N * K, 4)
        # image index of each box (expand, not repeat_interleave: the ONNX translation of the
        # latter fails for batches > 1)
        index = torch.arange(n, device=boxes.device, dtype=xyxy.dtype)[:, None].expand(n, k)
        index = index.reshape(-1)
        rois = torch.cat([index[:, None], xyxy], 1)
        # RoIAlign clamps samples in the last pixel row / column to that row, where inside a
        # padded batch it would interpolate towards the (zeroed) padding: one zero row and column
        # make both the same
        fmap = F.pad(fmap, (0, 1, 0, 1))
        return roi_align(fmap, rois.to(fmap.dtype), ROI_SIZE, 1.0, 2, aligned=True)

    def points(self, features: torch.Tensor, boxes: torch.Tensor, stream: int) -> torch.Tensor:
        """(N, K, M, 2) image-normalised points inside boxes (N, K, 4) cxcywh for one stream,
        from ``features``: (N, K, d) tokens ("token") or (N * K, d, 7, 7) RoI features."""
        n, k, _ = boxes.shape
        offsets = self.point_heads[stream](features).view(n, k, self.num_points, 2).tanh()
        return boxes[:, :, None, :2] + offsets * boxes[:, :, None, 2:] * 0.5

    def sample(self, enc: EncoderMemory, memory: torch.Tensor, pts: torch.Tensor):
        """(N, K, d): the masked memory at points (N, K, M, 2), averaged over levels and points.

        The points are image-normalised; the op reads ``0..1`` as the whole padded map, so they
        are scaled by each level's valid ratio (as the decoder scales its reference boxes).
        """
        n, k = pts.shape[:2]
        value = memory.view(n, memory.shape[1], 1, -1)  # one "head" holding all channels
        loc = pts[:, :, None, None] * enc.valid_ratios[:, None, None, :, None, :]
        loc = loc.expand(n, k, 1, self.n_levels, self.num_points, 2)
        weights = memory.new_full(
            (n, k, 1, self.n_levels, self.num_points), 1.0 / (self.n_levels * self.num_points)
        )
        return ms_deform_attn(value, enc.shapes, None, loc.contiguous(), weights)

    def forward(
        self, enc: EncoderMemory, boxes: torch.Tensor, token_features: torch.Tensor
    ) -> Tuple[Streams, Streams]:
        """
        Args:
            enc: the encoder output.
            boxes: (N, K, 4) selected proposal boxes, sigmoid cxcywh, detached.
            token_features: (N, K, d) encoder features of the selected tokens.

        Returns:
            (content, centres): Streams of (N, K, d) content queries and Streams of the
            (N, K, 2) mean points (image-normalised x, y), classification then localisation.
        """
        memory = self.masked_memory(enc)
        if self.predictor == "roi":
            features = self.roi_features(enc, memory, boxes)
        else:
            features = token_features
        queries, centres = [], []
        for stream in range(2):
            pts = self.points(features, boxes, stream)  # (N, K, M, 2)
            sampled = self.sample(enc, memory, pts)
            queries.append(self.norm[stream](self.proj[stream](sampled)))
            centres.append(pts.mean(2))
        return Streams(queries[0], queries[1]), Streams(centres[0], centres[1])
