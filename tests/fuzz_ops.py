"""Fuzzes the compiled ops with random shapes and values; exits 0 when every case either computed
or raised a Python exception of the TORCH_CHECK family. A crash (segfault, abort) kills the
process instead, which is what tests/test_fuzz_ops.py looks for; on a GPU, ``make gpu-check``
runs it under compute-sanitizer (out-of-bounds accesses, races, bad warp synchronisation).

    python tests/fuzz_ops.py [--seed S] [--cases N] [--device cuda] [--ops ms_deform_attn ...]

On CUDA the level table is put on the CPU or on the GPU at random, and some backward passes
run under torch.use_deterministic_algorithms(True) (the sort-based grad_value).
"""

import argparse
import collections
import random

import torch

from align_detr.layers import ms_deform_attn
from align_detr.matching import HungarianMatcher, assign, matching_cost

# What TORCH_CHECK and its variants raise (RuntimeError, ValueError, IndexError, TypeError).
ALLOWED = (RuntimeError, ValueError, IndexError, TypeError)
SPECIALS = [float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 1e-30, 0.0]


def corrupt(rng: random.Random, t: torch.Tensor, p: float = 0.3) -> torch.Tensor:
    """Sprinkles NaN / inf / huge values into a float tensor, sometimes."""
    if not t.is_floating_point() or t.numel() == 0 or rng.random() > p:
        return t
    t = t.clone()
    flat = t.view(-1)
    for _ in range(rng.randint(1, 4)):
        flat[rng.randrange(flat.numel())] = rng.choice(SPECIALS)
    return t


def msda_case(rng: random.Random, g: torch.Generator, device: str = "cpu"):
    n, m, d = rng.randint(0, 3), rng.randint(1, 3), rng.randint(1, 8)
    levels, points, lq = rng.randint(1, 3), rng.randint(1, 3), rng.randint(0, 5)
    shapes = torch.tensor([[rng.randint(1, 6), rng.randint(1, 6)] for _ in range(levels)])
    start = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    s = int(shapes.prod(1).sum())
    dtype = rng.choice([torch.float32, torch.float64, torch.float16, torch.bfloat16])
    value = torch.randn(n, s, m, d, generator=g).to(dtype)
    loc = torch.rand(n, lq, m, levels, points, 2, generator=g).to(dtype) * 1.4 - 0.2
    if rng.random() < 0.2:
        loc = loc * rng.choice([1e6, 1e30, -1e30])  # huge coordinates
    attn = torch.rand(n, lq, m, levels, points, generator=g).to(dtype)
    value, loc, attn = corrupt(rng, value), corrupt(rng, loc), corrupt(rng, attn)
    # Structural corruption: wrong shapes, dims, index values, dtypes, layouts.
    kind = rng.randrange(12)
    if kind == 0:
        shapes = shapes + rng.choice([-7, -1, 1, 100])  # disagree with S, maybe negative
    elif kind == 1:
        start = start + rng.choice([-5, 1, s, 2**40])
    elif kind == 2:
        value = value[..., None]  # 5-D
    elif kind == 3:
        loc = loc[..., :1]  # last dim 1, not 2
    elif kind == 4:
        attn = attn[:, :, :, :, :-1] if points > 1 else attn[:, :1]
    elif kind == 5:
        shapes = shapes.to(rng.choice([torch.int32, torch.float32]))
    elif kind == 6:
        value = value.transpose(1, 2)  # non-contiguous and mismatched
    elif kind == 7:
        shapes = shapes[:-1] if levels > 1 else shapes.new_zeros(0, 2)
    elif kind == 8:
        value = (value * 10).to(torch.int64)
    elif kind == 9:
        loc = loc.to(torch.float64 if dtype != torch.float64 else torch.float32)
    # 10, 11: well-formed (values possibly non-finite)
    if device != "cpu":
        value, loc, attn = value.to(device), loc.to(device), attn.to(device)
        if rng.random() < 0.3:  # the level table on the GPU too (it is copied to the host)
            shapes, start = shapes.to(device), start.to(device)
    out = ms_deform_attn(value, shapes, start, loc, attn)
    assert out.shape == (n, lq, m * d), out.shape
    backward = 0.3 if device == "cpu" else 0.6
    if rng.random() < backward and out.numel() and value.is_floating_point():
        leaves = [t.detach().requires_grad_(rng.random() < 0.7) for t in (value, loc, attn)]
        leaves[0].requires_grad_(True)
        deterministic = device != "cpu" and rng.random() < 0.4
        torch.use_deterministic_algorithms(deterministic)
        try:
            ms_deform_attn(leaves[0], shapes, start, leaves[1], leaves[2]).sum().backward()
        finally:
            torch.use_deterministic_algorithms(False)


def cost_case(rng: random.Random, g: torch.Generator, device: str = "cpu"):
    b, q, c = rng.randint(0, 3), rng.randint(0, 12), rng.randint(1, 5)
    dtype = rng.choice([torch.float32, torch.float64, torch.float16])
    logits = corrupt(rng, torch.randn(b, q, c, generator=g).to(dtype) * rng.choice([1, 100]))
    boxes = corrupt(rng, torch.rand(b, q, 4, generator=g).to(dtype))
    counts = [rng.randint(0, 6) for _ in range(b)]
    labels = [torch.randint(0, c, (k,), generator=g) for k in counts]
    gt = [corrupt(rng, torch.rand(k, 4, generator=g).to(dtype)) for k in counts]
    kind = rng.randrange(10)
    if kind == 0 and labels:
        labels[0] = labels[0] + rng.choice([-100, c, 2**40])  # out of range
    elif kind == 1 and gt:
        gt[0] = gt[0][:, :3]
    elif kind == 2:
        labels = labels[:-1]  # one list short
    elif kind == 3:
        boxes = boxes[:, :, :2]
    elif kind == 4 and labels:
        labels[0] = labels[0].float()
    elif kind == 5:
        boxes = boxes * rng.choice([1e30, -1.0, 1e6])
    elif kind == 6 and gt:
        gt[0] = gt[0].double() if dtype != torch.float64 else gt[0].float()
    if device != "cpu":
        logits, boxes = logits.to(device), boxes.to(device)
        labels, gt = [t.to(device) for t in labels], [t.to(device) for t in gt]
        if rng.random() < 0.5:  # the matcher's path: errors deferred to the one host copy
            targets = [{"labels": lab, "boxes": box} for lab, box in zip(labels, gt)]
            HungarianMatcher()({"pred_logits": logits, "pred_boxes": boxes}, targets, k=2)
            return
    costs = matching_cost(logits, boxes, labels, gt)
    assert len(costs) == b
    for cost, k in zip(costs, counts):
        assert cost.shape == (q, k), cost.shape
        if rng.random() < 0.5:
            assign(cost, k=rng.randint(1, 3))


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", type=int, default=300, help="per op")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--ops", nargs="+", default=["ms_deform_attn", "matching_cost"], help="ops to fuzz"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rng, g = random.Random(args.seed), torch.Generator().manual_seed(args.seed)
    outcomes = collections.Counter()
    cases = {"ms_deform_attn": msda_case, "matching_cost": cost_case}
    for op in args.ops:
        case = cases[op]
        for _ in range(args.cases):
            try:
                case(rng, g, args.device)
                outcomes[(op, "computed")] += 1
            except ALLOWED as e:
                outcomes[(op, type(e).__name__)] += 1
    if args.device != "cpu":
        torch.cuda.synchronize()  # surfaces any asynchronous kernel fault here
    for (op, what), count in sorted(outcomes.items()):
        print(f"{op:15s} {what:13s} {count}")


if __name__ == "__main__":
    main()
