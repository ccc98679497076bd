"""H-Deformable-DETR base and Align-DETR on it: the hybrid self-attention mask, the one-to-many
targets, inference with the one-to-one queries only, the criterion of both branches (with and
without rank weights), the config checks and a tiny training step."""

import pytest
import torch
from detectron2.modeling import build_model
from helpers import batched_input, repo_cfg, synthetic_image, tiny_cfg

from align_detr.config import ConfigError, resolve_match_k
from align_detr.engine.solver import build_detr_optimizer
from align_detr.layers import box_cxcywh_to_xyxy, paired_iou_and_giou
from align_detr.losses import SetCriterion
from align_detr.losses.align import quality_target, rank_weights
from align_detr.matching import HungarianMatcher
from align_detr.modeling.bases import h_deformable
from align_detr.modeling.bases.h_deformable import hybrid_self_attn_mask

BOXES = ((20, 30, 70, 90), (80, 10, 120, 60))
K1, K2, K = 20, 40, 3  # one-to-one queries, one-to-many queries, GT copies

HDETR = (
    "MODEL.ALIGN_DETR.BASE",
    "HDeformableDETR",
    "MODEL.ALIGN_DETR.DN.ENABLED",
    "False",
    "MODEL.ALIGN_DETR.NUM_QUERIES",
    str(K1),
    "MODEL.ALIGN_DETR.HYBRID.NUM_QUERIES",
    str(K2),
    "MODEL.ALIGN_DETR.HYBRID.K",
    str(K),
    "MODEL.ALIGN_DETR.LOSS.CLASS_WEIGHT",
    "2.0",
)
ALIGN = (
    "MODEL.ALIGN_DETR.LOSS.TYPE",
    "align",
    "MODEL.ALIGN_DETR.LOSS.MATCH_K",
    "[2]",
    "MODEL.ALIGN_DETR.HYBRID.RANK_WEIGHTS",
    "True",
)


def batch():
    img = synthetic_image(boxes=BOXES)
    small = synthetic_image(96, 112, boxes=((10, 10, 50, 60),), seed=1)
    return [batched_input(img, BOXES, [0, 1]), batched_input(small, ((10, 10, 50, 60),), [1])]


def test_hybrid_mask_keeps_the_groups_apart():
    mask = hybrid_self_attn_mask(2, 5)
    want = torch.tensor(
        [
            [0, 0, 1, 1, 1],
            [0, 0, 1, 1, 1],
            [1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, want)


def test_one_to_one_queries_in_training_are_the_inference_queries(monkeypatch):
    # The mask makes the one-to-one group compute exactly what inference computes without the
    # one-to-many group; inference builds the one-to-one queries only.
    model = build_model(tiny_cfg(*HDETR))
    inputs = batch()[:1]
    seen = {}
    model.transformer.register_forward_hook(lambda m, i, o: seen.update(out=o))
    model.train()
    with torch.no_grad():
        model(inputs)
    train_out = seen["out"]
    assert len(train_out["one2many_layers"]) == 2
    assert train_out["one2many_layers"][0]["pred_logits"].shape[1] == K2
    model.eval()
    with torch.no_grad():
        results = model([{k: v for k, v in inputs[0].items() if k != "instances"}])
    eval_out = seen["out"]
    assert eval_out["one2many_layers"] is None
    for a, b in zip(train_out["layers"], eval_out["layers"]):
        assert a["pred_logits"].shape[1] == b["pred_logits"].shape[1] == K1
        assert torch.allclose(a["pred_logits"], b["pred_logits"], atol=1e-5)
        assert torch.allclose(a["pred_boxes"], b["pred_boxes"], atol=1e-6)
    assert len(results[0]["instances"]) == 10  # NUM_SELECT of tiny_test.yaml

    # without the mask the one-to-many queries would change the one-to-one ones
    model.train()
    monkeypatch.setattr(h_deformable, "hybrid_self_attn_mask", lambda *args: None)
    with torch.no_grad():
        model(inputs)
    leak = (seen["out"]["layers"][-1]["pred_logits"] - eval_out["layers"][-1]["pred_logits"]).abs()
    assert leak.max() > 1e-4


def _outputs(num_queries, num_classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "pred_logits": torch.randn(2, num_queries, num_classes, generator=g),
        "pred_boxes": torch.rand(2, num_queries, 4, generator=g) * 0.5 + 0.25,
    }


TARGETS = [
    {
        "labels": torch.tensor([0, 2]),
        "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.3], [0.6, 0.5, 0.3, 0.2]]),
    },
    {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
]


def _criterion(loss_type="focal", rank=False, match_k=(1, 1, 1)):
    return SetCriterion(
        num_classes=3,
        matcher=HungarianMatcher(),
        match_k=match_k,
        loss_type=loss_type,
        class_weight=2.0,
        dn_enabled=False,
        class_agnostic_enc=True,
        hybrid_k=K,
        hybrid_weight=1.0,
        hybrid_rank_weighted=rank,
    )


def _hybrid_outputs():
    return {
        "layers": [_outputs(K1, seed=1), _outputs(K1, seed=2)],
        "enc": _outputs(50, seed=3),
        "one2many_layers": [_outputs(K2, seed=4), _outputs(K2, seed=5)],
    }


def test_one_to_many_targets_are_every_gt_k_times_with_hungarian_matching():
    # H-DETR: repeat every GT k times, one-to-one Hungarian, normalise by the repeated count.
    # Ours: k queries per GT on the GT itself, normaliser k x GT: the same losses.
    crit, out = _criterion(), _hybrid_outputs()
    losses = crit(out, TARGETS)
    repeated = [
        {"labels": t["labels"].repeat(K), "boxes": t["boxes"].repeat(K, 1)} for t in TARGETS
    ]
    plain = _criterion()
    for suffix, o in (("_0", out["one2many_layers"][0]), ("", out["one2many_layers"][1])):
        indices = plain.matcher(o, repeated, k=1)
        assert [len(q) for q, _ in indices] == [K * len(t["labels"]) for t in TARGETS]
        norm = float(sum(len(t["labels"]) for t in repeated))
        want = plain.output_losses(o, repeated, indices, norm, rank_weighted=False)
        for name in ("class", "bbox", "giou"):
            got = losses[f"loss_{name}{suffix}_one2many"]
            assert torch.allclose(got, want[name], rtol=1e-5), (name, suffix)
        ours = crit.matcher(o, TARGETS, k=K)
        for (q, g), t in zip(ours, TARGETS):
            assert torch.bincount(g).tolist() == [K] * len(t["labels"])
            assert len(set(q.tolist())) == len(q)  # no query shared between GTs


def test_encoder_is_matched_class_agnostically_over_every_token():
    crit, out = _criterion(), _hybrid_outputs()
    losses = crit(out, TARGETS)
    agnostic = [dict(t, labels=torch.zeros_like(t["labels"])) for t in TARGETS]
    indices = crit.matcher(out["enc"], agnostic, k=1)
    want = crit.output_losses(out["enc"], agnostic, indices, 3.0, rank_weighted=False)
    assert torch.allclose(losses["loss_class_enc"], want["class"])
    assert set(losses) == {
        f"loss_{n}{s}" for n in ("class", "bbox", "giou") for s in ("", "_0", "_enc")
    } | {f"loss_{n}{s}_one2many" for n in ("class", "bbox", "giou") for s in ("", "_0")}


def test_align_on_hdetr_rank_weights_the_one_to_many_positives():
    out = _hybrid_outputs()
    crit = _criterion("align", rank=True, match_k=(2, 2, 1))
    losses = crit(out, TARGETS)
    unranked = _criterion("align", rank=False, match_k=(2, 2, 1))(out, TARGETS)
    # the one-to-one branch is the same with and without HYBRID.RANK_WEIGHTS
    for key in ("loss_class", "loss_bbox_0", "loss_giou_enc"):
        assert torch.equal(losses[key], unranked[key])
    # the one-to-many box terms are the rank-weighted sums, exp(-rank / tau) by quality
    o = out["one2many_layers"][-1]
    indices = crit.matcher(o, TARGETS, k=K)
    l1, total = 0.0, 0
    for b, ((q, g), t) in enumerate(zip(indices, TARGETS)):
        pred, gt = o["pred_boxes"][b, q], t["boxes"][g]
        iou, _ = paired_iou_and_giou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(gt))
        score = o["pred_logits"][b, q, t["labels"][g]].sigmoid()
        w = rank_weights(quality_target(score, iou, 0.25), g, 1.5)
        for j in range(len(t["labels"])):  # each GT's K positives: weights 1, e^-1/1.5, ...
            got = sorted(w[g == j].tolist(), reverse=True)
            assert got == pytest.approx([torch.tensor(-r / 1.5).exp().item() for r in range(K)])
        l1 = l1 + (w * (pred - gt).abs().sum(-1)).sum()
        total += len(t["labels"])
    assert torch.allclose(losses["loss_bbox_one2many"], 5.0 * l1 / (K * total), rtol=1e-5)
    assert losses["loss_bbox_one2many"] < unranked["loss_bbox_one2many"]


def test_configs_and_their_checks():
    base = repo_cfg("h_detr_r50_12ep.yaml")
    align = repo_cfg("align_h_detr_r50_12ep.yaml")
    for cfg in (base, align):
        a = cfg.MODEL.ALIGN_DETR
        assert (a.BASE, a.NUM_QUERIES, a.HYBRID.NUM_QUERIES, a.HYBRID.K) == (
            "HDeformableDETR",
            300,
            1500,
            6,
        )
        assert not a.DN.ENABLED and a.LOSS.CLASS_WEIGHT == 2.0
        assert (cfg.SOLVER.BASE_LR, cfg.SOLVER.LINEAR_PROJ_MULTIPLIER) == (2e-4, 0.1)
    assert resolve_match_k(base.MODEL.ALIGN_DETR.LOSS.MATCH_K, 7) == [1] * 7
    assert resolve_match_k(align.MODEL.ALIGN_DETR.LOSS.MATCH_K, 7) == [2] * 6 + [1]
    assert (
        align.MODEL.ALIGN_DETR.HYBRID.RANK_WEIGHTS and align.MODEL.ALIGN_DETR.LOSS.TYPE == "align"
    )
    quick = repo_cfg("quickstart/align_h_detr_mnv2_trees.yaml").MODEL.ALIGN_DETR
    assert (quick.BASE, quick.NUM_QUERIES, quick.HYBRID.NUM_QUERIES) == (
        "HDeformableDETR",
        150,
        750,
    )
    with pytest.raises(ConfigError, match="no denoising"):
        repo_cfg("h_detr_r50_12ep.yaml", "MODEL.ALIGN_DETR.DN.ENABLED", "True")
    with pytest.raises(ConfigError, match="HYBRID.K"):
        repo_cfg("h_detr_r50_12ep.yaml", "MODEL.ALIGN_DETR.HYBRID.K", "0")
    with pytest.raises(ConfigError, match="SD-DETR"):
        repo_cfg("h_detr_r50_12ep.yaml", "MODEL.ALIGN_DETR.DECODER.DECOUPLED", "True")


def test_sampling_offsets_get_the_linear_projection_lr():
    cfg = tiny_cfg(*HDETR, "SOLVER.BASE_LR", "2e-4", "SOLVER.LINEAR_PROJ_MULTIPLIER", "0.1")
    model = build_model(cfg)
    opt = build_detr_optimizer(cfg, model)
    lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        want = 2e-5 if ("sampling_offsets" in name or "backbone" in name) else 2e-4
        assert lr[id(p)] == pytest.approx(want), name


@pytest.mark.parametrize("align", [False, True], ids=["h_detr", "align_h_detr"])
def test_tiny_training_step(align):
    cfg = tiny_cfg(*HDETR, *(ALIGN if align else ()))
    model = build_model(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    losses = model(batch())
    assert all(torch.isfinite(v) for v in losses.values())
    assert "loss_class_one2many" in losses and "loss_giou_0_one2many" in losses
    assert not any("dn" in k for k in losses)
    opt.zero_grad()
    sum(losses.values()).backward()
    embed = model.transformer.query_selector.content.embed.weight.grad
    # both query groups learn (their content embeddings get gradients)
    assert embed[:K1].abs().sum() > 0 and embed[K1:].abs().sum() > 0
    opt.step()
    model.eval()
    with torch.no_grad():
        inst = model([batched_input(synthetic_image())])[0]["instances"]
    assert len(inst) == 10
