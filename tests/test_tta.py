"""Test-time augmentation: the eight dihedral views, mapping boxes back, weighted box fusion,
and the wrapper on the real (tiny) Align-DETR model."""

import pytest
import torch
from detectron2.modeling import build_model
from helpers import synthetic_image, tiny_cfg

from align_detr.config import ConfigError
from align_detr.modeling.test_time_augmentation import (
    DIHEDRAL_VIEWS,
    DihedralTTA,
    View,
    boxes_from_view,
    build_tta_model,
    view_image,
    weighted_box_fusion,
)


def _box_of_mask(mask: torch.Tensor) -> torch.Tensor:
    """XYXY pixel-edge box of the nonzero pixels of an (H, W) mask."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def test_the_eight_views_are_the_distinct_symmetries_of_the_square():
    image = torch.rand(3, 5, 5)
    views = [view_image(image, v) for v in DIHEDRAL_VIEWS]
    assert torch.equal(views[0], image)  # the first view is the image itself
    assert all(not torch.equal(a, b) for i, a in enumerate(views) for b in views[i + 1 :])
    assert DIHEDRAL_VIEWS[1] == View(False, True, False)  # 2 views: + the left-right flip


@pytest.mark.parametrize("view", DIHEDRAL_VIEWS)
def test_boxes_found_in_a_view_map_back_to_the_image(view):
    """A rectangle drawn on an odd-sized image, located in the view's pixels and mapped back,
    is the rectangle drawn (independent of the box arithmetic: the view moves pixels)."""
    height, width = 37, 53
    drawn = torch.tensor([[4.0, 9.0, 30.0, 20.0], [0.0, 0.0, 53.0, 2.0]])  # one on the border
    for box in drawn:
        image = torch.zeros(1, height, width)
        x0, y0, x1, y1 = box.long().tolist()
        image[0, y0:y1, x0:x1] = 1
        seen = view_image(image, view)
        found = _box_of_mask(seen[0])[None]
        view_h, view_w = seen.shape[-2:]
        assert boxes_from_view(found, view, view_h, view_w).tolist() == [box.tolist()]


def test_weighted_box_fusion_by_hand():
    boxes = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],  # score 0.9
            [1.0, 1.0, 11.0, 11.0],  # 0.3, IoU 0.68 with the first: fused with it
            [0.0, 0.0, 10.0, 10.0],  # 0.8 but class 1: never fused with class 0
            [50.0, 50.0, 60.0, 60.0],  # 0.6, alone
        ]
    )
    scores = torch.tensor([0.9, 0.3, 0.8, 0.6])
    classes = torch.tensor([0, 0, 1, 0])
    fused_boxes, fused_scores, fused_classes = weighted_box_fusion(boxes, scores, classes, 4)
    mean = (0.9 * boxes[0] + 0.3 * boxes[1]) / 1.2
    torch.testing.assert_close(fused_scores, torch.tensor([1.2 / 4, 0.8 / 4, 0.6 / 4]))
    assert fused_classes.tolist() == [0, 1, 0]
    torch.testing.assert_close(fused_boxes, torch.stack([mean, boxes[2], boxes[3]]))

    # more members than views (duplicates within a view): the mean score, not above it
    _, s, _ = weighted_box_fusion(boxes[:2], scores[:2], classes[:2], num_views=1)
    torch.testing.assert_close(s, torch.tensor([0.6]))
    # below the IoU threshold nothing is fused
    _, s, _ = weighted_box_fusion(boxes[:2], scores[:2], classes[:2], 2, iou_thresh=0.7)
    assert len(s) == 2
    # nothing in, nothing out
    b, s, c = weighted_box_fusion(boxes[:0], scores[:0], classes[:0], 8)
    assert b.shape == (0, 4) and s.shape == (0,) and c.shape == (0,)


def test_every_detection_joins_exactly_one_cluster():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(200, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + 5 + torch.rand(200, 2, generator=g) * 20], 1)
    scores = torch.rand(200, generator=g)
    classes = torch.randint(0, 3, (200,), generator=g)
    views = 1000  # more than any cluster's size: each fused score is its cluster's sum / views
    fused_boxes, fused_scores, fused_classes = weighted_box_fusion(boxes, scores, classes, views)
    assert len(fused_scores) < 200
    for c in range(3):  # so the scores of a class add up to the inputs' / views
        total = fused_scores[fused_classes == c].sum() * views
        torch.testing.assert_close(total, scores[classes == c].sum(), rtol=1e-5, atol=0)
    assert torch.all(fused_scores[:-1] >= fused_scores[1:])  # by score
    assert torch.all(fused_boxes[:, :2] <= fused_boxes[:, 2:])


def _model_and_image(height=96, width=136):
    torch.manual_seed(0)
    model = build_model(tiny_cfg("MODEL.ALIGN_DETR.NUM_CLASSES", "2")).eval()
    image = synthetic_image(h=height, w=width, boxes=((10, 20, 50, 60), (70, 5, 120, 40)))
    return model, torch.as_tensor(image.transpose(2, 0, 1).copy()).float()


@torch.no_grad()
def test_one_view_is_the_model_itself():
    model, image = _model_and_image()
    inputs = [{"image": image, "height": 48, "width": 68}]
    plain = model(inputs)[0]["instances"]
    tta = DihedralTTA(model, num_views=1).eval()(inputs)[0]["instances"]
    assert torch.equal(plain.pred_boxes.tensor, tta.pred_boxes.tensor)
    assert torch.equal(plain.scores, tta.scores)


@torch.no_grad()
@pytest.mark.parametrize(
    "symmetry", [View(False, True, False), View(False, False, True), View(True, False, False)]
)
def test_eight_views_make_the_real_model_equivariant(symmetry):
    """The eight views of a flipped (or transposed) image are the eight views of the image, so
    the fused detections of the flipped image are the flipped fused detections."""
    model, image = _model_and_image()
    height, width = 48, 68  # boxes reported at half the input size
    tta = DihedralTTA(model, num_views=8, max_detections=1000).eval()
    direct = tta([{"image": image, "height": height, "width": width}])[0]["instances"]
    turned_h, turned_w = (width, height) if symmetry.transpose else (height, width)
    turned = tta([{"image": view_image(image, symmetry), "height": turned_h, "width": turned_w}])[
        0
    ]["instances"]
    assert len(direct) > 0 and len(turned) == len(direct)
    assert direct.image_size == (height, width) and turned.image_size == (turned_h, turned_w)
    # each symmetry here is its own inverse: mapping back = mapping forward
    expected = boxes_from_view(direct.pred_boxes.tensor, symmetry, height, width)
    torch.testing.assert_close(turned.scores, direct.scores, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(turned.pred_boxes.tensor, expected, rtol=1e-5, atol=1e-3)
    assert torch.equal(turned.pred_classes, direct.pred_classes)
    boxes = direct.pred_boxes.tensor
    assert boxes.min() >= 0 and torch.all(boxes[:, [2, 3]] <= torch.tensor([width, height]))


def test_bad_settings_fail_clearly():
    model, image = _model_and_image()
    with pytest.raises(ValueError, match="num_views"):
        DihedralTTA(model, num_views=3)
    with pytest.raises(ValueError, match="iou_thresh"):
        DihedralTTA(model, iou_thresh=0.0)
    with pytest.raises(RuntimeError, match="inference"):
        DihedralTTA(model).train()([{"image": image}])
    with pytest.raises(ConfigError, match="TEST.AUG config: VIEWS must be 1, 2, 4 or 8"):
        tiny_cfg("TEST.AUG.VIEWS", "3")
    with pytest.raises(ConfigError, match="FUSION_IOU_THRESH"):
        tiny_cfg("TEST.AUG.FUSION_IOU_THRESH", "1.5")
    cfg = tiny_cfg("TEST.AUG.VIEWS", "4", "TEST.DETECTIONS_PER_IMAGE", "7")
    tta = build_tta_model(cfg, model)
    assert len(tta.views) == 4 and tta.max_detections == 7


@torch.no_grad()
def test_the_predictor_runs_the_augmented_model_when_enabled(tmp_path):
    """The demo's Predictor draws what is scored as bbox_TTA: the eight-view model, its boxes in
    the input image's pixels."""
    from detectron2.checkpoint import DetectionCheckpointer

    from align_detr.engine import Predictor

    model, _ = _model_and_image()
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("tiny")
    weights = str(tmp_path / "tiny.pth")
    plain = Predictor(tiny_cfg("MODEL.ALIGN_DETR.NUM_CLASSES", "2", "MODEL.WEIGHTS", weights), 0.0)
    assert not isinstance(plain.model, DihedralTTA)
    cfg = tiny_cfg("MODEL.ALIGN_DETR.NUM_CLASSES", "2", "MODEL.WEIGHTS", weights)
    cfg.TEST.AUG.ENABLED = True
    predictor = Predictor(cfg, confidence_threshold=0.0)
    assert isinstance(predictor.model, DihedralTTA) and len(predictor.model.views) == 8
    image = synthetic_image(h=90, w=130)
    found = predictor(image)
    assert found.image_size == (90, 130) and len(found) > 0
    boxes = found.pred_boxes.tensor
    assert boxes.min() >= 0 and torch.all(boxes[:, [2, 3]] <= torch.tensor([130.0, 90.0]))
