"""The quickstart config builds its model (MobileNetV2 neck inputs, one class, enough queries for
dense crowns) and tools/ablate_loss.py builds the two loss variants for it."""

import os
import sys

import torch

from detectron2.config import get_cfg
from detectron2.modeling import build_model

from align_detr.config import add_align_detr_config
from model_utils import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))
import ablate_loss  # noqa: E402

QUICKSTART = os.path.join(ROOT, "configs", "quickstart", "align_mnv2_trees.yaml")


def quickstart_cfg(*opts):
    cfg = get_cfg()
    add_align_detr_config(cfg)
    cfg.merge_from_file(QUICKSTART)
    cfg.merge_from_list(list(opts))
    return cfg


def test_quickstart_config_builds():
    cfg = quickstart_cfg("MODEL.MOBILENET_V2.PRETRAINED", "False")
    c = cfg.MODEL.ALIGN_DETR
    assert c.LOSS.TYPE == "align" and list(c.LOSS.MATCH_K) == [2] * c.DECODER.NUM_LAYERS + [1]
    assert c.NUM_QUERIES >= 100 and c.NUM_SELECT >= 100 and c.NUM_CLASSES == 1
    assert cfg.INPUT.FORMAT == "RGB" and list(cfg.MODEL.PIXEL_MEAN) == [123.675, 116.28, 103.53]
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model([{"image": torch.zeros(3, 96, 128, dtype=torch.uint8)}])
    assert len(out[0]["instances"]) == c.NUM_SELECT


def test_ablation_variants():
    assert ablate_loss.num_decoder_layers(QUICKSTART) == 3
    v = ablate_loss.variants(3)
    assert v["align"] == [
        "MODEL.ALIGN_DETR.LOSS.TYPE",
        "align",
        "MODEL.ALIGN_DETR.LOSS.MATCH_K",
        "[2, 2, 2, 1]",
    ]
    assert v["focal"][1] == "focal" and v["focal"][3] == "[1, 1, 1, 1]"
    for opts in v.values():  # both are valid overrides of the config
        quickstart_cfg(*opts)
