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
    defer_errors: bool = False,
) -> Tuple[torch.Tensor, List[int]]:
    """Like :func:`matching_cost`, but returns the op's flat output and the GT counts.

    Args:
        defer_errors: on a GPU, do not wait for the device to check the data (non-finite
            values, labels, offsets): ``flat`` then ends with one extra element holding the
            op's error bits, which :func:`check_error_word` turns into the exception once
            ``flat`` has reached the host (the one device-to-host copy the matcher makes anyway).
            On the CPU errors are raised at once and the extra element is 0.

    Returns:
        ``(flat, sizes)``: flat (Q * sum(G),) (plus the error word with ``defer_errors``) holds
        image b's cost block starting at Q * sum(sizes[:b]), GT-major: (G_b, Q) row-major,
        element g * Q + q being the cost of query q for GT g; sizes is the list of G_b. The
        matcher copies ``flat`` to the host in one transfer and solves it there with
        ``torch.ops.align_detr.assign_batch``.
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
        return pred_logits.new_zeros((1 if defer_errors else 0,), dtype=out_dtype), []
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
            defer_errors,
        )
    return flat, sizes


# Messages of the op's error bits (csrc/matching/matching_cost.h, MatchingCostError).
_ERROR_BITS = (
    (1, "pred_logits contains non-finite values (NaN or inf)"),
    (2, "pred_boxes contains non-finite values (NaN or inf)"),
    (4, "gt_boxes contains non-finite values (NaN or inf)"),
    (8, "gt_labels has values outside [0, C)"),
    (16, "gt_offsets must start at 0, be non-decreasing and end at sumG"),
)


def check_error_word(
    flat_host: torch.Tensor,
    pred_logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    gt_labels: Sequence[torch.Tensor],
    gt_boxes: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Checks the error word of a ``defer_errors`` output that is on the host; returns the costs.

    Raises:
        RuntimeError: when the word is not 0, with the message the CPU op gives for the same
            inputs (it is re-run on host copies to find the offending element; this path is
            only taken on bad data).
    """
    bits = int(flat_host[-1].item()) if flat_host.numel() else 0
    if bits != 0:
        # The detailed message (which element, which value) comes from the CPU op.
        matching_cost_flat(
            pred_logits.detach().cpu(),
            pred_boxes.detach().cpu(),
            [t.cpu() for t in gt_labels],
            [t.cpu() for t in gt_boxes],
        )
        reasons = "; ".join(msg for bit, msg in _ERROR_BITS if bits & bit)
        raise RuntimeError(f"matching_cost: {reasons}")
    return flat_host[:-1]


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
