"""Tests of align_detr.matching: the compiled matching cost, assign, and the matchers (CPU)."""

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from align_detr import _ext
from align_detr.matching import (
    HungarianMatcher,
    assign,
    assign_flat,
    assign_scipy,
    effective_k,
    matching_cost,
)

pytestmark = pytest.mark.skipif(_ext._LOAD_ERROR is not None, reason="align_detr._C not built")


# ---- independent float64 reference --------------------------------------------------------


def _xyxy(b):
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def reference_cost(logits, boxes, labels, gt_boxes, cw=2.0, bw=5.0, gw=2.0, alpha=0.25, gamma=2.0):
    """(Q, G) cost of one image in float64, written from the formula (no shared code)."""
    logits, boxes, gt_boxes = logits.double(), boxes.double(), gt_boxes.double()
    p = torch.sigmoid(logits)[:, labels]  # (Q, G)
    focal = alpha * (1 - p) ** gamma * (-torch.log(p + 1e-8)) - (1 - alpha) * p**gamma * (
        -torch.log(1 - p + 1e-8)
    )
    l1 = (boxes[:, None, :] - gt_boxes[None, :, :]).abs().sum(-1)
    a, g = _xyxy(boxes)[:, None, :], _xyxy(gt_boxes)[None, :, :]
    iw = (torch.minimum(a[..., 2], g[..., 2]) - torch.maximum(a[..., 0], g[..., 0])).clamp(min=0)
    ih = (torch.minimum(a[..., 3], g[..., 3]) - torch.maximum(a[..., 1], g[..., 1])).clamp(min=0)
    inter = iw * ih
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_g = (g[..., 2] - g[..., 0]) * (g[..., 3] - g[..., 1])
    union = area_a + area_g - inter
    ew = torch.maximum(a[..., 2], g[..., 2]) - torch.minimum(a[..., 0], g[..., 0])
    eh = torch.maximum(a[..., 3], g[..., 3]) - torch.minimum(a[..., 1], g[..., 1])
    encl = ew * eh
    giou = inter / union - (encl - union) / encl
    return cw * focal + bw * l1 - gw * giou


def random_batch(gts, num_queries=70, num_classes=11, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(len(gts), num_queries, num_classes, generator=g) * 3).to(dtype)
    ctr = torch.rand(len(gts), num_queries, 2, generator=g) * 0.8 + 0.1
    wh = torch.rand(len(gts), num_queries, 2, generator=g) * 0.3 + 0.01
    boxes = torch.cat([ctr, wh], -1).to(dtype)
    labels = [torch.randint(0, num_classes, (n,), generator=g) for n in gts]
    gt_boxes = [
        torch.cat(
            [torch.rand(n, 2, generator=g) * 0.8 + 0.1, torch.rand(n, 2, generator=g) * 0.3 + 0.01],
            1,
        )
        for n in gts
    ]
    return logits, boxes, labels, gt_boxes


def total_cost(cost, rows, cols):
    return float(cost[rows, cols].sum())


def check_structure(rows, cols, num_queries, num_gt, k):
    """Grouped by GT, each GT exactly k_eff distinct queries, no query twice, int64."""
    assert rows.dtype == torch.int64 and cols.dtype == torch.int64
    assert rows.device.type == "cpu" and cols.device.type == "cpu"
    k_eff = effective_k(k, num_queries, num_gt)
    if num_gt == 0 or num_queries == 0:
        assert rows.numel() == 0 and cols.numel() == 0
        return
    expected = min(num_queries, num_gt) if num_queries < num_gt else k_eff * num_gt
    assert rows.numel() == cols.numel() == expected
    assert torch.all(cols[1:] >= cols[:-1]), "not grouped by GT"
    assert len(set(rows.tolist())) == rows.numel(), "a query is used twice"
    if num_queries >= num_gt:
        assert torch.equal(torch.bincount(cols, minlength=num_gt), torch.full((num_gt,), k_eff))
    assert rows.min() >= 0 and rows.max() < num_queries


# ---- matching_cost --------------------------------------------------------------------------


@pytest.mark.parametrize("isa", [None, "avx2", "baseline"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cost_matches_float64_reference(dtype, isa, monkeypatch):
    if isa is not None:
        monkeypatch.setenv("ALIGN_DETR_CPU_ISA", isa)
    gts = [3, 0, 1, 30, 7]  # includes an empty image; Q = 150 spans three 64-query tiles
    logits, boxes, labels, gt_boxes = random_batch(gts, num_queries=150, dtype=dtype)
    costs = matching_cost(logits, boxes, labels, gt_boxes)
    assert len(costs) == len(gts)
    tol = 1e-5 if dtype == torch.float32 else 1e-9
    for b, c in enumerate(costs):
        assert c.shape == (150, gts[b]) and c.dtype == dtype
        ref = reference_cost(logits[b], boxes[b], labels[b], gt_boxes[b])
        torch.testing.assert_close(c.double(), ref, rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("gamma", [2.0, 1.5])
def test_cost_weights_and_focal_parameters(gamma):
    logits, boxes, labels, gt_boxes = random_batch([4, 9], seed=1)
    kw = dict(class_weight=1.3, bbox_weight=0.7, giou_weight=3.1, alpha=0.4, gamma=gamma)
    costs = matching_cost(logits, boxes, labels, gt_boxes, **kw)
    for b, c in enumerate(costs):
        ref = reference_cost(logits[b], boxes[b], labels[b], gt_boxes[b], 1.3, 0.7, 3.1, 0.4, gamma)
        torch.testing.assert_close(c.double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cost_half_inputs_accumulate_in_float32(dtype):
    logits, boxes, labels, gt_boxes = random_batch([5, 12], dtype=dtype, seed=2)
    costs = matching_cost(logits, boxes, labels, gt_boxes)
    for b, c in enumerate(costs):
        assert c.dtype == torch.float32
        ref = reference_cost(logits[b], boxes[b], labels[b], gt_boxes[b])  # same rounded inputs
        torch.testing.assert_close(c.double(), ref, rtol=1e-5, atol=1e-4)


def test_cost_extreme_logits_stay_exact():
    logits, boxes, labels, gt_boxes = random_batch([6], num_classes=4, seed=3)
    logits[0, :, :] = torch.tensor([-100.0, -30.0, 30.0, 100.0])
    labels = [torch.tensor([0, 1, 2, 3, 2, 1])]
    (c,) = matching_cost(logits, boxes, labels, gt_boxes)
    ref = reference_cost(logits[0], boxes[0], labels[0], gt_boxes[0])
    assert torch.isfinite(c).all()
    torch.testing.assert_close(c.double(), ref, rtol=1e-5, atol=1e-4)


def test_cost_degenerate_boxes_are_finite():
    q = torch.tensor(
        [
            [0.5, 0.5, 0.0, 0.0],  # a point
            [0.5, 0.5, 0.0, 0.2],  # zero width
            [0.2, 0.3, 0.4, 0.0],  # zero height
            [0.5, 0.5, 0.2, 0.2],  # ordinary
            [0.9, 0.9, 0.0, 0.0],  # another point
        ]
    )
    g = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.0, 0.2], [0.1, 0.1, 0.0, 0.0]])
    logits = torch.zeros(1, 5, 2)
    for dtype in (torch.float32, torch.float64):
        (c,) = matching_cost(logits.to(dtype), q[None].to(dtype), [torch.zeros(3).long()], [g])
        assert torch.isfinite(c).all(), c
    # Where the plain formula is defined (a non-zero union), the guard changes nothing.
    (c,) = matching_cost(logits, q[None], [torch.zeros(3).long()], [g])
    ref = reference_cost(logits[0], q, torch.zeros(3).long(), g)
    ok = torch.isfinite(ref)
    assert ok[3].all()
    torch.testing.assert_close(c.double()[ok], ref[ok], rtol=1e-5, atol=1e-5)
    # Negative sizes count as zero in the GIoU term and still give finite costs.
    bad = torch.tensor([[[0.5, 0.5, -0.1, 0.2]]])
    (c,) = matching_cost(torch.zeros(1, 1, 2), bad, [torch.zeros(1).long()], [g[:1]])
    assert torch.isfinite(c).all()


@pytest.mark.parametrize(
    "what, pattern",
    [
        ("logits_nan", "pred_logits"),
        ("logits_inf", "pred_logits"),
        ("boxes_nan", "pred_boxes"),
        ("boxes_inf", "pred_boxes"),
        ("gt_nan", "gt_boxes"),
    ],
)
def test_cost_non_finite_inputs_raise(what, pattern):
    logits, boxes, labels, gt_boxes = random_batch([2, 0, 3], seed=4)
    if what == "logits_nan":
        logits[1, 5, 3] = float("nan")  # in an image with no GT: still an error
    elif what == "logits_inf":
        logits[2, 69, 10] = float("inf")
    elif what == "boxes_nan":
        boxes[0, 0, 2] = float("nan")
    elif what == "boxes_inf":
        boxes[2, 3, 0] = -float("inf")
    else:
        gt_boxes[2][1, 1] = float("nan")
    with pytest.raises(RuntimeError, match=pattern):
        matching_cost(logits, boxes, labels, gt_boxes)


def test_cost_bad_inputs_raise():
    logits, boxes, labels, gt_boxes = random_batch([2, 3], seed=5)
    with pytest.raises(RuntimeError, match=r"gt_labels\[3\] = 11"):
        matching_cost(logits, boxes, [labels[0], torch.tensor([0, 11, 2])], gt_boxes)
    with pytest.raises(RuntimeError, match="gt_labels"):
        matching_cost(logits, boxes, [labels[0], torch.tensor([0, -1, 2])], gt_boxes)
    with pytest.raises(RuntimeError, match="gt_labels must be int64"):
        matching_cost(logits, boxes, [labels[0].float(), labels[1].float()], gt_boxes)
    with pytest.raises(RuntimeError, match=r"pred_boxes must be \(B, Q, 4\)"):
        matching_cost(logits, boxes[..., :3], labels, gt_boxes)
    with pytest.raises(RuntimeError, match="pred_boxes .* does not match"):
        matching_cost(logits, boxes[:, :10], labels, gt_boxes)
    with pytest.raises(ValueError, match=r"pred_logits must be \(B, Q, C\)"):
        matching_cost(logits[0], boxes, labels, gt_boxes)
    with pytest.raises(RuntimeError, match="pred_logits must be a floating"):
        matching_cost(logits.long(), boxes, labels, gt_boxes)
    with pytest.raises(ValueError, match="image 0 has 2 GT labels but GT boxes of shape"):
        matching_cost(logits, boxes, labels, [gt_boxes[1], gt_boxes[0]])
    with pytest.raises(ValueError, match="for a batch of 2 images"):
        matching_cost(logits, boxes, labels[:1], gt_boxes[:1])
    # The raw op's offsets are checked too.
    op = torch.ops.align_detr.matching_cost
    lab, gtb = torch.cat(labels), torch.cat(gt_boxes)
    args = (2.0, 5.0, 2.0, 0.25, 2.0)
    for offsets, pattern in [
        ([1, 2, 5], r"gt_offsets\[0\] must be 0"),
        ([0, 4, 3], "non-decreasing"),
        ([0, 2, 4], "gt_offsets\\[-1\\] = 4"),
        ([0, 5], r"gt_offsets must be \(B \+ 1,\)"),
    ]:
        with pytest.raises(RuntimeError, match=pattern):
            op(logits, boxes, lab, gtb, torch.tensor(offsets), *args)
    off = torch.tensor([0, 2, 5])
    with pytest.raises(RuntimeError, match="gt_boxes has 5 rows but gt_labels has 4 entries"):
        op(logits, boxes, lab[:4], gtb, off, *args)
    with pytest.raises(RuntimeError, match=r"pred_logits must be \(B, Q, C\)"):
        op(logits[0], boxes, lab, gtb, off, *args)
    with pytest.raises(RuntimeError, match="gt_offsets must be int64"):
        op(logits, boxes, lab, gtb, off.int(), *args)


def test_cost_raw_op_layout_and_empty_batch():
    logits, boxes, labels, gt_boxes = random_batch([2, 0, 5], seed=6)
    op = torch.ops.align_detr.matching_cost
    flat = op(
        logits,
        boxes,
        torch.cat(labels),
        torch.cat(gt_boxes),
        torch.tensor([0, 2, 2, 7]),
        2.0,
        5.0,
        2.0,
        0.25,
        2.0,
    )
    assert flat.shape == (70 * 7,)
    costs = matching_cost(logits, boxes, labels, gt_boxes)
    # GT-major blocks: element g * Q + q of image b's block is query q's cost for GT g.
    torch.testing.assert_close(flat[: 70 * 2].view(2, 70).t(), costs[0])
    torch.testing.assert_close(flat[70 * 2 :].view(5, 70).t(), costs[2])
    assert matching_cost(logits[:0], boxes[:0], [], []) == []
    # Non-contiguous predictions are accepted.
    t = matching_cost(logits.transpose(0, 1).contiguous().transpose(0, 1), boxes, labels, gt_boxes)
    torch.testing.assert_close(t[2], costs[2])


def test_cost_fake_kernel():
    logits, boxes, labels, gt_boxes = random_batch([2, 3], num_queries=9, num_classes=4, seed=7)
    args = (logits, boxes, torch.cat(labels), torch.cat(gt_boxes), torch.tensor([0, 2, 5]))
    torch.library.opcheck(
        torch.ops.align_detr.matching_cost,
        args + (2.0, 5.0, 2.0, 0.25, 2.0),
        test_utils=("test_schema", "test_faketensor"),
    )
    meta = [a.to("meta") for a in args]
    out = torch.ops.align_detr.matching_cost(*meta, 2.0, 5.0, 2.0, 0.25, 2.0)
    assert out.shape == (9 * 5,) and out.dtype == torch.float32 and out.device.type == "meta"


# ---- assign ---------------------------------------------------------------------------------


def brute_force_min(cost, k):
    """Minimum total over all ways to give each GT k distinct queries (tiny problems only)."""
    num_queries, num_gt = cost.shape
    best = np.inf
    if num_queries < num_gt:  # k = 1 with more GT than queries: min over injective q -> g maps
        for perm in itertools.permutations(range(num_gt), num_queries):
            best = min(best, sum(cost[q, g] for q, g in enumerate(perm)))
        return best
    for perm in itertools.permutations(range(num_queries), k * num_gt):
        best = min(best, sum(cost[q, i // k] for i, q in enumerate(perm)))
    return best


@pytest.mark.parametrize(
    "shape, k", [((5, 3), 1), ((6, 2), 2), ((7, 3), 2), ((3, 5), 1), ((4, 4), 1)]
)
def test_assign_optimal_vs_brute_force(shape, k):
    rng = np.random.default_rng(sum(shape) + k)
    for _ in range(3):
        cost = rng.normal(size=shape)
        rows, cols = assign(torch.from_numpy(cost), k)
        check_structure(rows, cols, *shape, k)
        assert total_cost(cost, rows, cols) == pytest.approx(
            brute_force_min(cost, effective_k(k, *shape))
        )


def scipy_optimum(cost, k):
    """Optimal total by SciPy on an independently replicated (GT-major np.repeat) matrix."""
    cost = np.asarray(cost, dtype=np.float64)
    num_queries, num_gt = cost.shape
    if num_queries < num_gt:
        r, c = linear_sum_assignment(cost)
        return cost[r, c].sum()
    k_eff = effective_k(k, num_queries, num_gt)
    r, c = linear_sum_assignment(np.repeat(cost, k_eff, axis=1))
    return cost[r, c // k_eff].sum()


@pytest.mark.parametrize("isa", [None, "avx2", "baseline"])
@pytest.mark.parametrize(
    "shape, k",
    [
        ((300, 37), 3),
        ((900, 50), 2),
        ((120, 80), 2),
        ((64, 64), 1),
        ((70, 130), 1),
        ((1, 1), 3),
        ((200, 1), 5),
        ((1, 40), 1),
        ((130, 65), 2),
    ],
)
def test_assign_optimal_vs_scipy(shape, k, isa, monkeypatch):
    if isa is not None:
        monkeypatch.setenv("ALIGN_DETR_CPU_ISA", isa)
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    for trial, dtype in enumerate([np.float32, np.float64, np.float32]):
        cost = rng.random(shape).astype(dtype)
        if trial == 2:  # few distinct values: many ties between paths
            cost = np.floor(cost * 4).astype(dtype)
        rows, cols = assign(torch.from_numpy(cost), k)
        check_structure(rows, cols, *shape, k)
        assert total_cost(cost.astype(np.float64), rows, cols) == pytest.approx(
            scipy_optimum(cost, k), rel=1e-9, abs=1e-9
        )


def test_assign_scipy_reference_agrees():
    rng = np.random.default_rng(3)
    for shape, k in [((50, 7), 3), ((9, 12), 1), ((30, 30), 2)]:
        cost = rng.normal(size=shape)
        r1, c1 = assign(torch.from_numpy(cost), k)
        r2, c2 = assign_scipy(cost, k)
        assert torch.equal(c1, torch.from_numpy(c2))  # same grouping; no ties in random costs
        assert torch.equal(r1, torch.from_numpy(r2))


def test_assign_inf_forbids_pairs_and_nan_raises():
    cost = torch.rand(6, 2, dtype=torch.float64)
    cost[0, :] = cost[3, :] = float("inf")
    rows, cols = assign(cost, k=2)
    check_structure(rows, cols, 6, 2, 2)
    assert not ({0, 3} & set(rows.tolist()))
    cost[1, 1] = float("nan")
    with pytest.raises(ValueError):
        assign(cost)


def test_assign_flat_batch_equals_per_image():
    rng = np.random.default_rng(4)
    sizes, num_queries = [3, 0, 1, 25, 12], 40
    blocks = [rng.random((num_queries, g)).astype(np.float32) for g in sizes]
    flat = torch.cat([torch.from_numpy(b.T.copy()).reshape(-1) for b in blocks])
    out = assign_flat(flat, sizes, num_queries, 2)
    assert len(out) == len(sizes)
    for (rows, cols), block in zip(out, blocks):
        r2, c2 = assign(torch.from_numpy(block), 2)
        assert torch.equal(rows, r2) and torch.equal(cols, c2)


def test_assign_batch_op_validates():
    op = torch.ops.align_detr.assign_batch
    flat, off = torch.rand(12), torch.tensor([0, 2, 3])
    with pytest.raises(RuntimeError, match="float32 or float64"):
        op(flat.to(torch.float16), off, 4, 1)
    with pytest.raises(RuntimeError, match="num_queries \\* offsets\\[-1\\] = 16"):
        op(flat, torch.tensor([0, 2, 4]), 4, 1)
    with pytest.raises(RuntimeError, match="non-decreasing"):
        op(flat, torch.tensor([0, 3, 2]), 6, 1)
    with pytest.raises(RuntimeError, match="offsets\\[0\\] must be 0"):
        op(flat, torch.tensor([1, 3]), 6, 1)
    with pytest.raises(RuntimeError, match="k must be >= 1"):
        op(flat, off, 4, 0)
    bad = flat.clone()
    bad[5] = float("nan")
    with pytest.raises(RuntimeError, match="NaN or inf"):
        op(bad, off, 4, 1)


def test_assign_k_eff_is_capped():
    rng = np.random.default_rng(0)
    assert effective_k(2, 900, 225) == 2 and effective_k(2, 900, 451) == 1
    assert effective_k(3, 10, 4) == 2 and effective_k(5, 10, 0) == 5
    for num_queries, num_gt, k in [(10, 4, 3), (10, 7, 2), (10, 10, 4), (9, 2, 10), (10, 3, 1)]:
        cost = torch.from_numpy(rng.random((num_queries, num_gt)))
        rows, cols = assign(cost, k)
        check_structure(rows, cols, num_queries, num_gt, k)
    rows, cols = assign(torch.rand(10, 4), 3)
    assert rows.numel() == 8  # k_eff = 2


def test_assign_more_gt_than_queries():
    rng = np.random.default_rng(1)
    cost = rng.random((4, 9))
    rows, cols = assign(torch.from_numpy(cost), k=3)
    assert rows.numel() == 4 and len(set(cols.tolist())) == 4
    assert torch.all(cols[1:] >= cols[:-1])
    assert total_cost(cost, rows, cols) == pytest.approx(brute_force_min(cost, 1))


def test_assign_empty_and_invalid():
    for shape in [(10, 0), (0, 3), (0, 0)]:
        rows, cols = assign(torch.rand(shape), k=2)
        assert rows.dtype == cols.dtype == torch.int64 and rows.numel() == cols.numel() == 0
    with pytest.raises(ValueError, match=r"\(Q, G\)"):
        assign(torch.rand(5))
    with pytest.raises(ValueError, match="positive integer"):
        assign(torch.rand(5, 2), k=0)


def test_assign_groups_by_gt_with_increasing_queries():
    rows, cols = assign(torch.rand(50, 6), k=4)
    for g in range(6):
        r = rows[cols == g]
        assert r.numel() == 4 and torch.all(r[1:] > r[:-1])


# ---- matchers -------------------------------------------------------------------------------


def make_targets(labels, gt_boxes):
    return [{"labels": lab, "boxes": box} for lab, box in zip(labels, gt_boxes)]


def test_matcher_caps_k_per_image_only():
    # Q = 50: the crowded image (40 GT) gets k_eff = 1; the images after it must still get k.
    gts = [40, 0, 1, 12, 3]
    logits, boxes, labels, gt_boxes = random_batch(gts, num_queries=50, seed=8)
    out = HungarianMatcher()(
        {"pred_logits": logits, "pred_boxes": boxes}, make_targets(labels, gt_boxes), k=3
    )
    assert len(out) == len(gts)
    expected_k = [1, None, 3, 3, 3]
    for (rows, cols), g, ek in zip(out, gts, expected_k):
        check_structure(rows, cols, 50, g, 3)
        if ek is not None:
            assert effective_k(3, 50, g) == ek and rows.numel() == ek * g


@pytest.mark.parametrize("k", [1, 2])
def test_matcher_is_optimal_per_image(k):
    gts = [0, 1, 9, 25]
    logits, boxes, labels, gt_boxes = random_batch(gts, num_queries=60, seed=9)
    outputs = {"pred_logits": logits, "pred_boxes": boxes}
    out = HungarianMatcher()(outputs, make_targets(labels, gt_boxes), k=k)
    for b, (rows, cols) in enumerate(out):
        check_structure(rows, cols, 60, gts[b], k)
        if gts[b] == 0:
            continue
        ref = reference_cost(logits[b], boxes[b], labels[b], gt_boxes[b]).numpy()
        k_eff = effective_k(k, 60, gts[b])
        r2, c2 = linear_sum_assignment(np.tile(ref, (1, k_eff)))
        assert total_cost(ref, rows, cols) == pytest.approx(ref[r2, c2 % gts[b]].sum(), rel=1e-6)


def test_matcher_float32_agrees_with_float64():
    gts = [5, 17, 2]
    logits, boxes, labels, gt_boxes = random_batch(gts, num_queries=80, seed=10)
    targets = make_targets(labels, gt_boxes)
    matcher = HungarianMatcher()
    out32 = matcher({"pred_logits": logits, "pred_boxes": boxes}, targets, k=2)
    out64 = matcher({"pred_logits": logits.double(), "pred_boxes": boxes.double()}, targets, k=2)
    for b, ((r32, c32), (r64, c64)) in enumerate(zip(out32, out64)):
        ref = reference_cost(logits[b], boxes[b], labels[b], gt_boxes[b]).numpy()
        assert total_cost(ref, r32, c32) == pytest.approx(total_cost(ref, r64, c64), rel=1e-6)
        assert torch.equal(c32, c64)  # grouping is the same; random costs have no ties


def test_matcher_no_grad_and_k_per_call():
    logits, boxes, labels, gt_boxes = random_batch([4, 2], num_queries=20, seed=11)
    logits.requires_grad_(True)
    boxes.requires_grad_(True)
    matcher = HungarianMatcher(cost_class=1.0)
    targets = make_targets(labels, gt_boxes)
    out = matcher({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert all(not r.requires_grad for r, _ in out)
    assert [r.numel() for r, _ in out] == [4, 2]
    out = matcher({"pred_logits": logits, "pred_boxes": boxes}, targets, k=3)
    assert [r.numel() for r, _ in out] == [12, 6]
    with pytest.raises(ValueError, match="targets for a batch"):
        matcher({"pred_logits": logits, "pred_boxes": boxes}, targets[:1])
    # k is an argument of each call (the model passes one per output), checked by name.
    with pytest.raises(ValueError, match="k must be a positive integer"):
        matcher({"pred_logits": logits, "pred_boxes": boxes}, targets, k=0)
    assert "cost_class=1.0" in repr(matcher)


def test_cost_deferred_error_word():
    """defer_errors appends the error word: 0 on the CPU (which raises at once), and the
    matcher's host-side check turns a set word into the CPU op's detailed message."""
    from align_detr.matching.cost import check_error_word, matching_cost_flat

    logits, boxes, labels, gt_boxes = random_batch([2, 0, 3], num_queries=9, seed=12)
    flat, sizes = matching_cost_flat(logits, boxes, labels, gt_boxes, defer_errors=True)
    plain, _ = matching_cost_flat(logits, boxes, labels, gt_boxes)
    assert flat.shape == (9 * 5 + 1,) and flat[-1] == 0 and sizes == [2, 0, 3]
    assert torch.equal(check_error_word(flat, logits, boxes, labels, gt_boxes), plain)
    empty, _ = matching_cost_flat(logits[:0], boxes[:0], [], [], defer_errors=True)
    assert empty.tolist() == [0.0]
    meta = [t.to("meta") for t in (logits, boxes, torch.cat(labels), torch.cat(gt_boxes))]
    out = torch.ops.align_detr.matching_cost(
        *meta, torch.tensor([0, 2, 2, 5]).to("meta"), 2.0, 5.0, 2.0, 0.25, 2.0, True
    )
    assert out.shape == (9 * 5 + 1,)
    # A word set on the device (here: by hand) raises with the CPU op's detailed message.
    bad_logits = logits.clone()
    bad_logits[2, 4, 1] = float("nan")
    word = flat.clone()
    word[-1] = 1.0
    with pytest.raises(RuntimeError, match=r"pred_logits\[2, 4, 1\]"):
        check_error_word(word, bad_logits, boxes, labels, gt_boxes)
    with pytest.raises(RuntimeError, match="pred_logits contains non-finite"):
        check_error_word(word, logits, boxes, labels, gt_boxes)  # word only: generic message


def test_matcher_raises_on_non_finite_predictions():
    logits, boxes, labels, gt_boxes = random_batch([2, 3], num_queries=9, seed=13)
    logits[1, 2, 3] = float("inf")
    with pytest.raises(RuntimeError, match="pred_logits"):
        HungarianMatcher()(
            {"pred_logits": logits, "pred_boxes": boxes}, make_targets(labels, gt_boxes), k=2
        )
    with pytest.raises(TypeError):
        HungarianMatcher(k=2)  # k is a per-call argument now
