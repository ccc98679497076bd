"""demo/demo.py on a tiny model (MobileNetV2 backbone, random weights saved to a temp
checkpoint): it writes drawings of the input's size and fails clearly on bad inputs; and
tools/plot_metrics.py draws a detectron2 metrics.json."""

import json
import os

import cv2
import pytest
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from helpers import ROOT, load_script, synthetic_image, tiny_cfg

TINY_MNV2 = [
    "MODEL.BACKBONE.NAME",
    "build_mobilenet_v2_backbone",
    "MODEL.MOBILENET_V2.PRETRAINED",
    "False",
    "MODEL.ALIGN_DETR.IN_FEATURES",
    "['s8', 's16', 's32']",
]


@pytest.fixture(scope="module")
def demo():
    return load_script("demo/demo.py")


@pytest.fixture
def tiny(tmp_path):
    """(config file, checkpoint) of a tiny random model."""
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(f"_BASE_: {os.path.join(ROOT, 'configs', 'tiny_test.yaml')}\n")
    model = build_model(tiny_cfg(*TINY_MNV2))
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("tiny")
    return str(cfg_file), str(tmp_path / "tiny.pth")


def run(demo, cfg_file, *args, weights=None):
    opts = ["--opts", *TINY_MNV2] + (["MODEL.WEIGHTS", weights] if weights else [])
    return demo.main(["--config-file", cfg_file, *args, "--confidence-threshold", "0", *opts])


def test_demo_writes_images_of_input_size(demo, tiny, tmp_path):
    cfg_file, weights = tiny
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name, (h, w) in {"a.png": (96, 128), "b.jpg": (120, 100)}.items():
        cv2.imwrite(str(inputs / name), synthetic_image(h, w, boxes=((10, 10, 50, 60),)))
    # A folder in, a folder out.
    assert (
        run(
            demo,
            cfg_file,
            "--input",
            str(inputs),
            "--output",
            str(tmp_path / "out"),
            weights=weights,
        )
        == 0
    )
    assert cv2.imread(str(tmp_path / "out" / "a.png")).shape == (96, 128, 3)
    assert cv2.imread(str(tmp_path / "out" / "b.jpg")).shape == (120, 100, 3)
    # A glob in, one file out.
    out_file = tmp_path / "single.png"
    assert (
        run(
            demo,
            cfg_file,
            "--input",
            str(inputs / "a.*"),
            "--output",
            str(out_file),
            weights=weights,
        )
        == 0
    )
    assert cv2.imread(str(out_file)).shape == (96, 128, 3)


def test_demo_clear_errors(demo, tiny, tmp_path, capsys):
    cfg_file, weights = tiny
    img = tmp_path / "a.png"
    cv2.imwrite(str(img), synthetic_image(64, 64, boxes=()))
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")

    assert demo.main(["--config-file", str(tmp_path / "nope.yaml"), "--input", str(img)]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert run(demo, cfg_file, "--input", str(img)) == 2  # tiny_test has MODEL.WEIGHTS ""
    assert "MODEL.WEIGHTS is empty" in capsys.readouterr().err
    assert run(demo, cfg_file, "--input", str(img), weights=str(tmp_path / "no.pth")) == 2
    assert "MODEL.WEIGHTS file not found" in capsys.readouterr().err
    assert run(demo, cfg_file, "--input", str(bad), weights=weights) == 2
    assert "cannot read" in capsys.readouterr().err
    assert run(demo, cfg_file, "--input", str(tmp_path / "*.jpg"), weights=weights) == 2
    assert "matches no image" in capsys.readouterr().err


def test_plot_metrics(tmp_path):
    plot_metrics = load_script("tools/plot_metrics.py")

    metrics = tmp_path / "metrics.json"
    lines = [
        {
            "iteration": i,
            "total_loss": 10 - i,
            "loss_class": 1.0 / (i + 1),
            "loss_class_0": 2.0,
            "loss_class_dn": 3.0,
            "lr": 1e-4,
        }
        for i in range(0, 40, 10)
    ]
    lines.insert(2, {"iteration": 19, "bbox/AP": 10.0, "bbox/AP50": 30.0, "bbox/AP75": 5.0})
    lines.append({"iteration": 39, "bbox/AP": 20.0, "bbox/AP50": 50.0, "bbox/AP75": 15.0})
    metrics.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"cut')
    losses, aps = plot_metrics.read_metrics(str(metrics))
    assert sorted(losses) == ["loss_class", "total_loss"]
    assert aps["AP50"] == [(19, 30.0), (39, 50.0)]
    out = plot_metrics.plot(str(metrics), str(tmp_path / "m.png"))
    assert cv2.imread(out) is not None
