"""The quickstart config builds its model (MobileNetV2 neck inputs, one class, enough queries for
dense crowns) and tools/ablate_loss.py builds the two loss variants for it."""

import torch
from detectron2.modeling import build_model
from helpers import config_path, load_script, repo_cfg

from align_detr.config import resolve_match_k
from align_detr.modeling import BASE_REGISTRY

ablate_loss = load_script("tools/ablate_loss.py")


def quickstart_cfg(*opts):
    return repo_cfg("quickstart/align_mnv2_trees.yaml", *opts)


def match_k(cfg):
    """MATCH_K resolved to one k per matched output (encoder + each decoder layer)."""
    c = cfg.MODEL.ALIGN_DETR
    return resolve_match_k(c.LOSS.MATCH_K, BASE_REGISTRY.get(c.BASE).num_matched_outputs(cfg))


def test_quickstart_config_builds():
    cfg = quickstart_cfg("MODEL.MOBILENET_V2.PRETRAINED", "False")
    c = cfg.MODEL.ALIGN_DETR
    assert c.LOSS.TYPE == "align" and match_k(cfg) == [2] * c.DECODER.NUM_LAYERS + [1]
    assert c.NUM_QUERIES >= 100 and c.NUM_SELECT >= 100 and c.NUM_CLASSES == 1
    assert cfg.INPUT.FORMAT == "RGB" and list(cfg.MODEL.PIXEL_MEAN) == [123.675, 116.28, 103.53]
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model([{"image": torch.zeros(3, 96, 128, dtype=torch.uint8)}])
    assert len(out[0]["instances"]) == c.NUM_SELECT


def test_ablation_variants():
    assert quickstart_cfg().MODEL.ALIGN_DETR.DECODER.NUM_LAYERS == 3
    v = ablate_loss.VARIANTS
    align, focal = quickstart_cfg(*v["align"]), quickstart_cfg(*v["focal"])
    assert align.MODEL.ALIGN_DETR.LOSS.TYPE == "align" and match_k(align) == [2, 2, 2, 1]
    assert focal.MODEL.ALIGN_DETR.LOSS.TYPE == "focal" and match_k(focal) == [1, 1, 1, 1]


def test_baseline_peer_trains_for_its_budget_and_is_scored_the_same_way(tiny_dataset, tmp_path):
    baseline = load_script("tools/train_baseline.py")
    out = tmp_path / "baseline"
    summary = baseline.main(["--seconds", "3", *_tiny_peer(tiny_dataset, out)])
    assert 1 <= summary["iterations"] < 2000  # the budget, not MAX_ITER, ended training
    assert summary["train_seconds"] >= 3
    assert 0.0 <= summary["bbox"]["AP50"] <= 100.0
    assert 0.0 <= summary["bbox_TTA"]["AP50"] <= 100.0
    assert (out / "model_final.pth").is_file() and (out / "summary.json").is_file()

    # ended by MAX_ITER instead of the budget: the count is still the iterations done
    opts = [*_tiny_peer(tiny_dataset, tmp_path / "b2"), "SOLVER.MAX_ITER", "2"]
    summary = baseline.main(["--seconds", "1000", *opts, "TEST.AUG.ENABLED", "False"])
    assert summary["iterations"] == 2 and "bbox_TTA" not in summary


def _tiny_peer(tiny_dataset, out):
    """Overrides that make the quickstart's peer config train on the tiny dataset."""
    return [
        "--config-file",
        config_path("quickstart/faster_rcnn_mnv2_trees.yaml"),
        "MODEL.MOBILENET_V2.PRETRAINED",
        "False",
        "MODEL.ROI_HEADS.NUM_CLASSES",
        "2",
        "DATASETS.TRAIN",
        f"('{tiny_dataset}',)",
        "DATASETS.TEST",
        f"('{tiny_dataset}',)",
        "SOLVER.IMS_PER_BATCH",
        "2",
        "INPUT.MIN_SIZE_TRAIN",
        "(128,)",
        "INPUT.MIN_SIZE_TEST",
        "128",
        "DATALOADER.NUM_WORKERS",
        "0",
        "TEST.AUG.VIEWS",  # scored also with test-time augmentation, as the quickstart
        "2",
        "OUTPUT_DIR",
        str(out),
    ]
