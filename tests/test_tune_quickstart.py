"""tools/tune_quickstart.py: the forward pass it shares between settings gives exactly the
detections of a detector built with each NMS threshold (Align-DETR and the Faster R-CNN peer);
its scores are those of the --eval-only path; it refuses the config's test split."""

import copy

import pytest
import torch
from torchvision.ops import box_iou
from helpers import config_path, load_script, repo_cfg, tiny_cfg

from align_detr.engine import Trainer
from align_detr.engine import test_with_tta as score_with_tta

tq = load_script("tools/tune_quickstart.py")


def _inputs():
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8, generator=g)
    return [{"image": image, "height": 120, "width": 160, "file_name": "a.png"}]


def _same(a, b):
    a, b = a[0]["instances"], b[0]["instances"]
    assert len(a) == len(b)
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.pred_classes, b.pred_classes)


def _check_replay(cfg, thresholds, set_nms):
    """The replayed detections at each threshold equal a fresh model's built with it."""
    stages = tq.detector_of(cfg)
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    model = build_model(cfg).eval()
    replay = tq.ReplayDetector(model, stages).eval()
    inputs = _inputs()
    with torch.no_grad():
        for t in thresholds:
            direct = copy.deepcopy(model)
            set_nms(direct, t)
            replay.nms_thresh = t
            _same(replay(inputs), direct(inputs))
    assert replay.forward_passes == 1  # one network pass for every threshold
    return replay


def test_replay_equals_the_align_detr_postprocessing():
    cfg = tiny_cfg("MODEL.ALIGN_DETR.NUM_CLASSES", "1", "MODEL.ALIGN_DETR.NUM_SELECT", "20")

    def set_nms(m, t):
        m.test_nms_thresh = t

    replay = _check_replay(cfg, [0.0, 0.05, 0.3, 0.7, 0.0], set_nms)
    with torch.no_grad():  # NMS at 0.05 removes some of the random boxes: the test has teeth
        replay.nms_thresh = 0.0
        n_all = len(replay(_inputs())[0]["instances"])
        replay.nms_thresh = 0.05
        assert len(replay(_inputs())[0]["instances"]) < n_all


def test_replay_equals_the_faster_rcnn_postprocessing():
    cfg = repo_cfg(
        "quickstart/faster_rcnn_mnv2_trees.yaml",
        "MODEL.MOBILENET_V2.PRETRAINED",
        "False",
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
        "0.0",  # random weights: keep every proposal's box so that NMS has work to do
    )

    def set_nms(m, t):
        m.roi_heads.box_predictor.test_nms_thresh = t

    replay = _check_replay(cfg, [0.5, 0.3, 1.0, 0.7], set_nms)
    with torch.no_grad():  # 1.0 keeps overlapping boxes, 0.3 does not: the thresholds act
        for t, overlapping in ((1.0, True), (0.3, False)):
            replay.nms_thresh = t
            boxes = replay(_inputs())[0]["instances"].pred_boxes.tensor
            iou = box_iou(boxes, boxes).fill_diagonal_(0)
            assert bool((iou > 0.3 + 1e-6).any()) == overlapping


def test_scores_are_those_of_the_eval_only_path(tiny_dataset, tmp_path):
    cfg = tiny_cfg(
        "MODEL.ALIGN_DETR.NUM_CLASSES",
        "2",
        "DATASETS.TEST",
        "('held_out_test_split',)",
        "OUTPUT_DIR",
        str(tmp_path),
        "TEST.AUG.FUSION_IOU_THRESH",
        "0.3",
    )
    cfg.freeze()
    torch.manual_seed(0)
    model = Trainer.build_model(cfg).eval()
    report = tq.tune(cfg, tiny_dataset, sizes=[96, 128], nms=[0.0, 0.5], views=[1, 2], model=model)
    assert len(report["results"]) == 8 and report["forward_passes"] == 3 * 2 * 2
    assert report["choice"] == max(report["results"], key=tq._rank)
    for row in (report["results"][0], report["results"][-1]):  # (96, 0, 1) and (128, 0.5, 2)
        c = tq.setting_cfg(
            cfg, tiny_dataset, row["size"], row["nms"], row["views"], tq.AlignDETRStages.nms_key
        )
        fresh = copy.deepcopy(model)
        fresh.test_nms_thresh = row["nms"]
        if row["views"] > 1:
            expected = score_with_tta(Trainer, c, fresh)["bbox_TTA"]
        else:
            expected = Trainer.test(c, fresh)["bbox"]
        for k in ("AP", "AP50", "AP75"):
            assert row[k] == pytest.approx(expected[k], abs=1e-9, nan_ok=True)
    # the table and the config fragment name the choice
    text = tq.table(report)
    assert "*" in text and "chosen" in text
    fragment = tq.choice_yaml(report)
    assert f"MIN_SIZE_TEST: {report['choice']['size']}" in fragment
    assert "TEST_NMS_THRESH" in fragment and "VIEWS" in fragment


def test_refuses_the_test_split():
    cfg = repo_cfg("quickstart/align_mnv2_trees.yaml")
    with pytest.raises(ValueError, match="test split"):
        tq.tune(cfg, cfg.DATASETS.TEST[0])
    # the command line says so in one line, before building anything
    argv = ["--config-file", config_path("quickstart/align_mnv2_trees.yaml")]
    with pytest.raises(SystemExit, match="test split"):
        tq.main(argv + ["--dataset", "trees_val", "MODEL.WEIGHTS", __file__])
