"""Benchmark: the full DINO-R50 AlignDETR model (6 + 6 layers, 900 queries) on CPU.

Times inference and one training step (forward + backward + AdamW step) for one 512x512 image
with 10 boxes, and reports the process's peak resident memory for each (each measured in its own
subprocess so the peaks do not mix). Randomly initialised weights: speed does not depend on
them.

    python benchmarks/model.py [--config configs/dino_r50.yaml] [--size 512] [--repeat 3]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(config, size, repeat, mode, opts):
    import torch

    sys.path.insert(0, ROOT)
    from detectron2.modeling import build_model

    import align_detr.modeling  # noqa: F401  (registers the model)
    from align_detr.config import load_config
    from align_detr.utils.synthetic import batched_input, synthetic_image

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    torch.manual_seed(0)
    cfg = load_config(config, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""] + opts)
    model = build_model(cfg)
    boxes = [(20 + 40 * i, 30 + 30 * (i % 3), 80 + 40 * i, 120 + 30 * (i % 3)) for i in range(10)]
    img = synthetic_image(size, size, boxes=boxes)
    batch = [batched_input(img, boxes, [i % 5 for i in range(10)])]
    times = []
    if mode == "inference":
        model.eval()
        with torch.no_grad():
            for _ in range(repeat + 1):
                t0 = time.perf_counter()
                model(batch)
                times.append(time.perf_counter() - t0)
    else:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for _ in range(repeat + 1):
            t0 = time.perf_counter()
            loss = sum(model(batch).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
    times = sorted(times[1:])  # first run is warm-up
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = sum(p.numel() for p in model.parameters())
    return {
        "mode": mode,
        "median_s": times[len(times) // 2],
        "peak_rss_mb": peak_mb,
        "params": params,
    }


def run(config=None, size=512, repeat=3, opts=()):
    """Returns one dict per mode (inference, train_step), each from a fresh subprocess."""
    config = config or os.path.join(ROOT, "configs", "dino_r50.yaml")
    rows = []
    for mode in ("inference", "train_step"):
        cmd = [
            sys.executable,
            __file__,
            "--config",
            config,
            "--size",
            str(size),
            "--repeat",
            str(repeat),
            "--child",
            mode,
            *opts,
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "dino_r50.yaml"))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", choices=["inference", "train_step"], help=argparse.SUPPRESS)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.config, args.size, args.repeat, args.child, args.opts)))
        return
    rows = run(args.config, args.size, args.repeat, args.opts)
    print(f"model: {os.path.relpath(args.config, ROOT)}, image {args.size}x{args.size}, CPU")
    for r in rows:
        print(
            f"{r['mode']:11s} {r['median_s'] * 1e3:9.0f} ms   peak RSS {r['peak_rss_mb']:7.0f} MB"
            f"   params {r['params'] / 1e6:.1f} M"
        )


if __name__ == "__main__":
    main()
