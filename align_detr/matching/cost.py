"""DETR matching cost of a whole batch on the compiled op ``torch.ops.align_detr.matching_cost``.

The op (CPU and CUDA kernels in csrc/matching) scores each image's queries against that image's
ground truth only, in one call for the batch. The usual implementation instead builds the
[B*Q, sum(G)] matrix over the concatenated ground truth of the batch and keeps its diagonal
blocks, which is B times the work and the device-to-host copy.
"""

from typing import List, Sequence, Tuple

import torch

from align_detr import _ext


def _concat_targets(
    gt_labels: Sequence[torch.Tensor], gt_boxes: Sequence[torch.Tensor], device: torch.device
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, List[int]]:
    """Concatenates per-image targets and builds the (B + 1,) exclusive-cumsum offsets."""
    sizes = [int(t.shape[0]) for t in gt_labels]
    for b, (g, boxes) in enumerate(zip(sizes, gt_boxes)):
        if boxes.numel() != 4 * g:
            raise ValueError(
                f"matching_cost: image {b} has {g} GT labels but GT boxes of shape "
                f"{tuple(boxes.shape)}"
            )
    offsets = [0]
    for g in sizes:
        offsets.append(offsets[-1] + g)
    # Labels keep their dtype (the op insists on int64) except empty ones, often made as float.
    # Host-to-device copies are non-blocking so they do not wait for queued kernels.
    labels = torch.cat(
        [
            (t.long() if t.numel() == 0 else t).reshape(-1).to(device, non_blocking=True)
            for t in gt_labels
        ]
    )
    boxes = torch.cat([t.reshape(-1, 4).to(device, non_blocking=True) for t in gt_boxes])
    off = torch.tensor(offsets, dtype=torch.int64)
    if device.type != "cpu":
        off = off.to(device, non_blocking=True)
    return labels, boxes, off, sizes


def matching_cost_flat(
    pred_logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    gt_labels: Sequence[torch.Tensor],
    gt_boxes: Sequence[torch.Tensor],
    class_weight: float = 2.0,
    bbox_weight: float = 5.0,
    giou_weight: float = 2.0,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> Tuple[torch.Tensor, List[int]]:
    """Like :func:`matching_cost`, but returns the op's flat output and the GT counts.

    Returns:
        ``(flat, sizes)``: flat (Q * sum(G),) holds image b's cost block starting at
        Q * sum(sizes[:b]), GT-major: (G_b, Q) row-major, element g * Q + q being the cost of
        query q for GT g; sizes is the list of G_b. The matchers copy ``flat`` to the host in
        one transfer and solve it there with ``torch.ops.align_detr.assign_batch``.
    """
    if pred_logits.dim() != 3:
        raise ValueError(
            f"matching_cost: pred_logits must be (B, Q, C), got shape {tuple(pred_logits.shape)}"
        )
    if len(gt_labels) != pred_logits.shape[0] or len(gt_boxes) != pred_logits.shape[0]:
        raise ValueError(
            f"matching_cost: got {len(gt_labels)} label tensors and {len(gt_boxes)} box tensors "
            f"for a batch of {pred_logits.shape[0]} images"
        )
    if pred_logits.shape[0] == 0:
        out_dtype = (
            torch.float64
            if torch.float64 in (pred_logits.dtype, pred_boxes.dtype)
            else torch.float32
        )
        return pred_logits.new_empty((0,), dtype=out_dtype), []
    labels, boxes, offsets, sizes = _concat_targets(gt_labels, gt_boxes, pred_logits.device)
    with torch.no_grad():  # matching is not differentiated; the op has no autograd formula
        flat = _ext.ops().matching_cost(
            pred_logits,
            pred_boxes,
            labels,
            boxes,
            offsets,
            float(class_weight),
            float(bbox_weight),
            float(giou_weight),
            float(alpha),
            float(gamma),
        )
    return flat, sizes


def split_costs(flat: torch.Tensor, sizes: Sequence[int], num_queries: int) -> List[torch.Tensor]:
    """Splits the op's flat output into per-image (Q, G_b) views (transposes of GT-major blocks)."""
    return [
        block.view(g, num_queries).t()
        for block, g in zip(torch.split(flat, [num_queries * g for g in sizes]), sizes)
    ]


def matching_cost(
    pred_logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    gt_labels: Sequence[torch.Tensor],
    gt_boxes: Sequence[torch.Tensor],
    class_weight: float = 2.0,
    bbox_weight: float = 5.0,
    giou_weight: float = 2.0,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> List[torch.Tensor]:
    """Focal + L1 + (-GIoU) matching cost of each image's queries against its own GT.

    ``cost = class_weight * focal + bbox_weight * L1(cxcywh) + giou_weight * (-GIoU)`` with
    ``focal = alpha (1-p)^gamma (-log(p + 1e-8)) - (1-alpha) p^gamma (-log(1-p + 1e-8))`` and
    ``p = sigmoid(logit of the GT's class)``, as in Deformable-DETR / DINO / detrex. The GIoU
    divisions are guarded (max(., 1e-12)) so zero-width or zero-height boxes give finite costs;
    negative box sizes count as 0 in the GIoU term.

    Args:
        pred_logits: (B, Q, C) raw class logits, any floating dtype.
        pred_boxes: (B, Q, 4) predicted boxes, normalised cxcywh.
        gt_labels: B tensors (G_b,) of int64 class indices in [0, C).
        gt_boxes: B tensors (G_b, 4) of normalised cxcywh GT boxes.
        class_weight, bbox_weight, giou_weight: weights of the three terms.
        alpha, gamma: focal-cost parameters.

    Returns:
        B tensors (Q, G_b), views of one flat buffer on the predictions' device; float64 when a
        prediction is float64, else float32 (fp16 / bf16 predictions are computed in float32).
        The buffer is GT-major, so each view is the transpose of a contiguous (G_b, Q) block
        (use ``.reshape`` or ``.contiguous()`` rather than ``.view`` on it). No gradient flows
        through them.

    Raises:
        RuntimeError: on NaN or inf in the predictions or GT boxes (the message names the
            tensor), labels outside [0, C), or inconsistent shapes, dtypes or devices.
    """
    flat, sizes = matching_cost_flat(
        pred_logits,
        pred_boxes,
        gt_labels,
        gt_boxes,
        class_weight,
        bbox_weight,
        giou_weight,
        alpha,
        gamma,
    )
    return split_costs(flat, sizes, pred_logits.shape[1])


def _register_fake():
    @torch.library.register_fake("align_detr::matching_cost")
    def _matching_cost_fake(
        pred_logits, pred_boxes, gt_labels, gt_boxes, gt_offsets, cw, bw, gw, alpha, gamma
    ):
        # Data-independent part of the C++ validation, so traced graphs fail as eager would.
        torch._check(pred_logits.dim() == 3, lambda: "matching_cost: pred_logits must be (B, Q, C)")
        torch._check(
            pred_boxes.dim() == 3 and pred_boxes.shape[2] == 4,
            lambda: "matching_cost: pred_boxes must be (B, Q, 4)",
        )
        torch._check(
            gt_labels.dim() == 1
            and gt_boxes.dim() == 2
            and gt_boxes.shape[0] == gt_labels.shape[0],
            lambda: "matching_cost: gt_labels must be (sumG,) and gt_boxes (sumG, 4)",
        )
        dtype = (
            torch.float64
            if torch.float64 in (pred_logits.dtype, pred_boxes.dtype)
            else torch.float32
        )
        return pred_logits.new_empty((pred_logits.shape[1] * gt_labels.shape[0],), dtype=dtype)


if _ext._LOAD_ERROR is None:
    _register_fake()
