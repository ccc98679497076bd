"""GPU benchmark: our CUDA ms_deform_attn vs the grid_sample formulation, same run, CUDA events.

Shapes are DINO R50 at 800x1333 (levels (100,167), (50,84), (25,42), (13,21); M=8, D=32,
P=4) with the realistic locations of benchmarks/ms_deform_attn.py: the encoder (Lq = S = 22223)
at batch 2 and 8 and the decoder (Lq = 900) at batch 2, in float32 and bfloat16. For each:
forward and forward + backward, ours and the reference, as

* the median of CUDA-event times of back-to-back eager calls (what a training step sees,
  launch overheads included), and
* the median replay time of the same call captured in a CUDA graph (device time only; the
  level table is on the host, so our op captures without a sync),

plus the maximum error against the float32 reference, and achieved bandwidth against the
device-to-device copy bandwidth measured in the same run: "unique" counts every input and output
byte once (value, locations, weights, output: the DRAM-traffic lower bound), "gather" counts the
four corner rows of every sample (mostly served by L1 / L2).

    python benchmarks/gpu_ms_deform_attn.py [--quick]
"""

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from common import cuda_graph_time, cuda_time, gpu_copy_gbps  # noqa: E402
from ms_deform_attn import DINO_LEVELS, make_case  # noqa: E402

from align_detr import _ext  # noqa: E402
from align_detr.layers import ms_deform_attn  # noqa: E402
from align_detr.layers.ms_deform_attn_reference import ms_deform_attn_grid_sample  # noqa: E402


def bench_case(name, n, lq, encoder, dtype, repeat):
    value, shapes, starts, loc, attn = make_case(DINO_LEVELS, lq, encoder, n=n)
    value, loc, attn = (t.to("cuda", dtype) for t in (value, loc, attn))  # shapes stay on the host
    _, _, m, d = value.shape
    nl, p = loc.shape[3], loc.shape[4]
    ours = lambda v, lc, a: ms_deform_attn(v, shapes, starts, lc, a)  # noqa: E731
    ref = lambda v, lc, a: ms_deform_attn_grid_sample(v, shapes, lc, a)  # noqa: E731
    with torch.no_grad():
        expect = ms_deform_attn_grid_sample(value.float(), shapes, loc.float(), attn.float())
        err = (ours(value, loc, attn).float() - expect).abs().max().item()

    leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
    grad = torch.randn(n, lq, m * d, device="cuda", dtype=dtype)

    def fwd(f):
        with torch.no_grad():
            f(value, loc, attn)

    def fwd_bwd(f):
        torch.autograd.grad(f(*leaves), leaves, grad)

    row = {"name": name, "dtype": str(dtype).replace("torch.", ""), "max_abs_err": err}
    for key, fn in (
        ("ours_fwd", lambda: fwd(ours)),
        ("ref_fwd", lambda: fwd(ref)),
        ("ours_fwdbwd", lambda: fwd_bwd(ours)),
        ("ref_fwdbwd", lambda: fwd_bwd(ref)),
    ):
        row[key] = cuda_time(fn, repeat=repeat)
        row[key + "_graph"] = cuda_graph_time(fn, repeat=repeat)
    elem = value.element_size()
    unique = (value.numel() + loc.numel() + attn.numel() + n * lq * m * d) * elem
    gather = 4 * n * lq * m * nl * p * d * elem
    row["unique_gbps"] = unique / row["ours_fwd"] / 1e9
    row["gather_gbps"] = gather / row["ours_fwd"] / 1e9
    row["fwd_ratio"] = row["ref_fwd"] / row["ours_fwd"]
    row["fwdbwd_ratio"] = row["ref_fwdbwd"] / row["ours_fwdbwd"]
    return row


def run(quick=False):
    s = sum(h * w for h, w in DINO_LEVELS)
    cases = [("encoder N=2", 2, s, True), ("decoder N=2 Lq=900", 2, 900, False)]
    if not quick:
        cases.insert(1, ("encoder N=8", 8, s, True))
    dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    repeat = 5 if quick else 20
    rows = [
        bench_case(name, n, lq, enc, dtype, repeat)
        for dtype in dtypes
        for name, n, lq, enc in cases
    ]
    return rows, {"device": torch.cuda.get_device_name(), "copy_gbps": gpu_copy_gbps()}


def _ms(t):
    return "   n/a" if t is None else f"{t * 1e3:6.2f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="float32, fewer cases and repeats")
    args = parser.parse_args()
    if not (torch.cuda.is_available() and _ext.has_cuda_kernels()):
        sys.exit("gpu_ms_deform_attn.py needs a CUDA GPU and align_detr._C built with CUDA")
    rows, machine = run(args.quick)
    print(
        f"device: {machine['device']}, torch {torch.__version__}, "
        f"device copy {machine['copy_gbps']:.0f} GB/s (read + write)"
    )
    print("times in ms: eager (CUDA events) / graph replay; ratio = grid_sample / ours (eager)")
    print(
        f"{'case':20s} {'dtype':9s} {'fwd ours':>15s} {'fwd ref':>15s} {'ratio':>6s} "
        f"{'f+b ours':>15s} {'f+b ref':>15s} {'ratio':>6s} {'uniqGB/s':>8s} {'%copy':>6s} "
        f"{'gathGB/s':>8s} {'max err':>8s}"
    )
    for r in rows:
        print(
            f"{r['name']:20s} {r['dtype']:9s} {_ms(r['ours_fwd'])}/{_ms(r['ours_fwd_graph'])} "
            f"{_ms(r['ref_fwd'])}/{_ms(r['ref_fwd_graph'])} {r['fwd_ratio']:5.1f}x "
            f"{_ms(r['ours_fwdbwd'])}/{_ms(r['ours_fwdbwd_graph'])} "
            f"{_ms(r['ref_fwdbwd'])}/{_ms(r['ref_fwdbwd_graph'])} {r['fwdbwd_ratio']:5.1f}x "
            f"{r['unique_gbps']:8.0f} {100 * r['unique_gbps'] / machine['copy_gbps']:5.1f}% "
            f"{r['gather_gbps']:8.0f} {r['max_abs_err']:8.1e}"
        )


if __name__ == "__main__":
    main()
