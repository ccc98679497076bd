"""train_net.py end to end on CPU: a few training iterations on a COCO-format dataset written
to a temp dir, then --eval-only scoring the saved checkpoint with the real COCOEvaluator."""

import json
import os
import sys
import uuid

import cv2
import pytest

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import default_argument_parser

from model_utils import ROOT, synthetic_image

sys.path.insert(0, ROOT)
import train_net  # noqa: E402


def write_coco(folder, num_images=3):
    """Writes images with two coloured boxes each and their COCO json; returns the json path."""
    os.makedirs(folder, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        boxes = ((10 + 5 * i, 20, 60 + 5 * i, 80), (70, 15 + 3 * i, 115, 70 + 3 * i))
        name = f"img{i}.png"
        cv2.imwrite(os.path.join(folder, name), synthetic_image(boxes=boxes, seed=i))
        images.append({"id": i + 1, "file_name": name, "height": 128, "width": 128})
        for j, (x0, y0, x1, y1) in enumerate(boxes):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": j + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                }
            )
    categories = [{"id": 1, "name": "red"}, {"id": 2, "name": "green"}]
    path = os.path.join(folder, "annotations.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return path


@pytest.fixture
def tiny_dataset(tmp_path):
    name = f"tiny_coco_{uuid.uuid4().hex[:8]}"
    json_file = write_coco(str(tmp_path / "data"))
    register_coco_instances(name, {}, json_file, str(tmp_path / "data"))
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def run(argv):
    return train_net.main(default_argument_parser().parse_args(argv))


def test_train_then_eval_only_prints_coco_ap(tiny_dataset, tmp_path, capsys):
    out_dir = str(tmp_path / "out")
    common = [
        "--config-file",
        os.path.join(ROOT, "configs", "tiny_test.yaml"),
    ]
    opts = [
        "DATASETS.TRAIN",
        f"('{tiny_dataset}',)",
        "DATASETS.TEST",
        f"('{tiny_dataset}',)",
        "MODEL.ALIGN_DETR.NUM_CLASSES",
        "2",
        "OUTPUT_DIR",
        out_dir,
    ]
    run(common + opts)  # tiny_test.yaml: 4 iterations
    weights = os.path.join(out_dir, "model_final.pth")
    assert os.path.isfile(weights)
    with open(os.path.join(out_dir, "last_checkpoint")) as f:
        assert f.read().strip() == "model_final.pth"
    capsys.readouterr()

    res = run(common + ["--eval-only"] + opts + ["MODEL.WEIGHTS", weights])
    printed = capsys.readouterr().out
    assert "Average Precision  (AP) @[ IoU=0.50:0.95" in printed  # pycocotools' summary
    ap = res["bbox"]["AP"]
    assert 0.0 <= ap <= 100.0
    assert os.path.isfile(os.path.join(out_dir, "inference", "coco_instances_results.json"))
