"""Conditional DETR is detrex's: with their weights (their names, loaded through the
checkpointer) our outputs and losses equal those their code computed
(tests/data/golden_conditional_detr.pt, written by tools/make_equivalence_fixture.py)."""

import pytest
import torch
from helpers import (
    batched_differences_without_padding_mask,
    golden_fixture,
    golden_model,
    load_script,
)

from align_detr.formats import detect_format, from_ours, to_ours

check = load_script("tools/check_equivalence.py")
convert = load_script("tools/convert_checkpoint.py")

NAME = "golden_conditional_detr.pt"


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    return golden_model(NAME, tmp_path_factory)


@pytest.mark.parametrize("setting", ["single_0", "single_1"])
def test_inference_equals_theirs(golden, setting):
    data, model, _ = golden
    d = check.compare_inference(model, data, setting)
    assert d["labels_equal"] == 1.0
    assert d["scores"] < 1e-5 and d["boxes"] < 1e-4
    assert d["layer_logits"] < 1e-4 and d["layer_boxes"] < 1e-5
    assert d["reference"] < 1e-6


def test_batched_inference_equals_theirs_without_the_padding_mask(golden):
    # Their inference sets the whole padding mask to zeros (padding read as image).
    data, _, tmp = golden
    d = batched_differences_without_padding_mask(data, tmp)
    assert d["labels_equal"] == 1.0 and d["scores"] < 1e-5 and d["boxes"] < 1e-4
    assert d["layer_logits"] < 1e-4 and d["layer_boxes"] < 1e-5


def test_training_losses_equal_theirs(golden):
    data, model, _ = golden
    d = check.compare_losses(model, data)
    assert d["total"] < 1e-5
    assert all(v < 1e-5 for v in d.values()), d


def test_the_fixture_tells_the_decoder_padding_rules_apart(golden):
    # Their decoder attends the padded memory in training; masking it (the original Conditional
    # DETR, our default) changes the losses of the padded two-image batch.
    data, _, tmp = golden
    model = check.build_from_fixture(
        data, tmp, "MODEL.ALIGN_DETR.CONDITIONAL.DECODER_PADDING_MASK", "True"
    )
    assert check.compare_losses(model, data)["total"] > 1e-4


def test_checkpoint_is_detected_and_converts_both_ways(tmp_path):
    state = golden_fixture(NAME)["checkpoint"]["model"]
    assert detect_format(state) == "detrex-conditional"
    ours, fmt = to_ours(state)
    assert fmt == "detrex-conditional" and detect_format(ours) == "ours"
    assert "heads.class_heads.0.weight" in ours and "transformer.query_embed.weight" in ours
    back = from_ours(ours, "detrex-conditional")
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    # the command-line tool, both ways (the detrex project follows from the weights)
    src, mine, again = (str(tmp_path / n) for n in ("dx.pth", "ours.pth", "back.pth"))
    torch.save({"model": state}, src)
    assert convert.main([src, mine]) == 0
    assert convert.main([mine, again, "--to", "detrex"]) == 0
    restored = torch.load(again, weights_only=True)["model"]
    assert set(restored) == set(state)


def test_torchvision_backbone_names_of_the_dc5_models_map_to_detectron2():
    # detrex's DC5 configs use torchvision's ResNet (backbone.body.*)
    state = {
        "backbone.body.conv1.weight": torch.zeros(1),
        "backbone.body.bn1.running_var": torch.zeros(1),
        "backbone.body.layer4.2.bn3.weight": torch.zeros(1),
        "backbone.body.layer1.0.downsample.1.bias": torch.zeros(1),
        "backbone.body.layer1.0.bn1.num_batches_tracked": torch.zeros(1),
        "query_embed.weight": torch.zeros(1),
        "transformer.decoder.query_scale.layers.0.weight": torch.zeros(1),
    }
    ours, _ = to_ours(state)
    assert set(ours) == {
        "backbone.stem.conv1.weight",
        "backbone.stem.conv1.norm.running_var",
        "backbone.res5.2.conv3.norm.weight",
        "backbone.res2.0.shortcut.norm.bias",
        "transformer.query_embed.weight",
        "transformer.decoder.query_scale.layers.0.weight",
    }


def test_sd_detr_weights_do_not_convert_to_detrex(tmp_path):
    from detectron2.modeling import build_model
    from helpers import tiny_cfg

    model = build_model(
        tiny_cfg(
            "MODEL.ALIGN_DETR.BASE",
            "ConditionalDETR",
            "MODEL.ALIGN_DETR.NUM_FEATURE_LEVELS",
            "1",
            "MODEL.ALIGN_DETR.IN_FEATURES",
            "['res5']",
            "MODEL.ALIGN_DETR.DN.ENABLED",
            "False",
            "MODEL.ALIGN_DETR.DECODER.DECOUPLED",
            "True",
        )
    )
    with pytest.raises(ValueError, match="no detrex Conditional DETR name"):
        from_ours(model.state_dict(), "detrex-conditional")
