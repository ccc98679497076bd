"""GPU benchmark: one Align-DETR training step's matching with predictions on the GPU, ours vs the
usual PyTorch + SciPy way, same run (the setting of benchmarks/matching.py: 7 outputs, B = 4,
Q = 900, C = 80, k = 2 on six outputs and 1 on the last).

Ours: per output one CUDA cost call (each image against its own GT), one device-to-host copy
that also carries the error word (the only synchronisation), one compiled assignment call on the
host. The usual way: the [B*Q, sum(G)] cost with torch.cdist on the GPU, copied out, SciPy per
image. Times are end-to-end wall times (the device is synchronised after each run: both return
host indices), medians, interleaved. Both must reach the same total cost.

    python benchmarks/gpu_matching.py [--quick] [--g 5 20 50 100]
"""

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from matching import KS, WEIGHTS, _median_times, _total_cost, make_step, reference_match  # noqa

from align_detr import _ext  # noqa: E402
from align_detr.matching import HungarianMatcher  # noqa: E402


def _cuda(d):
    return {k: v.cuda() for k, v in d.items()}


def run(quick=False, num_gts=(5, 20, 50, 100)):
    reps, warmup = (3, 1) if quick else (15, 3)
    matcher = HungarianMatcher(**WEIGHTS)
    rows = []
    for num_gt in num_gts:
        outputs, targets = make_step(num_gt)
        outputs_gpu = [_cuda(o) for o in outputs]
        targets_gpu = [_cuda(t) for t in targets]

        def ours():
            out = [matcher(o, targets_gpu, k=k) for o, k in zip(outputs_gpu, KS)]
            torch.cuda.synchronize()
            return out

        def reference():
            out = [reference_match(o, targets_gpu, k) for o, k in zip(outputs_gpu, KS)]
            torch.cuda.synchronize()
            return out

        with torch.no_grad():
            total_ours = _total_cost(outputs, targets, ours())
            total_ref = _total_cost(outputs, targets, reference())
            if abs(total_ours - total_ref) > 1e-4 * max(1.0, abs(total_ref)):
                raise AssertionError(f"G={num_gt}: total cost {total_ours} vs usual {total_ref}")
            t_ours, t_ref = _median_times([ours, reference], reps, warmup)
        rows.append(
            {"num_gt": num_gt, "ours_s": t_ours, "reference_s": t_ref, "ratio": t_ref / t_ours}
        )
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions, G = 20 only")
    parser.add_argument("--g", type=int, nargs="+", default=None, help="GT boxes per image")
    args = parser.parse_args(argv)
    if not (torch.cuda.is_available() and _ext.has_cuda_kernels()):
        sys.exit("gpu_matching.py needs a CUDA GPU and align_detr._C built with CUDA")
    num_gts = args.g or ((20,) if args.quick else (5, 20, 50, 100))
    rows = run(args.quick, num_gts)
    print(f"matching of one step on {torch.cuda.get_device_name()} (7 outputs, k = {list(KS)})")
    print(f"{'G/img':>5} {'ours ms':>8} {'usual ms':>9} {'ratio':>7}")
    for r in rows:
        print(
            f"{r['num_gt']:>5} {r['ours_s'] * 1e3:>8.2f} {r['reference_s'] * 1e3:>9.2f}"
            f" {r['ratio']:>6.1f}x"
        )
    return rows


if __name__ == "__main__":
    main()
