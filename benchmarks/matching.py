"""Matching of one Align-DETR training step: our matcher vs the usual PyTorch + SciPy way.

One step matches 7 outputs (the encoder proposals and 6 decoder layers) of a batch of B = 4
images with Q = 900 queries and C = 80 classes: k = 2 queries per GT for six of them
(many-to-one) and k = 1 (Hungarian) for the final layer. Both ways run in the same process on
the same inputs:

* ours: ``HungarianMatcher`` with k per call (per output: one compiled cost call, each
  image against its own GT; one host copy; one compiled assignment call for all images);
* ours + SciPy: our cost, then SciPy per image (what the solver alone buys);
* the usual way (Deformable-DETR / DINO / detrex matchers): focal cost over all [B*Q, C]
  probabilities gathered at the concatenated GT labels, ``torch.cdist`` L1 and GIoU over the
  [B*Q, sum(G)] matrix, copied out and split into its diagonal blocks, then SciPy per image with
  the GT columns replicated k times.

Both must reach the same total cost. Prints median times and ratios, for the whole matching and
for the cost construction alone. ``python benchmarks/matching.py [--quick] [--g 5 20 50 100]``.

Then the same for the one-to-many branch of one H-Deformable-DETR step (:func:`run_hybrid`): 6
decoder layers of Q = 1500 one-to-many queries, every GT wanted k = 6 times. Ours matches k = 6
queries to each GT (one compiled cost on the G columns; the solver replicates them without
copies); the usual way (H-DETR's ``train_hybrid``) repeats the targets 6 times and runs the
one-to-one matcher above on the [B*Q, 6*sum(G)] cost.
"""

import argparse
import statistics
import time
from typing import Dict, List, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from align_detr.matching import HungarianMatcher, assign_scipy, effective_k
from align_detr.matching.cost import matching_cost_flat, split_costs

B, Q, C = 4, 900, 80
KS = (2, 2, 2, 2, 2, 2, 1)  # encoder + 5 auxiliary decoder layers (k = 2), final layer (k = 1)
WEIGHTS = dict(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, alpha=0.25, gamma=2.0)


# ---- the usual way ------------------------------------------------------------------------


def _box_cxcywh_to_xyxy(x):
    cx, cy, w, h = x.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def _generalized_box_iou(boxes1, boxes2):
    # DETR's util/box_ops.py, asserts included (they are part of what the usual way costs).
    assert (boxes1[:, 2:] >= boxes1[:, :2]).all()
    assert (boxes2[:, 2:] >= boxes2[:, :2]).all()
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    lt = torch.max(boxes1[:, None, :2], boxes2[:, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, :, 0] * wh[:, :, 1]
    union = area1[:, None] + area2 - inter
    iou = inter / union
    lt = torch.min(boxes1[:, None, :2], boxes2[:, :2])
    rb = torch.max(boxes1[:, None, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    area = wh[:, :, 0] * wh[:, :, 1]
    return iou - (area - union) / area


def reference_cost(outputs, targets):
    """The usual [B*Q, sum(G)] cost, copied out and split per image (list of (Q, G_b) arrays)."""
    bs, nq = outputs["pred_logits"].shape[:2]
    out_prob = outputs["pred_logits"].flatten(0, 1).sigmoid()
    out_bbox = outputs["pred_boxes"].flatten(0, 1)
    tgt_ids = torch.cat([v["labels"] for v in targets])
    tgt_bbox = torch.cat([v["boxes"] for v in targets])
    alpha, gamma = WEIGHTS["alpha"], WEIGHTS["gamma"]
    neg_cost_class = (1 - alpha) * (out_prob**gamma) * (-(1 - out_prob + 1e-8).log())
    pos_cost_class = alpha * ((1 - out_prob) ** gamma) * (-(out_prob + 1e-8).log())
    cost_class = pos_cost_class[:, tgt_ids] - neg_cost_class[:, tgt_ids]
    cost_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
    cost_giou = -_generalized_box_iou(_box_cxcywh_to_xyxy(out_bbox), _box_cxcywh_to_xyxy(tgt_bbox))
    cost = (
        WEIGHTS["cost_bbox"] * cost_bbox
        + WEIGHTS["cost_class"] * cost_class
        + WEIGHTS["cost_giou"] * cost_giou
    )
    cost = cost.view(bs, nq, -1).cpu()
    sizes = [len(v["boxes"]) for v in targets]
    return [c[i].numpy() for i, c in enumerate(cost.split(sizes, -1))]


def reference_match(outputs, targets, k):
    indices = []
    for c in reference_cost(outputs, targets):
        nq, ng = c.shape
        if ng == 0:
            indices.append((np.zeros(0, np.int64), np.zeros(0, np.int64)))
            continue
        k_eff = effective_k(k, nq, ng)
        rows, cols = linear_sum_assignment(np.tile(c, (1, k_eff)))
        cols = cols % ng
        order = np.argsort(cols, kind="stable")
        indices.append((torch.as_tensor(rows[order]), torch.as_tensor(cols[order])))
    return indices


# ---- harness ------------------------------------------------------------------------------


def make_step(num_gt: int, seed: int = 0):
    """Seven outputs (shared targets) of one step, predictions loosely around the GT boxes."""
    g = torch.Generator().manual_seed(seed)
    targets = []
    for _ in range(B):
        ctr = torch.rand(num_gt, 2, generator=g) * 0.8 + 0.1
        wh = torch.rand(num_gt, 2, generator=g) * 0.25 + 0.02
        targets.append(
            {
                "labels": torch.randint(0, C, (num_gt,), generator=g),
                "boxes": torch.cat([ctr, wh], 1),
            }
        )
    outputs = []
    for _ in KS:
        ctr = torch.rand(B, Q, 2, generator=g) * 0.9 + 0.05
        wh = torch.rand(B, Q, 2, generator=g) * 0.3 + 0.01
        outputs.append(
            {
                "pred_logits": torch.randn(B, Q, C, generator=g) * 2 - 3,
                "pred_boxes": torch.cat([ctr, wh], 2),
            }
        )
    return outputs, targets


def _median_times(fns, reps: int, warmup: int) -> List[float]:
    """Median wall time of each function; interleaved, so a busy machine slows all alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def _total_cost(outputs, targets, indices) -> float:
    """Total float64 cost of an assignment, scored on one shared float64 cost matrix."""
    total = 0.0
    targets64 = [{"labels": t["labels"], "boxes": t["boxes"].double()} for t in targets]
    for out, idx in zip(outputs, indices):
        out64 = {k: v.double() for k, v in out.items()}
        costs = reference_cost(out64, targets64)
        for c, (rows, cols) in zip(costs, idx):
            total += float(c[rows.numpy(), cols.numpy()].sum())
    return total


def _cost_only(outputs, targets, reference_targets):
    """(ours, reference): the cost construction alone, ours on the GT as given, the reference
    formulation on ``reference_targets`` (the same GT, or H-DETR's repeated copies)."""

    def ours():
        labels = [t["labels"] for t in targets]
        boxes = [t["boxes"] for t in targets]
        for o in outputs:
            flat, _ = matching_cost_flat(o["pred_logits"], o["pred_boxes"], labels, boxes)
            flat.cpu().numpy()

    def reference():
        for o in outputs:
            reference_cost(o, reference_targets)

    return ours, reference


def _check_same_total(what: str, total_ours: float, total_ref: float) -> None:
    """Both ways must reach the same optimal total cost, or the timings compare nothing."""
    if abs(total_ours - total_ref) > 1e-4 * max(1.0, abs(total_ref)):
        raise AssertionError(f"{what}: total cost differs, ours {total_ours} vs {total_ref}")


def run(quick: bool = False, num_gts: Sequence[int] = (5, 20, 50, 100)) -> List[Dict]:
    """Times one step's matching both ways for each GT count; returns one row per count.

    Rows carry ``name``, ``ours_s``, ``reference_s``, ``ratio`` (whole matching),
    ``ours_scipy_s`` (our cost with SciPy's solver), ``cost_ours_s``, ``cost_reference_s``,
    ``cost_ratio`` (cost construction alone), plus the two total costs.
    """
    reps, warmup = (3, 1) if quick else (15, 3)
    matcher = HungarianMatcher(**WEIGHTS)
    rows = []
    for num_gt in num_gts:
        outputs, targets = make_step(num_gt)

        def ours():
            return [matcher(o, targets, k=k) for o, k in zip(outputs, KS)]

        def reference():
            return [reference_match(o, targets, k) for o, k in zip(outputs, KS)]

        def ours_scipy():
            labels = [t["labels"] for t in targets]
            boxes = [t["boxes"] for t in targets]
            for o, k in zip(outputs, KS):
                flat, sizes = matching_cost_flat(o["pred_logits"], o["pred_boxes"], labels, boxes)
                for c in split_costs(flat.cpu(), sizes, Q):
                    assign_scipy(c.numpy(), k)

        ours_cost, reference_cost_only = _cost_only(outputs, targets, targets)

        with torch.no_grad():
            total_ours = _total_cost(outputs, targets, ours())
            total_ref = _total_cost(outputs, targets, reference())
            _check_same_total(f"G={num_gt}", total_ours, total_ref)
            t_ours, t_ours_scipy, t_ref, c_ours, c_ref = _median_times(
                [ours, ours_scipy, reference, ours_cost, reference_cost_only], reps, warmup
            )
        rows.append(
            {
                "name": f"matching B={B} Q={Q} C={C} G={num_gt} x7 outputs",
                "ours_s": t_ours,
                "reference_s": t_ref,
                "ratio": t_ref / t_ours,
                "ours_scipy_s": t_ours_scipy,
                "cost_ours_s": c_ours,
                "cost_reference_s": c_ref,
                "cost_ratio": c_ref / c_ours,
                "total_cost_ours": total_ours,
                "total_cost_reference": total_ref,
            }
        )
    return rows


#: H-DETR's one-to-many branch: queries, GT copies, decoder layers.
HYBRID_Q, HYBRID_K, HYBRID_LAYERS = 1500, 6, 6


def run_hybrid(quick: bool = False, num_gts: Sequence[int] = (5, 20, 50, 100)) -> List[Dict]:
    """Times the one-to-many matching of one H-DETR step both ways; rows as :func:`run`."""
    reps, warmup = (3, 1) if quick else (10, 2)
    matcher = HungarianMatcher(**WEIGHTS)
    rows = []
    for num_gt in num_gts:
        _, targets = make_step(num_gt)
        g = torch.Generator().manual_seed(num_gt)
        outputs = [
            {
                "pred_logits": torch.randn(B, HYBRID_Q, C, generator=g) * 2 - 3,
                "pred_boxes": torch.cat(
                    [
                        torch.rand(B, HYBRID_Q, 2, generator=g) * 0.9 + 0.05,
                        torch.rand(B, HYBRID_Q, 2, generator=g) * 0.3 + 0.01,
                    ],
                    2,
                ),
            }
            for _ in range(HYBRID_LAYERS)
        ]
        repeated = [
            {"labels": t["labels"].repeat(HYBRID_K), "boxes": t["boxes"].repeat(HYBRID_K, 1)}
            for t in targets
        ]

        def ours():
            return [matcher(o, targets, k=HYBRID_K) for o in outputs]

        def reference():
            return [reference_match(o, repeated, 1) for o in outputs]

        ours_cost, reference_cost_only = _cost_only(outputs, targets, repeated)

        with torch.no_grad():
            total_ours = _total_cost(outputs, targets, ours())
            # their column j * G + g is copy j of GT g
            ref = [[(q, c % num_gt) for q, c in idx] for idx in reference()]
            total_ref = _total_cost(outputs, targets, ref)
            _check_same_total(f"hybrid G={num_gt}", total_ours, total_ref)
            t_ours, t_ref, c_ours, c_ref = _median_times(
                [ours, reference, ours_cost, reference_cost_only], reps, warmup
            )
        rows.append(
            {
                "name": f"H-DETR one-to-many B={B} Q={HYBRID_Q} k={HYBRID_K} G={num_gt} x6 layers",
                "ours_s": t_ours,
                "reference_s": t_ref,
                "ratio": t_ref / t_ours,
                "cost_ours_s": c_ours,
                "cost_reference_s": c_ref,
                "cost_ratio": c_ref / c_ours,
                "total_cost_ours": total_ours,
                "total_cost_reference": total_ref,
            }
        )
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions, G = 20 only")
    parser.add_argument("--g", type=int, nargs="+", default=None, help="GT boxes per image")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    num_gts = args.g or ((20,) if args.quick else (5, 20, 50, 100))
    rows = run(args.quick, num_gts)
    print(f"matching of one step (7 outputs, k = {list(KS)}), {args.threads} threads, medians [ms]")
    print(
        f"{'G/img':>5} {'ours':>8} {'ours+scipy':>10} {'usual':>8} {'ratio':>7} | "
        f"{'cost ours':>9} {'cost usual':>10} {'ratio':>7} | total cost (both)"
    )
    for r, g in zip(rows, num_gts):
        print(
            f"{g:>5} {r['ours_s'] * 1e3:>8.2f} {r['ours_scipy_s'] * 1e3:>10.2f}"
            f" {r['reference_s'] * 1e3:>8.2f} {r['ratio']:>6.1f}x"
            f" | {r['cost_ours_s'] * 1e3:>9.2f} {r['cost_reference_s'] * 1e3:>10.2f}"
            f" {r['cost_ratio']:>6.1f}x | {r['total_cost_ours']:.3f}"
        )
    hybrid = run_hybrid(args.quick, num_gts)
    print(
        f"H-DETR one-to-many matching of one step ({HYBRID_LAYERS} layers, Q = {HYBRID_Q}, "
        f"every GT {HYBRID_K} times), medians [ms]"
    )
    print(
        f"{'G/img':>5} {'ours':>8} {'usual':>8} {'ratio':>7} | "
        f"{'cost ours':>9} {'cost usual':>10} {'ratio':>7} | total cost (both)"
    )
    for r, g in zip(hybrid, num_gts):
        print(
            f"{g:>5} {r['ours_s'] * 1e3:>8.2f} {r['reference_s'] * 1e3:>8.2f} {r['ratio']:>6.1f}x"
            f" | {r['cost_ours_s'] * 1e3:>9.2f} {r['cost_reference_s'] * 1e3:>10.2f}"
            f" {r['cost_ratio']:>6.1f}x | {r['total_cost_ours']:.3f}"
        )
    return rows + hybrid


if __name__ == "__main__":
    main()
