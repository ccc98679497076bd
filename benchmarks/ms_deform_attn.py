"""Benchmark: our compiled CPU ms_deform_attn vs the grid_sample formulation, same run.

Shapes are DINO R50 at 800x1333 (levels (100,167), (50,84), (25,42), (13,21); M=8, D=32,
P=4): the encoder (Lq = S = 22223) and the decoder (Lq = 900), batch 1, plus a small preset.
Sampling locations are realistic: encoder queries sit on the pixel centres of their own level in
raster order, decoder queries on random boxes, and offsets are a few pixels (about 9% of the
samples fall outside the map), since uniform-random locations would destroy the locality any
real model has. Prints times, ratios, useful GFLOP/s (8 * N * Lq * M * L * P * D per forward),
effective GB/s (4 corner rows of D values per sample) and the machine's sgemm / copy roofs.

    python benchmarks/ms_deform_attn.py [--quick]
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_summary, median_time  # noqa: E402

from align_detr.layers import ms_deform_attn  # noqa: E402
from align_detr.layers.ms_deform_attn_reference import ms_deform_attn_grid_sample  # noqa: E402

DINO_LEVELS = [(100, 167), (50, 84), (25, 42), (13, 21)]
SMALL_LEVELS = [(32, 32), (16, 16), (8, 8), (4, 4)]


def make_case(levels, lq, encoder, n=1, m=8, d=32, p=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(levels, dtype=torch.int64)
    areas = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    s = int(areas.sum())
    nl = len(levels)
    value = torch.randn(n, s, m, d, generator=g)
    wh = shapes.flip(-1).float()  # (L, 2) as (W, H)
    if encoder:  # every token is a query, at its own pixel centre, raster order level by level
        ref = torch.cat(
            [
                torch.stack(
                    torch.meshgrid(
                        (torch.arange(w) + 0.5) / w, (torch.arange(h) + 0.5) / h, indexing="xy"
                    ),
                    -1,
                ).reshape(-1, 2)
                for h, w in levels
            ]
        )[:lq]
        ref = ref.view(1, lq, 1, 1, 1, 2).expand(n, lq, 1, 1, 1, 2)
    else:
        ref = torch.rand(n, lq, 1, 1, 1, 2, generator=g)
    offsets = torch.randn(n, lq, m, nl, p, 2, generator=g) * 2.0  # pixels
    loc = (ref + offsets / wh.view(1, 1, 1, nl, 1, 2)).contiguous()
    attn = torch.randn(n, lq, m, nl * p, generator=g).softmax(-1).view(n, lq, m, nl, p)
    return value, shapes, starts, loc, attn


def bench_case(name, levels, lq, encoder, repeat):
    value, shapes, starts, loc, attn = make_case(levels, lq, encoder)
    n, _, m, d = value.shape
    nl, p = loc.shape[3], loc.shape[4]
    ours = lambda v, lc, a: ms_deform_attn(v, shapes, starts, lc, a)  # noqa: E731
    ref = lambda v, lc, a: ms_deform_attn_grid_sample(v, shapes, lc, a)  # noqa: E731

    with torch.no_grad():
        out, out_ref = ours(value, loc, attn), ref(value, loc, attn)
    err = (out - out_ref).abs().max().item()

    def fwd(f):
        with torch.no_grad():
            f(value, loc, attn)

    leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
    grad = torch.randn_like(out)

    def fwd_bwd(f):
        torch.autograd.grad(f(*leaves), leaves, grad)

    t_ours_f = median_time(lambda: fwd(ours), repeat=repeat)
    t_ref_f = median_time(lambda: fwd(ref), repeat=repeat)
    t_ours_fb = median_time(lambda: fwd_bwd(ours), repeat=repeat)
    t_ref_fb = median_time(lambda: fwd_bwd(ref), repeat=repeat)
    flops = 8 * n * lq * m * nl * p * d
    gather_bytes = 4 * n * lq * m * nl * p * d * value.element_size()
    return {
        "name": name,
        "ours_fwd_s": t_ours_f,
        "ref_fwd_s": t_ref_f,
        "fwd_ratio": t_ref_f / t_ours_f,
        "ours_fwdbwd_s": t_ours_fb,
        "ref_fwdbwd_s": t_ref_fb,
        "fwdbwd_ratio": t_ref_fb / t_ours_fb,
        "fwd_gflops": flops / t_ours_f / 1e9,
        "fwd_gbps": gather_bytes / t_ours_f / 1e9,
        "max_abs_err": err,
    }


def run(quick=False):
    """Returns one dict per case (keys as in bench_case) plus the machine figures."""
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    machine = machine_summary()
    s = sum(h * w for h, w in DINO_LEVELS)
    small_s = sum(h * w for h, w in SMALL_LEVELS)
    cases = [("small encoder (S=1360)", SMALL_LEVELS, small_s, True)]
    if not quick:
        cases += [
            (f"DINO encoder (Lq=S={s})", DINO_LEVELS, s, True),
            ("DINO decoder (Lq=900)", DINO_LEVELS, 900, False),
        ]
    rows = [
        bench_case(name, lv, lq, enc, repeat=3 if not quick else 5) for name, lv, lq, enc in cases
    ]
    return rows, machine


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small preset only")
    args = parser.parse_args()
    rows, machine = run(args.quick)
    print(
        f"machine: {machine['cpu']}, {machine['threads']} threads, torch {machine['torch']}, "
        f"sgemm {machine['sgemm_gflops']:.0f} GFLOP/s, copy {machine['copy_gbps']:.1f} GB/s"
    )
    header = (
        f"{'case':28s} {'fwd ours':>9s} {'fwd ref':>9s} {'ratio':>6s} {'f+b ours':>9s} "
        f"{'f+b ref':>9s} {'ratio':>6s} {'GFLOP/s':>8s} {'%sgemm':>7s} {'GB/s':>6s} {'max err':>8s}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['name']:28s} {r['ours_fwd_s'] * 1e3:8.1f}ms {r['ref_fwd_s'] * 1e3:8.1f}ms "
            f"{r['fwd_ratio']:5.1f}x {r['ours_fwdbwd_s'] * 1e3:8.1f}ms {r['ref_fwdbwd_s'] * 1e3:8.1f}ms "
            f"{r['fwdbwd_ratio']:5.1f}x {r['fwd_gflops']:8.1f} "
            f"{100 * r['fwd_gflops'] / machine['sgemm_gflops']:6.1f}% {r['fwd_gbps']:6.1f} "
            f"{r['max_abs_err']:8.1e}"
        )


if __name__ == "__main__":
    main()
