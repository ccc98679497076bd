"""Export of every base to ONNX (run in ONNX Runtime) and to torch.export (run in a fresh
process that imports only align_detr), compared with the eager PyTorch model on two real images,
alone and as one padded batch; the TensorRT-plugin flavour checked structurally; the tool."""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import onnx
import pytest
import torch
from detectron2.modeling import build_model
from helpers import ROOT, load_script, repo_cfg

from align_detr.export import (
    ExportableDetector,
    ExportedPredictor,
    export_metadata,
    export_onnx,
    export_pt2,
    onnx_metadata,
    resized_batch,
    trace,
)
from align_detr.export.formats import PLUGIN_DOMAIN, PLUGIN_OP

D = "MODEL.ALIGN_DETR."
SD = [D + "DECODER.DECOUPLED", "True", D + "DECODER.TASK_AWARE_QUERIES", "True"]
#: Every base, tiny, with the inference options that change the graph spread over them.
BASES = {
    "dino": ("tiny_test.yaml", []),
    "h_deformable_detr": (
        "tiny_test.yaml",
        [D + "BASE", "HDeformableDETR", D + "DN.ENABLED", "False", D + "HYBRID.NUM_QUERIES", "40"]
        + [D + "TEST_NMS_THRESH", "0.5"],
    ),
    "conditional_detr": ("tiny_cond_test.yaml", []),
    "sd_dino": ("tiny_test.yaml", SD + [D + "DECODER.TASK_AWARE_POINT_PREDICTOR", "roi"]),
    "sd_conditional_detr": ("tiny_cond_test.yaml", SD),
}
BOX_TOL_PX, SCORE_TOL = 0.01, 1e-4


def real_images():
    """Two real aerial photos (BGR) of different sizes, from the quickstart's data package."""
    import importlib.util

    # The package's data folder only (importing deepforest needs its heavy dependencies).
    spec = importlib.util.find_spec("deepforest")
    data = os.path.join(os.path.dirname(spec.origin), "data")
    first = cv2.imread(os.path.join(data, "OSBS_029.png"), cv2.IMREAD_COLOR)
    second = cv2.imread(os.path.join(data, "SOAP_061.png"), cv2.IMREAD_COLOR)[:300, :370]
    return [first, second]


def eager_detections(model, images, sizes):
    """The eager model's detections of each image of a prepared batch, through its forward."""
    inputs = []
    for image, (h, w) in zip(images, sizes.tolist()):
        inputs.append({"image": image[:, :h, :w].float(), "height": h, "width": w})
    with torch.no_grad():
        return [out["instances"] for out in model(inputs)]


def assert_same_detections(exported, eager, what):
    """Exported (boxes, scores, labels) of a batch against the eager Instances of each image."""
    boxes, scores, labels = exported
    for i, inst in enumerate(eager):
        keep = scores[i] > 0  # the graph scores boxes clipped to nothing (and NMS losers) 0
        assert int(keep.sum()) == len(inst), f"{what}, image {i}: detection count"
        assert torch.equal(labels[i][keep], inst.pred_classes), f"{what}, image {i}: labels"
        assert (scores[i][keep] - inst.scores).abs().max() <= SCORE_TOL, f"{what}: scores"
        box_diff = (boxes[i][keep] - inst.pred_boxes.tensor).abs().max()
        assert box_diff <= BOX_TOL_PX, f"{what}, image {i}: boxes differ by {box_diff} px"


class Exported:
    """One base: the model, its prepared inputs, its eager detections and its exported files."""

    def __init__(self, name, folder):
        config, opts = BASES[name]
        self.cfg = repo_cfg(config, *opts)
        torch.manual_seed(0)
        self.model = build_model(self.cfg).eval()
        with torch.no_grad():  # off the initialisation: zero-initialised heads hide paths
            for p in self.model.parameters():
                p.add_(torch.randn_like(p) * 2e-2)
        self.detector = ExportableDetector(self.model)
        self.metadata = export_metadata(self.cfg, ["tree"] * self.cfg.MODEL.ALIGN_DETR.NUM_CLASSES)
        photos = real_images()
        # the two images alone, then as one zero-padded batch
        self.inputs = [resized_batch([p], self.metadata)[:2] for p in photos]
        self.inputs.append(resized_batch(photos, self.metadata)[:2])
        self.eager = [eager_detections(self.model, *x) for x in self.inputs]
        self.onnx = os.path.join(folder, f"{name}.onnx")
        self.pt2 = os.path.join(folder, f"{name}.pt2")
        images, sizes = self.inputs[-1]
        export_onnx(self.detector, images, sizes, self.onnx, self.metadata)
        export_pt2(trace(self.detector, images, sizes), self.pt2, self.metadata)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    return {name: Exported(name, str(folder)) for name in BASES}


@pytest.mark.parametrize("name", list(BASES))
def test_onnx_runtime_matches_pytorch(exported, name):
    case = exported[name]
    runner = ExportedPredictor(case.onnx)
    for (images, sizes), eager, what in zip(
        case.inputs, case.eager, ("alone 1", "alone 2", "batch")
    ):
        assert_same_detections(runner.run(images, sizes), eager, f"{name} onnx {what}")
    model = onnx.load(case.onnx)
    ops = {n.op_type for n in model.graph.node}
    assert "GridSample" in ops or name.startswith("conditional") or name == "sd_conditional_detr"
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node), "non-standard node"
    assert onnx_metadata(case.onnx)["input_format"] == case.cfg.INPUT.FORMAT


_FRESH_PROCESS = """
import sys, torch
import align_detr  # all a .pt2 file of ours needs
cases = torch.load(sys.argv[1])
out = {}
for name, (path, inputs) in cases.items():
    module = torch.export.load(path).module()
    with torch.no_grad():
        out[name] = [tuple(module(images, sizes)) for images, sizes in inputs]
torch.save(out, sys.argv[2])
"""


def test_pt2_in_a_fresh_process_matches_pytorch(exported, tmp_path):
    cases = {name: (case.pt2, case.inputs) for name, case in exported.items()}
    torch.save(cases, tmp_path / "in.pt")
    subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
        check=True,
        cwd=str(tmp_path),
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    results = torch.load(tmp_path / "out.pt")
    for name, case in exported.items():
        for got, eager, what in zip(results[name], case.eager, ("alone 1", "alone 2", "batch")):
            assert_same_detections(got, eager, f"{name} pt2 {what}")


def test_pt2_keeps_our_op_opaque_and_carries_metadata(exported):
    program = torch.export.load(exported["dino"].pt2)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "align_detr.ms_deform_attn_forward.default" in targets
    assert not any("matching" in t or "assign" in t for t in targets)
    module, metadata = __import__("align_detr.export", fromlist=["load_pt2"]).load_pt2(
        exported["dino"].pt2
    )
    assert metadata["class_names"][0] == "tree" and metadata["base"] == "DINO"


def test_dynamic_sizes_other_than_the_example(exported):
    """Batch of 3 at a size the trace never saw (odd sides, no padding needed by the caller)."""
    case = exported["dino"]
    rng = np.random.default_rng(1)
    photos = [
        rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in ((97, 131), (75, 75), (120, 61))
    ]
    images, sizes, _ = resized_batch(photos, case.metadata, resize=False)
    eager = eager_detections(case.model, images, sizes)
    assert_same_detections(ExportedPredictor(case.onnx).run(images, sizes), eager, "onnx 3x")
    assert_same_detections(ExportedPredictor(case.pt2).run(images, sizes), eager, "pt2 3x")


def test_plugin_flavour_has_one_trt_node_per_attention_call(exported, tmp_path):
    case = exported["dino"]
    images, sizes = case.inputs[-1]
    path = str(tmp_path / "plugin.onnx")
    export_onnx(case.detector, images, sizes, path, case.metadata, msda="plugin")
    model = onnx.load(path)
    plugin = [n for n in model.graph.node if n.op_type == PLUGIN_OP]
    c = case.cfg.MODEL.ALIGN_DETR
    # one per encoder layer and per decoder layer
    assert len(plugin) == c.ENCODER.NUM_LAYERS + c.DECODER.NUM_LAYERS
    assert all(n.domain == PLUGIN_DOMAIN and len(n.input) == 5 for n in plugin)
    assert "GridSample" not in {n.op_type for n in model.graph.node}
    shapes = {
        vi.name: [d.dim_value or d.dim_param for d in vi.type.tensor_type.shape.dim]
        for vi in model.graph.value_info
    }
    value_shape = shapes.get(plugin[0].input[0])
    if value_shape is not None:  # (N, S, M, D) with N and S dynamic
        assert len(value_shape) == 4 and value_shape[2:] == [c.NHEADS, c.D_MODEL // c.NHEADS]


def test_export_tool_writes_a_checked_file(tmp_path):
    tool = load_script("tools/export_model.py")
    out = tmp_path / "tiny.pt2"
    assert (
        tool.main(
            [
                "--config-file",
                os.path.join(ROOT, "configs", "tiny_cond_test.yaml"),
                "--format",
                "pt2",
            ]
            + ["--output", str(out), "MODEL.WEIGHTS", ""]
        )
        == 0
    )
    assert out.exists()
    with pytest.raises(SystemExit, match="must end in .onnx"):
        tool.main(
            ["--config-file", os.path.join(ROOT, "configs", "tiny_test.yaml")]
            + ["--format", "onnx", "--output", str(tmp_path / "x.pt2")]
        )


def test_demo_draws_an_exported_model_like_the_pytorch_one(exported, tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer

    from align_detr.engine.predictor import Predictor

    case = exported["dino"]
    photo = real_images()[1]
    DetectionCheckpointer(case.model, save_dir=str(tmp_path)).save("tiny")
    cfg = case.cfg.clone()
    cfg.MODEL.WEIGHTS = str(tmp_path / "tiny.pth")
    ours = Predictor(cfg, confidence_threshold=0.0)(photo)
    for path in (case.onnx, case.pt2):
        got = ExportedPredictor(path, confidence_threshold=0.0)(photo)
        assert torch.equal(got.pred_classes, ours.pred_classes), path
        assert (got.scores - ours.scores).abs().max() <= SCORE_TOL
        assert (got.pred_boxes.tensor - ours.pred_boxes.tensor).abs().max() <= 0.05  # input px
    image_path = tmp_path / "photo.png"
    cv2.imwrite(str(image_path), photo)
    demo = load_script("demo/demo.py")
    out = tmp_path / "drawn.png"
    assert (
        demo.main(
            ["--exported", case.onnx, "--input", str(image_path), "--output", str(out)]
            + ["--confidence-threshold", "0"]
        )
        == 0
    )
    assert cv2.imread(str(out)).shape == photo.shape
    assert (
        demo.main(["--exported", str(tmp_path / "missing.onnx"), "--input", str(image_path)]) == 2
    )


def test_mask_resize_equals_pytorch_nearest_for_every_size():
    """The models' own mask resize (which exports exactly) against F.interpolate "nearest"."""
    import torch.nn.functional as F

    from align_detr.modeling.meta_arch import nearest_resize_mask

    g = torch.Generator().manual_seed(0)
    for size_in in range(1, 140):
        mask = torch.rand(2, size_in, 3, generator=g) > 0.5
        for size_out in range(1, (size_in + 7) // 2 + 2):
            want = F.interpolate(mask[None].float(), size=(size_out, 3))[0].bool()
            assert torch.equal(nearest_resize_mask(mask, size_out, 3), want), (size_in, size_out)


def test_compare_detections_pairs_swapped_ties_and_flags_wrong_boxes():
    from align_detr.export import compare_detections

    boxes = torch.tensor([[[0.0, 0, 10, 10], [20, 20, 30, 30], [5, 5, 8, 8]]])
    scores = torch.tensor([[0.5, 0.49999, 0.1]])
    labels = torch.tensor([[1, 2, 1]])
    swapped = (boxes[:, [1, 0, 2]], scores[:, [1, 0, 2]], labels[:, [1, 0, 2]])
    same = compare_detections(swapped, (boxes, scores, labels))
    assert same == {"matched": 1.0, "box_px": 0.0, "score": 0.0}
    moved = boxes.clone()
    moved[0, 2] += 3.0
    off = compare_detections((moved, scores, labels), (boxes, scores, labels))
    assert off["matched"] == 2 / 3  # the moved box no longer agrees
    relabelled = compare_detections((boxes, scores, labels + 1), (boxes, scores, labels))
    assert relabelled["matched"] < 1.0
