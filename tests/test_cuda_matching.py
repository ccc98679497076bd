"""CUDA matching cost against the CPU op (itself checked against float64 formulas in
test_matching.py), bad input on the device, and the matcher's single device synchronisation.

Skipped unless a GPU is visible and align_detr._C was built with the CUDA kernels.
"""

import warnings

import pytest
import torch
from test_matching import make_targets, random_batch, reference_cost

from align_detr import _ext
from align_detr.matching import HungarianMatcher, matching_cost

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and _ext.has_cuda_kernels()),
    reason="needs a CUDA GPU and align_detr._C built with the CUDA kernels (make gpu-check)",
)


def cuda_list(ts):
    return [t.cuda() for t in ts]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cost_matches_cpu(dtype):
    gts = [3, 0, 1, 30, 7]  # includes an empty image
    logits, boxes, labels, gt_boxes = random_batch(gts, num_queries=150, dtype=dtype)
    cpu = matching_cost(logits, boxes, labels, gt_boxes)
    cuda = matching_cost(logits.cuda(), boxes.cuda(), cuda_list(labels), cuda_list(gt_boxes))
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    for b, (a, c) in enumerate(zip(cuda, cpu)):
        assert a.device.type == "cuda" and a.dtype == c.dtype and a.shape == (150, gts[b])
        torch.testing.assert_close(a.cpu(), c, rtol=tol, atol=tol * 10)
        ref = reference_cost(logits[b], boxes[b], labels[b], gt_boxes[b])
        torch.testing.assert_close(a.cpu().double(), ref, rtol=1e-4, atol=1e-4)


def test_cost_empty_batches_and_extreme_logits():
    logits, boxes, labels, gt_boxes = random_batch([0, 0], num_queries=20)
    assert [c.shape for c in matching_cost(logits.cuda(), boxes.cuda(), labels, gt_boxes)] == [
        (20, 0),
        (20, 0),
    ]
    logits, boxes, labels, gt_boxes = random_batch([2, 3], num_queries=0)
    assert [c.shape for c in matching_cost(logits.cuda(), boxes.cuda(), labels, gt_boxes)] == [
        (0, 2),
        (0, 3),
    ]
    logits, boxes, labels, gt_boxes = random_batch([6], num_classes=4, seed=3)
    logits[0, :, :] = torch.tensor([-100.0, -30.0, 30.0, 100.0])
    labels = [torch.tensor([0, 1, 2, 3, 2, 1])]
    (c,) = matching_cost(logits.cuda(), boxes.cuda(), cuda_list(labels), cuda_list(gt_boxes))
    ref = reference_cost(logits[0], boxes[0], labels[0], gt_boxes[0])
    assert torch.isfinite(c).all()
    torch.testing.assert_close(c.cpu().double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "what, pattern",
    [
        ("logits_nan", "pred_logits"),
        ("boxes_inf", "pred_boxes"),
        ("gt_nan", "gt_boxes"),
        ("label", "gt_labels"),
    ],
)
def test_bad_data_raises_from_op_and_matcher(what, pattern):
    logits, boxes, labels, gt_boxes = random_batch([2, 0, 3], seed=4)
    if what == "logits_nan":
        logits[1, 5, 3] = float("nan")
    elif what == "boxes_inf":
        boxes[2, 3, 0] = -float("inf")
    elif what == "gt_nan":
        gt_boxes[2][1, 1] = float("nan")
    else:
        labels[2] = torch.tensor([0, 11, 2])
    args = (logits.cuda(), boxes.cuda(), cuda_list(labels), cuda_list(gt_boxes))
    with pytest.raises(RuntimeError, match=pattern):
        matching_cost(*args)
    with pytest.raises(RuntimeError, match=pattern):
        HungarianMatcher()(
            {"pred_logits": args[0], "pred_boxes": args[1]}, make_targets(args[2], args[3]), k=2
        )


def test_bad_offsets_raise_on_the_device():
    logits, boxes, labels, gt_boxes = random_batch([2, 3], seed=5)
    op = torch.ops.align_detr.matching_cost
    lab, gtb = torch.cat(labels).cuda(), torch.cat(gt_boxes).cuda()
    for offsets in ([1, 2, 5], [0, 4, 3], [0, 2, 4]):
        with pytest.raises(RuntimeError, match="gt_offsets"):
            op(
                logits.cuda(),
                boxes.cuda(),
                lab,
                gtb,
                torch.tensor(offsets).cuda(),
                2.0,
                5.0,
                2.0,
                0.25,
                2.0,
            )
        # deferred: no exception from the op; the error word is the last element
        flat = op(
            logits.cuda(),
            boxes.cuda(),
            lab,
            gtb,
            torch.tensor(offsets).cuda(),
            2.0,
            5.0,
            2.0,
            0.25,
            2.0,
            True,
        )
        assert int(flat[-1].item()) == 16


@pytest.mark.parametrize("k", [1, 2])
def test_matcher_same_assignment_as_cpu_with_one_sync(k):
    gts = [0, 1, 9, 25]
    logits, boxes, labels, gt_boxes = random_batch(gts, num_queries=60, seed=9, dtype=torch.float64)
    matcher = HungarianMatcher()
    cpu = matcher({"pred_logits": logits, "pred_boxes": boxes}, make_targets(labels, gt_boxes), k=k)
    outputs = {"pred_logits": logits.cuda(), "pred_boxes": boxes.cuda()}
    targets = make_targets(cuda_list(labels), cuda_list(gt_boxes))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = matcher(outputs, targets, k=k)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
    for (r1, c1), (r2, c2) in zip(out, cpu):
        assert torch.equal(r1, r2) and torch.equal(c1, c2)
