# Copyright (c) align-detr contributors.
"""Bad input is caught before training with a clear message, or skipped with a logged warning
where detectron2 skips: dataset files, configs, and a loss that turns NaN."""

import json
import logging
import os
import uuid

import pytest
import torch
from detectron2.engine import default_argument_parser
from detectron2.structures import BoxMode
from helpers import ROOT, register_coco, unregister, write_coco

import train_net
from align_detr.config import ConfigError, load_config
from align_detr.data import DatasetValidationError, validate_dataset_dicts
from align_detr.losses import SetCriterion


@pytest.fixture
def dataset(tmp_path):
    """Writes the 3-image COCO set, lets the test edit its json, registers it."""
    names = []

    def make(edit=None, num_images=3):
        folder = tmp_path / f"data{len(names)}"
        json_file = write_coco(str(folder), num_images=num_images)
        if edit is not None:
            with open(json_file) as f:
                coco = json.load(f)
            edit(coco, folder)
            with open(json_file, "w") as f:
                json.dump(coco, f)
        name = f"bad_{uuid.uuid4().hex[:8]}"
        register_coco(name, json_file, str(folder))
        names.append(name)
        return name

    yield make
    for name in names:
        unregister(name)


def _train(tmp_path, name, *opts):
    torch.set_num_threads(1)
    argv = ["--config-file", os.path.join(ROOT, "configs", "tiny_test.yaml")]
    argv += ["DATASETS.TRAIN", f"('{name}',)", "MODEL.ALIGN_DETR.NUM_CLASSES", "2"]
    argv += ["OUTPUT_DIR", str(tmp_path / "out"), "SOLVER.MAX_ITER", "2", *opts]
    return train_net.main(default_argument_parser().parse_args(argv))


# ---- dataset files ----------------------------------------------------------------------------


def test_image_record_missing_field(tmp_path, dataset):
    name = dataset(lambda coco, _: coco["images"][1].pop("height"))
    with pytest.raises(
        DatasetValidationError, match=r"cannot be loaded .*lacks the field 'height'"
    ):
        _train(tmp_path, name)


def test_annotation_missing_bbox_reported_before_training(tmp_path, dataset, monkeypatch):
    name = dataset(lambda coco, _: coco["annotations"][2].pop("bbox"))
    monkeypatch.setattr(SetCriterion, "forward", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(DatasetValidationError) as e:
        _train(tmp_path, name)
    assert f"Training dataset {name!r}" in str(e.value)
    assert "annotation without bbox: 1 x" in str(e.value) and "img1.png" in str(e.value)


def test_missing_image_file_reported_before_training(tmp_path, dataset):
    name = dataset(lambda coco, folder: os.remove(folder / "img2.png"))
    with pytest.raises(DatasetValidationError, match=r"image file not found: 1 x, .*img2.png"):
        _train(tmp_path, name)


def test_bad_boxes_dropped_with_warnings(caplog):
    record = {"file_name": "x.png", "height": 100, "width": 100, "image_id": 5}
    boxes = {
        1: [10, 10, 20, 20],  # fine
        2: [10, 10, 0, 20],  # zero width
        3: [10, 10, 20, -5],  # negative height
        4: [150, 10, 20, 20],  # entirely right of the image
        5: [-10, -10, 40, 40],  # partly outside: clipped later, kept
    }
    record["annotations"] = [
        {"id": i, "bbox": b, "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0}
        for i, b in boxes.items()
    ]
    with caplog.at_level(logging.WARNING):
        (out,) = validate_dataset_dicts([record], "toy", check_files=False)
    assert [a["id"] for a in out["annotations"]] == [1, 5]
    assert len(record["annotations"]) == 5  # the input is left as it was
    text = caplog.text
    assert "dropped 2 annotation(s) with boxes zero or negative size" in text
    assert "dropped 1 annotation(s) with boxes entirely outside the image" in text
    assert "1 box(es) extend beyond their image" in text

    bad = dict(record, annotations=[{"id": 9, "bbox": [0, 0, float("nan"), 3], "bbox_mode": 1,
                                     "category_id": 0}])  # fmt: skip
    with pytest.raises(DatasetValidationError, match="bbox has a non-finite value"):
        validate_dataset_dicts([bad], "toy", check_files=False)
    with pytest.raises(DatasetValidationError, match="height / width not positive"):
        validate_dataset_dicts([dict(record, height=0)], "toy", check_files=False)


def test_only_images_without_annotations(tmp_path, dataset):
    name = dataset(lambda coco, _: coco.update(annotations=[]))
    with pytest.raises(DatasetValidationError, match="No training images with usable annotations"):
        _train(tmp_path, name)


def test_bad_images_and_boxes_are_skipped_and_training_runs(tmp_path, dataset, caplog):
    def edit(coco, folder):
        (folder / "img1.png").write_bytes(b"not a png")  # unreadable
        coco["annotations"][0]["bbox"] = [10, 10, 0, 0]  # zero size
        coco["annotations"][1]["bbox"] = [500, 500, 10, 10]  # outside the 128 x 128 image
        coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != 4]

    name = dataset(edit, num_images=4)  # image 4 without annotations: filtered out
    with caplog.at_level(logging.WARNING):
        _train(tmp_path, name, "SOLVER.IMS_PER_BATCH", "3")
    assert os.path.isfile(tmp_path / "out" / "model_final.pth")
    assert "dropped 1 annotation(s) with boxes zero or negative size" in caplog.text
    assert "dropped 1 annotation(s) with boxes entirely outside the image" in caplog.text
    assert "Skipping image" in caplog.text and "img1.png" in caplog.text


# ---- configs ----------------------------------------------------------------------------------


def test_config_unknown_key(tmp_path):
    with pytest.raises(ConfigError, match="MODEL.ALIGN_DETR.LOSS.TUA"):
        _train(tmp_path, "unused", "MODEL.ALIGN_DETR.LOSS.TUA", "1.0")
    cfg_file = tmp_path / "typo.yaml"
    cfg_file.write_text(f'_BASE_: "{ROOT}/configs/tiny_test.yaml"\nSOLVER:\n  MAX_ITERS: 3\n')
    with pytest.raises(ConfigError, match="SOLVER.MAX_ITERS"):
        load_config(str(cfg_file))


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("MODEL.ALIGN_DETR.LOSS.MATCH_K", "[0, 1, 1]", "MATCH_K entries must be integers >= 1"),
        ("MODEL.ALIGN_DETR.LOSS.TAU", "0.0", "LOSS.TAU must be > 0"),
        ("MODEL.ALIGN_DETR.LOSS.TAU", "-1.5", "LOSS.TAU must be > 0"),
        ("MODEL.ALIGN_DETR.DN.NUM_QUERIES", "100000", "DN.NUM_QUERIES must be <= 2000"),
        ("MODEL.ALIGN_DETR.LOSS.TYPE", "'bogus'", "LOSS.TYPE must be one of focal, align, tal"),
        ("MODEL.ALIGN_DETR.EMA.DECAY", "1.0", r"EMA.DECAY must be in \[0, 1\)"),
    ],
)
def test_config_impossible_values(tmp_path, key, value, message):
    with pytest.raises(ConfigError, match=message):
        _train(tmp_path, "unused", key, value)


# ---- a loss that turns NaN --------------------------------------------------------------------


def test_nan_loss_names_iteration_and_term(tmp_path, dataset, monkeypatch):
    calls = {"n": 0}
    forward = SetCriterion.forward

    def nan_on_second_step(self, *args, **kwargs):
        losses = forward(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            losses["loss_giou_0"] = losses["loss_giou_0"] * float("nan")
        return losses

    monkeypatch.setattr(SetCriterion, "forward", nan_on_second_step)
    with pytest.raises(FloatingPointError) as e:
        _train(tmp_path, dataset())
    msg = str(e.value)
    assert "at iteration=1" in msg and "non-finite loss term(s) loss_giou_0 " in msg
