"""The exported detector in ONNX Runtime (CPU) against our eager PyTorch model, in one run.

For one config (``configs/align_r50.yaml`` by default, random weights), at each image size
(512x512 and 800x1333 by default): the model is exported once to ONNX (``--msda grid_sample``,
the flavour any runtime runs), then timed on the same uint8 batch of one image as

* ``eager fp32``: our PyTorch model (compiled deformable-attention op) through
  :class:`~align_detr.export.ExportableDetector`, the same graph that was exported;
* ``eager bf16``: the same under ``torch.autocast("cpu", torch.bfloat16)``;
* ``onnxruntime fp32``: the .onnx file in ONNX Runtime's CPU provider (all threads; graph
  optimisations on);

and the agreement of the ONNX outputs with eager fp32 (``compare_detections``: the fraction of
detections found with the same label and score, and the largest box / score difference). Ratios are
eager fp32 / other; absolute times on a shared machine are noise.

    python benchmarks/export.py [--config configs/align_r50.yaml] [--sizes 512x512,800x1333]
        [--repeat 3] [--threads N]
"""

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from align_detr.utils.quiet import quiet_third_party_warnings  # noqa: E402

quiet_third_party_warnings()  # before detectron2 is imported

import torch  # noqa: E402
from common import median_time  # noqa: E402


def _model(config, opts):
    from detectron2.modeling import build_model

    import align_detr.modeling  # noqa: F401
    from align_detr.config import load_config
    from align_detr.export import ExportableDetector

    cfg = load_config(config, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", *opts])
    torch.manual_seed(0)
    return cfg, ExportableDetector(build_model(cfg).eval())


def _batch(h, w):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (1, 3, h, w), dtype=torch.uint8, generator=g)
    return images, torch.tensor([[h, w]])


def _example(h, w):
    """The trace's example: two images of different sizes (see tools/export_model.py)."""
    images = torch.zeros((2, 3, h, w + 32), dtype=torch.uint8)
    images[:, :, :h, :w] = _batch(h, w)[0]
    return images, torch.tensor([[h, w], [h * 3 // 4, w * 3 // 4]])


def run(config="configs/align_r50.yaml", sizes=((512, 512), (800, 1333)), repeat=3, opts=()):
    import onnxruntime

    from align_detr.export import compare_detections, export_onnx

    cfg, detector = _model(
        os.path.join(ROOT, config) if not os.path.isabs(config) else config, opts
    )
    rows = []
    folder = tempfile.mkdtemp(prefix="align_detr_export_bench_")
    path = os.path.join(folder, "model.onnx")
    start = time.perf_counter()
    export_onnx(detector, *_example(*sizes[0]), path, {"base": cfg.MODEL.ALIGN_DETR.BASE})
    export_s = time.perf_counter() - start
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    for h, w in sizes:
        images, image_sizes = _batch(h, w)
        feeds = {"images": images.numpy(), "image_sizes": image_sizes.numpy()}
        with torch.no_grad():
            expected = detector(images, image_sizes)

            def eager():
                return detector(images, image_sizes)

            def eager_bf16():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return detector(images, image_sizes)

            got = session.run(None, feeds)
            times = {
                "eager fp32": median_time(eager, repeat=repeat),
                "eager bf16": median_time(eager_bf16, repeat=repeat),
                "onnxruntime fp32": median_time(lambda: session.run(None, feeds), repeat=repeat),
            }
        rows.append({"size": f"{h}x{w}", "times": times, **compare_detections(got, expected)})
    return rows, export_s


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/align_r50.yaml")
    parser.add_argument("--sizes", default="512x512,800x1333")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    rows, export_s = run(args.config, sizes, args.repeat)
    print(
        f"{args.config}, random weights, batch 1, {args.threads} threads; export {export_s:.0f} s"
    )
    print(
        "| size | eager fp32 | eager bf16 | onnxruntime fp32 | fp32/bf16 | fp32/onnxruntime "
        "| ONNX vs eager: detections that agree / their max box diff px / max score diff |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        t = r["times"]
        print(
            f"| {r['size']} | {t['eager fp32']:.2f} s | {t['eager bf16']:.2f} s "
            f"| {t['onnxruntime fp32']:.2f} s | {t['eager fp32'] / t['eager bf16']:.2f}x "
            f"| {t['eager fp32'] / t['onnxruntime fp32']:.2f}x "
            f"| {100 * r['matched']:.1f}% / {r['box_px']:.1e} / {r['score']:.1e} |"
        )


if __name__ == "__main__":
    main()
