# Copyright (c) align-detr contributors.
"""DetrDatasetMapper on a tiny real image: shapes, box geometry, crowd handling, test mode."""

import copy

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from helpers import repo_cfg

from align_detr.data import DetrDatasetMapper, build_detr_augmentations

H, W = 60, 80
# Distinct constant channels, written in OpenCV's BGR order, to check the channel order.
BGR = (10, 20, 30)


@pytest.fixture
def dataset_dict(tmp_path):
    image = np.empty((H, W, 3), dtype=np.uint8)
    image[:] = BGR
    path = str(tmp_path / "img.png")  # PNG: lossless, so pixel values survive
    assert cv2.imwrite(path, image)

    def anno(xywh, category, iscrowd=0):
        return {"bbox": xywh, "bbox_mode": BoxMode.XYWH_ABS, "category_id": category,
                "iscrowd": iscrowd}  # fmt: skip

    return {
        "file_name": path,
        "height": H,
        "width": W,
        "image_id": 7,
        "annotations": [
            anno([5, 10, 20, 30], 1),  # x 5..25, y 10..40
            anno([40, 0, 40, 60], 2, iscrowd=1),  # crowd: always dropped
            anno([50, 35, 25, 20], 3),  # x 50..75, y 35..55: cut by the crop below
            anno([70, 2, 8, 6], 4),  # x 70..78, y 2..8: outside the crop below
        ],
    }


def _boxes(out):
    return out["instances"].gt_boxes.tensor.numpy()


def test_train_deterministic_flip_and_resize(dataset_dict):
    # A sure flip and a fixed 2x resize: the boxes are known exactly.
    mapper = DetrDatasetMapper(
        is_train=True,
        augmentations=[T.RandomFlip(prob=1.0), T.ResizeShortestEdge(2 * H, 1333)],
        image_format="RGB",
    )
    original = copy.deepcopy(dataset_dict)
    out = mapper(dataset_dict)
    assert dataset_dict == original  # the dataset's own dict is not modified

    image = out["image"]
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 2 * H, 2 * W)
    assert image[:, 0, 0].tolist() == list(BGR[::-1])  # RGB
    inst = out["instances"]
    assert inst.image_size == (2 * H, 2 * W)
    assert inst.gt_classes.dtype == torch.int64
    assert inst.gt_classes.tolist() == [1, 3, 4]  # crowd dropped
    flipped = [[W - 25, 10, W - 5, 40], [W - 75, 35, W - 50, 55], [W - 78, 2, W - 70, 8]]
    np.testing.assert_allclose(_boxes(out), 2 * np.array(flipped, dtype=np.float32))
    assert "annotations" not in out and out["height"] == H and out["width"] == W


def test_train_crop_clips_and_removes_boxes(dataset_dict):
    # The crop branch with a fixed crop (x 20..60, y 10..40), taken with probability 1.
    mapper = DetrDatasetMapper(
        is_train=True,
        augmentations=[T.ResizeShortestEdge(H, 1333)],
        augmentations_with_crop=[T.CropTransform(20, 10, 40, 30)],
        image_format="BGR",
        crop_prob=1.0,
    )
    out = mapper(dataset_dict)
    assert tuple(out["image"].shape) == (3, 30, 40)
    assert out["image"][:, 0, 0].tolist() == list(BGR)
    # Box 1 is cut to x 20..25 (-> 0..5), box 3 to x 50..60, y 35..40 (-> 30..40, 25..30);
    # box 4 lies outside the crop and is removed.
    assert out["instances"].gt_classes.tolist() == [1, 3]
    np.testing.assert_allclose(_boxes(out), [[0, 0, 5, 30], [30, 25, 40, 30]])


def test_test_mode_exact_resize_and_no_annotations(dataset_dict):
    cfg = repo_cfg("Base-AlignDETR.yaml")  # the DETR data recipe
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 2 * H, 1333
    mapper = DetrDatasetMapper(cfg, is_train=False)
    assert mapper.augmentations_with_crop is None
    out = mapper(dataset_dict)
    assert tuple(out["image"].shape) == (3, 2 * H, 2 * W)
    assert "instances" not in out and "annotations" not in out
    assert out["image_id"] == 7 and (out["height"], out["width"]) == (H, W)


def test_from_config_pipelines():
    cfg = repo_cfg("Base-AlignDETR.yaml")  # the DETR data recipe
    cfg.INPUT.MIN_SIZE_TRAIN = tuple(range(480, 801, 32))
    train = DetrDatasetMapper(cfg, is_train=True)
    plain = train.augmentations.augs
    crop = train.augmentations_with_crop.augs
    assert [type(a) for a in plain] == [T.RandomFlip, T.ResizeShortestEdge]
    assert [type(a) for a in crop] == [
        T.RandomFlip, T.ResizeShortestEdge, T.RandomCrop, T.ResizeShortestEdge
    ]  # fmt: skip
    assert plain[1].short_edge_length == tuple(range(480, 801, 32)) and plain[1].max_size == 1333
    assert crop[1].short_edge_length == (400, 500, 600) and crop[1].is_range is False
    assert (crop[2].crop_type, tuple(crop[2].crop_size)) == ("absolute_range", (384, 600))
    assert train.image_format == cfg.INPUT.FORMAT and train.crop_prob == 0.5

    cfg.INPUT.CROP.ENABLED = False
    assert DetrDatasetMapper(cfg, is_train=True).augmentations_with_crop is None
    test = DetrDatasetMapper(cfg, is_train=False).augmentations.augs
    assert [(type(a), a.short_edge_length, a.max_size) for a in test] == [
        (T.ResizeShortestEdge, (800, 800), 1333)
    ]


def test_random_pipeline_from_config(dataset_dict):
    # The real random pipeline at a small scale: both branches run, every output is valid.
    cfg = repo_cfg("Base-AlignDETR.yaml")  # the DETR data recipe
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (64, 96), 1333
    cfg.INPUT.CROP_PRE_RESIZE, cfg.INPUT.CROP.SIZE = (48, 60), (20, 40)
    mapper = DetrDatasetMapper(cfg, is_train=True)
    np.random.seed(0)
    aspect_ratios = set()
    for _ in range(30):
        out = mapper(dataset_dict)
        _, h, w = out["image"].shape
        assert min(h, w) in (64, 96)  # the last resize always sets the short side
        aspect_ratios.add(round(w / h, 2))
        boxes, classes = _boxes(out), out["instances"].gt_classes
        assert out["instances"].image_size == (h, w)
        assert set(classes.tolist()) <= {1, 3, 4}  # never the crowd box
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert (
            (boxes >= 0).all() and (boxes[:, [0, 2]] <= w).all() and (boxes[:, [1, 3]] <= h).all()
        )
    # The uncropped image keeps its 4:3 shape; crops give other aspect ratios.
    assert round(W / H, 2) in aspect_ratios and len(aspect_ratios) > 1


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_rotation90_moves_pixels_and_boxes_together(k):
    from align_detr.data.transforms import Rotation90Transform

    h, w = 6, 10
    image = np.zeros((h, w, 3), dtype=np.uint8)
    box = np.array([[2, 1, 5, 4]], dtype=np.float64)  # xyxy: pixels x 2..4, y 1..3
    image[1:4, 2:5] = 255
    t = Rotation90Transform(h, w, k)
    out = t.apply_image(image)
    assert out.shape[:2] == ((w, h) if k % 2 else (h, w))
    x0, y0, x1, y1 = t.apply_box(box)[0]
    ys, xs = np.nonzero(out[..., 0])
    assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert np.array_equal(t.inverse().apply_image(out), image)
    np.testing.assert_allclose(t.inverse().apply_box(t.apply_box(box)), box)


def test_random_rotation90_in_the_training_pipeline():
    cfg = repo_cfg("Base-AlignDETR.yaml", "INPUT.RANDOM_ROTATE_90", "True")
    augs, augs_with_crop = build_detr_augmentations(cfg, is_train=True)
    from align_detr.data.transforms import RandomRotation90

    assert [type(a) for a in augs][:2] == [T.RandomFlip, RandomRotation90]
    assert any(isinstance(a, RandomRotation90) for a in augs_with_crop)
    test_augs, _ = build_detr_augmentations(cfg, is_train=False)
    assert not any(isinstance(a, RandomRotation90) for a in test_augs)
