"""Our model is the published model: with the official Align-DETR / detrex DINO weights (their
names, loaded through MODEL.WEIGHTS' path) our outputs and losses equal theirs, computed by their
code (tests/data/golden_*.pt, written by tools/make_equivalence_fixture.py). Also: the loading
rules for foreign and mismatched checkpoints, and tools/convert_checkpoint.py."""

import logging
import os

import pytest
import torch
from detectron2.modeling import build_model
from helpers import (
    ROOT,
    batched_differences_without_padding_mask,
    golden_fixture,
    golden_model,
    load_script,
    tiny_cfg,
)

from align_detr.engine import AtomicCheckpointer, CheckpointLoadError
from align_detr.formats import detect_format

check = load_script("tools/check_equivalence.py")
convert = load_script("tools/convert_checkpoint.py")

FIXTURES = ["golden_aligndetr.pt", "golden_dino.pt"]


@pytest.fixture(scope="module", params=FIXTURES)
def golden(request, tmp_path_factory):
    return golden_model(request.param, tmp_path_factory)


@pytest.mark.parametrize("setting", ["single_0", "single_1"])
def test_inference_equals_theirs(golden, setting):
    data, model, _ = golden
    d = check.compare_inference(model, data, setting)
    assert d["labels_equal"] == 1.0
    assert d["scores"] < 1e-5 and d["boxes"] < 1e-4
    assert d["layer_logits"] < 1e-4 and d["layer_boxes"] < 1e-5
    assert d["enc_logits"] < 1e-4 and d["enc_boxes"] < 1e-5


def test_batched_inference_equals_theirs_without_the_padding_mask(golden):
    # Their code treats the padding of a batch as image at inference; TEST_PADDING_MASK False
    # reproduces that (ours masks it by default, so an image's detections do not depend on the
    # batch it is in).
    data, _, tmp = golden
    d = batched_differences_without_padding_mask(data, tmp)
    assert d["labels_equal"] == 1.0 and d["scores"] < 1e-5 and d["boxes"] < 1e-4


def test_training_losses_equal_theirs(golden):
    data, model, _ = golden
    d = check.compare_losses(model, data)
    assert d["total"] < 1e-5
    assert all(v < 1e-5 for v in d.values()), d


def test_the_fixture_tells_the_two_stage_selection_rules_apart(tmp_path):
    # Their top-k picks padding / off-image tokens in image 0; never picking them changes the
    # detections, so a model with the masked rule cannot pass the tests above.
    data = golden_fixture("golden_aligndetr.pt")
    model = check.build_from_fixture(
        data, str(tmp_path), "MODEL.ALIGN_DETR.TWO_STAGE_SELECTION", "valid"
    )
    assert check.compare_inference(model, data, "single_0")["scores"] > 1e-3


# ---- loading rules ----------------------------------------------------------------------------


def _save(tmp_path, state, name="ckpt.pth"):
    path = str(tmp_path / name)
    torch.save({"model": state}, path)
    return path


def test_official_checkpoint_is_detected_and_converted_with_one_log_line(tmp_path, caplog):
    data = golden_fixture("golden_aligndetr.pt")
    assert detect_format(data["checkpoint"]["model"]) == "detrex-dino"
    model = build_model(
        check.load_config(
            os.path.join(ROOT, "configs", "Base-AlignDETR.yaml"), check.config_opts(data["arch"])
        )
    )
    with caplog.at_level(logging.INFO):
        AtomicCheckpointer(model, require_all=True).load(
            _save(tmp_path, data["checkpoint"]["model"])
        )
    assert (
        "converted to this project's names" in caplog.text and "nothing is missing" in caplog.text
    )


def test_mismatched_detection_checkpoint_is_refused(tmp_path):
    data = golden_fixture("golden_aligndetr.pt")
    # Their checkpoint into a model of another config (3 decoder layers instead of 2).
    opts = check.config_opts(data["arch"])
    opts += ["MODEL.ALIGN_DETR.DECODER.NUM_LAYERS", "3", "MODEL.ALIGN_DETR.LOSS.MATCH_K", "[2]"]
    model = build_model(
        check.load_config(os.path.join(ROOT, "configs", "Base-AlignDETR.yaml"), opts)
    )
    with pytest.raises(CheckpointLoadError, match=r"looks like detrex DINO .* unloaded, e\.g\."):
        AtomicCheckpointer(model).load(_save(tmp_path, data["checkpoint"]["model"]))
    # A file whose names match nothing but the backbone: not a silent backbone-only load.
    state = {
        k.replace("transformer.", "xformer."): v
        for k, v in build_model(tiny_cfg()).state_dict().items()
    }
    state["heads.class_heads.0.weight"] = torch.zeros(80, 32)
    with pytest.raises(CheckpointLoadError, match="unloaded"):
        AtomicCheckpointer(build_model(tiny_cfg())).load(_save(tmp_path, state, "renamed.pth"))


def test_backbone_checkpoint_is_an_initialisation(tmp_path):
    model = build_model(tiny_cfg())
    backbone = {k: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    other = build_model(tiny_cfg())
    AtomicCheckpointer(other).load(_save(tmp_path, backbone))
    for k, v in backbone.items():
        assert torch.equal(other.state_dict()[k], v)
    with pytest.raises(CheckpointLoadError, match="evaluating needs every weight"):
        AtomicCheckpointer(other, require_all=True).load(_save(tmp_path, backbone))


def test_other_class_count_fine_tunes_but_cannot_be_evaluated(tmp_path, caplog):
    coco = build_model(tiny_cfg())  # 80 classes
    path = _save(tmp_path, coco.state_dict())
    mine = build_model(tiny_cfg("MODEL.ALIGN_DETR.NUM_CLASSES", "3"))
    before = mine.heads.class_heads[0].weight.detach().clone()
    with caplog.at_level(logging.WARNING):
        AtomicCheckpointer(mine).load(path)
    assert "another number of classes" in caplog.text and "fine-tuning" in caplog.text
    assert torch.equal(mine.heads.class_heads[0].weight, before)
    assert torch.equal(mine.neck.lateral[0][0].weight, coco.neck.lateral[0][0].weight)
    with pytest.raises(CheckpointLoadError, match="another number of classes"):
        AtomicCheckpointer(mine, require_all=True).load(path)


def test_convert_checkpoint_both_ways(tmp_path):
    state = golden_fixture("golden_dino.pt")["checkpoint"]["model"]
    src = _save(tmp_path, state, "detrex.pth")
    ours, back = str(tmp_path / "ours.pth"), str(tmp_path / "back.pth")
    assert convert.main([src, ours]) == 0
    converted = torch.load(ours, weights_only=True)["model"]
    assert detect_format(converted) == "ours" and "heads.class_heads.0.weight" in converted
    assert converted["transformer.denoising.label_embed.weight"].shape[0] == 5  # C + 1
    assert convert.main([ours, back, "--to", "detrex"]) == 0
    restored = torch.load(back, weights_only=True)["model"]
    assert set(restored) == set(state)
    assert all(torch.equal(restored[k], state[k]) for k in state)
    assert convert.main([ours, str(tmp_path / "x.pth")]) == 2  # already ours
