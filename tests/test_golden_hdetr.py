"""Our HDeformableDETR base is detrex's H-Deformable-DETR: with their weights (their names, loaded
through MODEL.WEIGHTS' path) our outputs and losses of both branches equal theirs, computed by
their code (tests/data/golden_h_deformable_detr.pt, tools/make_equivalence_fixture.py: the
two-stage "+ tricks" config shrunk to 30 + 150 queries, k 6). Also: their one-to-many matching
(GT repeated k times, Hungarian) against ours (k-to-one on the GT), and the checkpoint format."""

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
)

from align_detr.formats import detect_format
from align_detr.matching import HungarianMatcher, matching_cost

check = load_script("tools/check_equivalence.py")
convert = load_script("tools/convert_checkpoint.py")

NAME = "golden_h_deformable_detr.pt"


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    return golden_model(NAME, tmp_path_factory)


@pytest.mark.parametrize("setting", ["single_0", "single_1"])
def test_inference_equals_theirs(golden, setting):
    # per-layer logits / boxes of the 30 one-to-one queries, every encoder token's logits and
    # boxes, their top-100 after detector_postprocess
    data, model, _ = golden
    d = check.compare_inference(model, data, setting)
    assert d["labels_equal"] == 1.0
    assert d["scores"] < 1e-5 and d["boxes"] < 1e-4
    assert d["layer_logits"] < 1e-4 and d["layer_boxes"] < 1e-5
    assert d["enc_logits"] < 1e-4 and d["enc_boxes"] < 1e-5


def test_batched_inference_equals_theirs_without_the_padding_mask(golden):
    data, _, tmp = golden
    d = batched_differences_without_padding_mask(data, tmp)
    assert d["labels_equal"] == 1.0 and d["scores"] < 1e-5 and d["boxes"] < 1e-4
    assert d["layer_logits"] < 1e-4 and d["enc_logits"] < 1e-4


def test_training_losses_of_both_branches_equal_theirs(golden):
    data, model, _ = golden
    d = check.compare_losses(model, data)
    assert any(k.endswith("_one2many") for k in d) and "loss_class_enc" in d
    assert d["total"] < 1e-5
    assert all(v < 1e-5 for v in d.values()), d


def test_inference_builds_only_the_one_to_one_queries(golden):
    data, model, _ = golden
    seen = {}
    hook = model.transformer.decoder.register_forward_hook(lambda m, i, o: seen.update(q=i[0]))
    model.eval()
    try:
        with torch.no_grad():
            model(check.model_inputs(data)[:1])
    finally:
        hook.remove()
    assert seen["q"].cls.shape[1] == data["arch"]["num_queries_one2one"]


def test_one_to_many_matching_equals_their_repeated_gt_hungarian(golden):
    # Their one-to-many matcher sees every GT repeated k times; ours matches k queries to each
    # GT. On their recorded one-to-many outputs: the same queries, k per GT, the same total cost
    # (one pair of queries with equal boxes and labels ties between two GTs of the same class).
    data, _, _ = golden
    train, k = data["train"], data["arch"]["k_one2many"]
    outs, targets = train["criterion_outputs"], train["targets"]
    m = data["arch"]["matcher"]
    matcher = HungarianMatcher(
        m["cost_class"], m["cost_bbox"], m["cost_giou"], m["alpha"], m["gamma"]
    )
    final = {"pred_logits": outs["pred_logits_one2many"], "pred_boxes": outs["pred_boxes_one2many"]}
    # their record order: final, aux 0, enc (one-to-one), then final, aux 0 (one-to-many)
    theirs = train["matcher_indices"][3:]
    for out, their in zip([final, outs["aux_outputs_one2many"][0]], theirs):
        ours = matcher(out, targets, k=k)
        for b, ((q, g), (tq, tg), t) in enumerate(zip(ours, their, targets)):
            n = len(t["labels"])
            assert sorted(q.tolist()) == sorted(tq.tolist())
            assert torch.bincount(g, minlength=n).tolist() == [k] * n
            cost = matching_cost(
                out["pred_logits"][b : b + 1],
                out["pred_boxes"][b : b + 1],
                [t["labels"]],
                [t["boxes"]],
            )[0]
            assert torch.isclose(cost[q, g].sum(), cost[tq, tg % n].sum(), rtol=1e-6)


def test_checkpoint_format_and_conversion_both_ways(tmp_path):
    state = golden_fixture(NAME)["checkpoint"]["model"]
    assert detect_format(state) == "detrex-h-deformable"
    src = str(tmp_path / "detrex.pth")
    torch.save({"model": state}, src)
    ours, back = str(tmp_path / "ours.pth"), str(tmp_path / "back.pth")
    assert convert.main([src, ours]) == 0
    converted = torch.load(ours, weights_only=True)["model"]
    assert detect_format(converted) == "ours"
    assert "transformer.query_selector.content.embed.weight" in converted
    assert convert.main([ours, back, "--to", "detrex"]) == 0
    restored = torch.load(back, weights_only=True)["model"]
    assert set(restored) == set(state)
    assert all(torch.equal(restored[k], state[k]) for k in state)


def test_their_checkpoint_does_not_load_into_a_dino_model(golden, tmp_path):
    from align_detr.engine import AtomicCheckpointer, CheckpointLoadError

    data, _, _ = golden
    opts = check.config_opts(data["arch"]) + ["MODEL.ALIGN_DETR.BASE", "DINO"]
    model = build_model(
        check.load_config(os.path.join(ROOT, "configs", "Base-AlignDETR.yaml"), opts)
    )
    path = str(tmp_path / "hdetr.pth")
    torch.save(data["checkpoint"], path)
    with pytest.raises(CheckpointLoadError, match="H-Deformable-DETR"):
        AtomicCheckpointer(model, require_all=True).load(path)
