"""Runs every benchmark in benchmarks/ and writes benchmarks/RESULTS.md (``make bench``).

One table of our times against the reference formulations (ratio = reference / ours) and the
machine figures (sgemm GFLOP/s, copy GB/s) measured in the same run, since on a shared machine
only ratios from one run mean something:

* ms_deform_attn.py: the full preset (small encoder, DINO encoder and decoder shapes) against
  the grid_sample formulation, forward and forward + backward;
* matching.py: its quick preset (3 repetitions) of one Align-DETR training step's matching
  against the usual PyTorch cost + SciPy, for 5 / 20 / 50 / 100 GT per image, and of one
  H-Deformable-DETR step's one-to-many branch (GT repeated 6 times, Q = 1500);
* model.py: the full DINO-R50 model against Hugging Face's Deformable DETR, fp32 and bf16,
  inference and one training step on one image (``--size``,
  one timed repetition; it has no reference formulation).

    python benchmarks/run_all.py [--out benchmarks/RESULTS.md] [--size 512] [--skip-model]
"""

import argparse
import datetime
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def collect(size: int = 512, skip_model: bool = False):
    import matching
    import model
    import ms_deform_attn
    import torch

    rows = []  # (benchmark, case, ours_s, reference_s or None, note)
    t0 = time.time()
    msda_rows, machine = ms_deform_attn.run(quick=False)
    for r in msda_rows:
        note = f"{r['fwd_gflops']:.1f} GFLOP/s, max err {r['max_abs_err']:.1e}"
        rows.append(
            ("ms_deform_attn", f"{r['name']}, forward", r["ours_fwd_s"], r["ref_fwd_s"], note)
        )
        rows.append(
            ("ms_deform_attn", f"{r['name']}, fwd+bwd", r["ours_fwdbwd_s"], r["ref_fwdbwd_s"], "")
        )
    torch.set_num_threads(machine["threads"])
    for r in matching.run(quick=True) + matching.run_hybrid(quick=True):
        note = f"cost alone {r['cost_ratio']:.1f}x"
        rows.append(("matching", r["name"], r["ours_s"], r["reference_s"], note))
    if not skip_model:
        measured = model.run(size=size, repeat=1)
        times = {(r["impl"], r["precision"], r["mode"]): r["median_s"] for r in measured}
        for r in measured:
            if r["impl"] != "ours":
                continue
            # Reference: Hugging Face's Deformable DETR (same precision) when it was measured.
            ref = times.get(("hf", r["precision"], r["mode"]))
            note = f"peak RSS {r['peak_rss_mb']:.0f} MB, {r['params'] / 1e6:.1f} M params"
            if ref is not None:
                note += "; reference: HF DeformableDetr"
            rows.append(
                (
                    "model (DINO-R50, no DN)",
                    f"{r['mode']}, {r['precision']}, 1 image {size}x{size}",
                    r["median_s"],
                    ref,
                    note,
                )
            )
    return rows, machine, time.time() - t0


def render(rows, machine, elapsed: float) -> str:
    lines = [
        "# Benchmark results",
        "",
        f"Written by `make bench` (`python benchmarks/run_all.py`) on "
        f"{datetime.date.today().isoformat()}, in one run of {elapsed / 60:.1f} min. Ratio = "
        "reference time / our time (higher is better); the machine is shared, so compare ratios "
        "rather than absolute times.",
        "",
        f"Machine: {machine['cpu']}, {machine['threads']} torch threads, torch {machine['torch']}; "
        f"**sgemm {machine['sgemm_gflops']:.0f} GFLOP/s, copy {machine['copy_gbps']:.1f} GB/s** "
        "(measured in this run).",
        "",
        "| benchmark | case | ours | reference | ratio | notes |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for bench, case, ours, ref, note in rows:
        ratio = f"**{ref / ours:.1f}x**" if ref else "-"
        lines.append(
            f"| {bench} | {case} | {_ms(ours)} | {_ms(ref) if ref else '-'} | {ratio} | {note} |"
        )
    lines += [
        "",
        "References: ms_deform_attn against the pure-PyTorch `grid_sample` formulation "
        "(`ms_deform_attn_grid_sample`); matching against a PyTorch cost over the batch's "
        "concatenated GT (`torch.cdist`), copied out and solved per image with SciPy's "
        "`linear_sum_assignment`. See each script's docstring for the shapes.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"))
    parser.add_argument("--size", type=int, default=512, help="model benchmark image size")
    parser.add_argument("--skip-model", action="store_true", help="ops only (quicker)")
    args = parser.parse_args(argv)
    rows, machine, elapsed = collect(args.size, args.skip_model)
    text = render(rows, machine, elapsed)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
