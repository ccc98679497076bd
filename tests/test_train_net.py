"""train_net.py end to end on CPU: a few training iterations on a COCO-format dataset written
to a temp dir, then --eval-only scoring the saved checkpoint with the real COCOEvaluator (also
with test-time augmentation, after training and with --eval-only)."""

import json
import os

from helpers import ROOT
from helpers import run_train_net as run


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
        "TEST.AUG.ENABLED",
        "True",
        "TEST.AUG.VIEWS",
        "4",
    ]
    run(common + opts)  # tiny_test.yaml: 4 iterations
    weights = os.path.join(out_dir, "model_final.pth")
    assert os.path.isfile(weights)
    with open(os.path.join(out_dir, "last_checkpoint")) as f:
        assert f.read().strip() == "model_final.pth"
    with open(os.path.join(out_dir, "metrics.json")) as f:
        last = [json.loads(line) for line in f][-1]
    assert {"bbox/AP50", "bbox_TTA/AP50"} <= set(last)  # both scored after training
    capsys.readouterr()

    res = run(common + ["--eval-only"] + opts + ["MODEL.WEIGHTS", weights])
    printed = capsys.readouterr().out
    assert "Average Precision  (AP) @[ IoU=0.50:0.95" in printed  # pycocotools' summary
    ap = res["bbox"]["AP"]
    assert 0.0 <= ap <= 100.0
    assert os.path.isfile(os.path.join(out_dir, "inference", "coco_instances_results.json"))
    assert 0.0 <= res["bbox_TTA"]["AP"] <= 100.0
    tta_results = os.path.join(out_dir, "inference_TTA", "coco_instances_results.json")
    assert os.path.isfile(tta_results)
