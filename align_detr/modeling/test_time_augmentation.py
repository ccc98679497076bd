# Copyright (c) align-detr contributors.
"""Test-time augmentation over the symmetries of the square, for top-down imagery.

:class:`DihedralTTA` runs any detectron2 detector (Align-DETR, or the quickstart's Faster R-CNN
peer) on up to eight views of each image: the identity, the flips and the 90-degree rotations
(the dihedral group of the square). Aerial tiles have no "up", so every view is an image the
detector could have been given. Each view's boxes are mapped back to the image and the views
are fused by :func:`weighted_box_fusion`: a crown that several views found becomes one box at
the score-weighted mean of theirs, which tightens loose boxes and ranks agreed detections
first. Config: ``TEST.AUG.ENABLED`` (detectron2's switch), ``TEST.AUG.VIEWS``,
``TEST.AUG.FUSION_IOU_THRESH``, ``TEST.DETECTIONS_PER_IMAGE``.
"""

from typing import Dict, List, NamedTuple, Tuple

import torch
from detectron2.structures import Boxes, Instances
from torch import nn
from torchvision.ops import box_iou

__all__ = [
    "DIHEDRAL_VIEWS",
    "DihedralTTA",
    "View",
    "boxes_from_view",
    "build_tta_model",
    "tta_setting_problems",
    "view_image",
    "weighted_box_fusion",
]


class View(NamedTuple):
    """One symmetry of the square, applied in this order: transpose (swap x and y), then flip
    left-right, then flip top-bottom."""

    transpose: bool
    hflip: bool
    vflip: bool


#: The eight views; the first ``n`` are used for ``TEST.AUG.VIEWS = n``: 1 the image itself,
#: 2 adds the left-right flip, 4 the top-bottom flip and the 180-degree rotation, 8 the four
#: transposed views (the rotations by +-90 degrees and the two diagonal reflections).
DIHEDRAL_VIEWS: Tuple[View, ...] = tuple(
    View(t, h, v) for t in (False, True) for v in (False, True) for h in (False, True)
)
ALLOWED_VIEW_COUNTS = (1, 2, 4, 8)


def tta_setting_problems(
    num_views: int, iou_thresh: float, names: Tuple[str, str] = ("VIEWS", "FUSION_IOU_THRESH")
) -> List[str]:
    """What is wrong with these settings (empty when they are valid), each under its name in
    ``names`` (the ``TEST.AUG`` keys by default)."""
    problems = []
    if num_views not in ALLOWED_VIEW_COUNTS:
        problems.append(f"{names[0]} must be 1, 2, 4 or 8, got {num_views}")
    if not 0.0 < iou_thresh <= 1.0:
        problems.append(f"{names[1]} must be in (0, 1], got {iou_thresh}")
    return problems


def view_image(image: torch.Tensor, view: View) -> torch.Tensor:
    """The view of an image tensor (C, H, W); (C, W, H) for a transposed view."""
    if view.transpose:
        image = image.transpose(1, 2)
    if view.hflip:
        image = image.flip(2)
    if view.vflip:
        image = image.flip(1)
    return image


def boxes_from_view(boxes: torch.Tensor, view: View, height: float, width: float) -> torch.Tensor:
    """Maps XYXY boxes (N, 4) found in a view back to the image.

    Args:
        height, width: the size of the view's frame the boxes are in (the image's size with
            its sides swapped for a transposed view).
    """
    boxes = boxes.clone()
    # undo the view's steps in reverse order
    if view.vflip:
        boxes[:, [1, 3]] = height - boxes[:, [3, 1]]
    if view.hflip:
        boxes[:, [0, 2]] = width - boxes[:, [2, 0]]
    if view.transpose:
        boxes = boxes[:, [1, 0, 3, 2]]
    return boxes


def weighted_box_fusion(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    classes: torch.Tensor,
    num_views: int,
    iou_thresh: float = 0.55,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fuses the detections of ``num_views`` views of one image (weighted box fusion, WBF).

    Per class, the highest-scoring detection not yet used starts a cluster with every unused
    detection overlapping it by IoU > ``iou_thresh``. The cluster becomes one box at the
    score-weighted mean of its boxes, with score ``sum(scores) / max(num_views, size)``: the
    mean score scaled down when fewer views than ``num_views`` found it. (The WBF paper compares
    each detection with the running fused box; here it is compared with the cluster's best box,
    which makes the result independent of the order of the detections.)

    Args:
        boxes (Tensor[N, 4]): XYXY boxes of all views, in image pixels.
        scores (Tensor[N]), classes (Tensor[N]): their scores and class indices.

    Returns:
        boxes (Tensor[M, 4]), scores (Tensor[M]), classes (Tensor[M]), M <= N, by score.
    """
    out_boxes, out_scores, out_classes = [], [], []
    for c in classes.unique().tolist():
        of_class = classes == c
        b, s = boxes[of_class], scores[of_class]
        order = s.argsort(descending=True, stable=True)
        b, s = b[order], s[order]
        overlaps = box_iou(b, b) > iou_thresh
        unused = torch.ones(len(s), dtype=torch.bool, device=s.device)
        for i in range(len(s)):
            if not unused[i]:
                continue
            members = overlaps[i] & unused
            members[i] = True  # a degenerate (zero-area) box still joins its own cluster
            unused &= ~members
            w = s[members]
            out_boxes.append((b[members] * w[:, None]).sum(0) / w.sum().clamp(min=1e-12))
            out_scores.append(w.sum() / max(num_views, int(members.sum())))
            out_classes.append(c)
    if not out_scores:
        return boxes.new_zeros((0, 4)), scores.new_zeros((0,)), classes.new_zeros((0,))
    fused_scores = torch.stack(out_scores)
    order = fused_scores.argsort(descending=True, stable=True)
    fused_classes = torch.tensor(out_classes, dtype=classes.dtype, device=classes.device)
    return torch.stack(out_boxes)[order], fused_scores[order], fused_classes[order]


class DihedralTTA(nn.Module):
    """A detectron2 detector evaluated on several dihedral views of each image, fused by WBF.

    It takes and returns what the wrapped model does at inference: a list of dicts with
    ``"image"`` (C, H, W, the resized input) and optionally ``"height"``/``"width"`` (the size
    to report boxes in); a list of ``{"instances": Instances}`` with ``pred_boxes``, ``scores``
    and ``pred_classes``. With one view it returns the model's own output.

    Args:
        model: a detectron2 detector (not DDP-wrapped) that rescales its boxes to the input's
            ``height`` x ``width``.
        num_views (int): 1, 2, 4 or 8 (see :data:`DIHEDRAL_VIEWS`).
        iou_thresh (float): IoU above which detections of different views are fused.
        max_detections (int): detections kept per image after fusion, by score.
    """

    def __init__(
        self, model: nn.Module, num_views: int = 8, iou_thresh: float = 0.55, max_detections=100
    ):
        super().__init__()
        problems = tta_setting_problems(num_views, iou_thresh, ("num_views", "iou_thresh"))
        if problems:
            raise ValueError("; ".join(problems))
        self.model = model
        self.views = DIHEDRAL_VIEWS[:num_views]
        self.iou_thresh = iou_thresh
        self.max_detections = max_detections

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, batched_inputs: List[Dict]) -> List[Dict[str, Instances]]:
        if self.training:
            raise RuntimeError("DihedralTTA is for inference: call .eval() first")
        if len(self.views) == 1:
            return self.model(batched_inputs)
        return [self._fused(x) for x in batched_inputs]

    def _fused(self, inputs: Dict) -> Dict[str, Instances]:
        image = inputs["image"]
        height = inputs.get("height", image.shape[-2])
        width = inputs.get("width", image.shape[-1])
        boxes, scores, classes = [], [], []
        for view in self.views:
            view_h, view_w = (width, height) if view.transpose else (height, width)
            # One view per call: each view is run exactly as a plain image would be.
            view_inputs = {**inputs, "image": view_image(image, view)}
            view_inputs.update(height=view_h, width=view_w)
            found = self.model([view_inputs])[0]["instances"]
            boxes.append(boxes_from_view(found.pred_boxes.tensor, view, view_h, view_w))
            scores.append(found.scores)
            classes.append(found.pred_classes)
        cat = torch.cat
        fused = weighted_box_fusion(
            cat(boxes), cat(scores), cat(classes), len(self.views), self.iou_thresh
        )
        keep = slice(0, self.max_detections)
        result = Instances((height, width))
        result.pred_boxes = Boxes(fused[0][keep])
        result.scores = fused[1][keep]
        result.pred_classes = fused[2][keep]
        return {"instances": result}


def build_tta_model(cfg, model: nn.Module) -> DihedralTTA:
    """:class:`DihedralTTA` of ``model`` (not DDP-wrapped) as ``cfg.TEST.AUG`` configures."""
    return DihedralTTA(
        model,
        num_views=cfg.TEST.AUG.VIEWS,
        iou_thresh=cfg.TEST.AUG.FUSION_IOU_THRESH,
        max_detections=cfg.TEST.DETECTIONS_PER_IMAGE,
    )
