"""The Conditional DETR base: its conditional attention layers, shapes and gradients, padding,
its configs, and a training step through the real trainer."""

import pytest
import torch
from detectron2.modeling import build_model
from helpers import batched_input, repo_cfg, synthetic_image, train_then_evaluate

from align_detr.modeling.conditional_layers import (
    ConditionalCrossAttention,
    ConditionalSelfAttention,
    SingleScaleMemory,
)

BOXES = ((20, 30, 70, 90), (80, 10, 120, 60))


def cond_cfg(*opts):
    return repo_cfg("tiny_cond_test.yaml", *opts)


def memory_of(x, pos, mask=None):
    """The memory fields conditional cross-attention reads."""
    return SingleScaleMemory(x, mask, None, None, None, None, pos=pos, decoder_mask=mask)


def naive_cross_attention(attn, x, query_pos, spatial, mem, pos):
    """Loop over heads: logits = (q_c . k_c + q_s . k_p) / sqrt(2c)."""
    h = attn.n_heads
    qc = attn.query_content_proj(x)
    kc = attn.key_content_proj(mem)
    kp = attn.key_pos_proj(pos)
    if attn.first_layer:
        qc = qc + attn.query_pos_proj(query_pos)
        kc = kc + kp
    qs = attn.query_pos_sine_proj(spatial)
    v = attn.value_proj(mem)
    c = qc.shape[-1] // h
    outs = []
    for i in range(h):
        sl = slice(i * c, (i + 1) * c)
        logits = qc[..., sl] @ kc[..., sl].transpose(1, 2) + qs[..., sl] @ kp[..., sl].transpose(
            1, 2
        )
        outs.append((logits / (2 * c) ** 0.5).softmax(-1) @ v[..., sl])
    return attn.out_proj(torch.cat(outs, -1))


@pytest.mark.parametrize("first", [True, False])
def test_conditional_cross_attention_concatenates_content_and_space_per_head(first):
    torch.manual_seed(0)
    attn = ConditionalCrossAttention(16, 4, first_layer=first).eval()
    assert (attn.query_pos_proj is not None) == first  # only the first layer has it
    x, qp, sp = torch.randn(2, 5, 16), torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    mem, pos = torch.randn(2, 12, 16), torch.randn(2, 12, 16)
    out = attn(x, qp, sp, memory_of(mem, pos))
    torch.testing.assert_close(out, naive_cross_attention(attn, x, qp, sp, mem, pos))
    if not first:  # later layers read the query position only through the spatial query
        torch.testing.assert_close(out, attn(x, qp * 0, sp, memory_of(mem, pos)))


def test_conditional_cross_attention_ignores_masked_memory():
    torch.manual_seed(0)
    attn = ConditionalCrossAttention(16, 2).eval()
    x, sp = torch.randn(1, 3, 16), torch.randn(1, 3, 16)
    mem, pos = torch.randn(1, 8, 16), torch.randn(1, 8, 16)
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[:, 6:] = True
    out = attn(x, sp, sp, memory_of(mem, pos, mask))
    mem2 = mem.clone()
    mem2[:, 6:] = 100.0
    torch.testing.assert_close(out, attn(x, sp, sp, memory_of(mem2, pos, mask)))
    assert not torch.allclose(out, attn(x, sp, sp, memory_of(mem2, pos, None)))


def test_conditional_self_attention_projects_content_and_position_apart():
    torch.manual_seed(0)
    attn = ConditionalSelfAttention(16, 2).eval()
    x, pos = torch.randn(1, 4, 16), torch.randn(1, 4, 16)
    q = attn.query_content_proj(x) + attn.query_pos_proj(pos)
    k = attn.key_content_proj(x) + attn.key_pos_proj(pos)
    v = attn.value_proj(x)
    heads = []
    for i in range(2):
        sl = slice(8 * i, 8 * (i + 1))
        heads.append((q[..., sl] @ k[..., sl].transpose(1, 2) / 8**0.5).softmax(-1) @ v[..., sl])
    torch.testing.assert_close(attn(x, pos), attn.out_proj(torch.cat(heads, -1)))


def test_outputs_losses_and_gradients():
    model = build_model(cond_cfg("MODEL.ALIGN_DETR.NUM_CLASSES", "2")).train()
    img = synthetic_image(boxes=BOXES)
    seen = {}
    hook = model.transformer.register_forward_hook(lambda m, i, o: seen.update(out=o))
    losses = model([batched_input(img, BOXES, [0, 1]), batched_input(img[:96])])
    hook.remove()
    # every decoder layer, no encoder output, no denoising
    assert set(losses) == {f"loss_{k}{s}" for k in ("class", "bbox", "giou") for s in ("", "_0")}
    layers = seen["out"]["layers"]
    assert len(layers) == 2 and seen["out"]["enc"] is None
    assert layers[0]["pred_logits"].shape == (2, 20, 2) and layers[1]["pred_boxes"].shape == (
        2,
        20,
        4,
    )
    assert seen["out"]["reference"].shape == (2, 20, 2)
    sum(losses.values()).backward()
    t = model.transformer
    for p in (
        t.query_embed.weight,
        t.decoder.ref_point_head.layers[0].weight,
        t.decoder.query_scale.layers[0].weight,
        t.decoder.layers[1].cross.attn.query_pos_sine_proj.weight,
        t.encoder.layers[0].self_attn.in_proj_weight,
        model.neck.proj.weight,
        model.heads.class_heads[0].weight,
    ):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert len(model.heads.class_heads) == 1  # shared by every layer
    model.eval()
    with torch.no_grad():
        inst = model([batched_input(img)])[0]["instances"]
    assert len(inst) == 10  # NUM_SELECT of tiny_test.yaml


def transformer_alone_and_padded(model, seed=0):
    """The transformer's outputs for an image's features alone (4 x 4) and as image 0 of a
    padded batch (6 x 8, garbage in the padding); the position encodings from the masks."""
    g = torch.Generator().manual_seed(seed)
    d = model.heads.class_heads[0].in_features
    small = torch.randn(1, d, 4, 4, generator=g)
    big = torch.randn(2, d, 6, 8, generator=g) * 3.0
    big[0, :, :4, :4] = small[0]
    mask_small = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask_big = torch.ones(2, 6, 8, dtype=torch.bool)
    mask_big[0, :4, :4] = False
    mask_big[1] = False
    outs = []
    for src, mask in ((small, mask_small), (big, mask_big)):
        pos = model.position_embedding(mask)
        with torch.no_grad():
            outs.append(model.transformer([src], [mask], [pos], model.heads))
    return outs


def test_an_image_gets_the_same_outputs_alone_and_in_a_padded_batch():
    # (On whole images the backbone's convolutions see the batch padding; from the features on,
    # the padding is masked.)
    torch.manual_seed(0)
    model = build_model(cond_cfg()).eval()
    alone, batch = transformer_alone_and_padded(model)
    for a, b in zip(alone["layers"], batch["layers"]):
        torch.testing.assert_close(a["pred_logits"][0], b["pred_logits"][0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a["pred_boxes"][0], b["pred_boxes"][0], atol=1e-5, rtol=1e-4)


def test_dc5_doubles_the_resolution_of_the_memory():
    seen = []
    for dilation in ("1", "2"):
        # a slim R50 (detectron2 dilates only R50 and deeper)
        slim = ["MODEL.RESNETS.DEPTH", "50", "MODEL.RESNETS.RES2_OUT_CHANNELS", "16"]
        slim += ["MODEL.RESNETS.STEM_OUT_CHANNELS", "8", "MODEL.RESNETS.WIDTH_PER_GROUP", "4"]
        model = build_model(cond_cfg(*slim, "MODEL.RESNETS.RES5_DILATION", dilation)).eval()
        hook = model.neck.register_forward_hook(lambda m, i, o: seen.append(o[0].shape[-2:]))
        with torch.no_grad():
            model([batched_input(synthetic_image(128, 128))])
        hook.remove()
    assert tuple(seen[0]) == (4, 4) and tuple(seen[1]) == (8, 8)


@pytest.mark.parametrize(
    "name, params_m",
    [("cond_detr_r50_50ep.yaml", 43.42), ("sd_cond_detr_r50_50ep.yaml", 54.48)],
)
def test_full_size_configs_build(name, params_m):
    cfg = repo_cfg(name, "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "")
    model = build_model(cfg)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - params_m) < 0.01, n


def test_configs_are_the_recipe():
    cfg = repo_cfg("cond_detr_r50_50ep.yaml")
    a, s = cfg.MODEL.ALIGN_DETR, cfg.SOLVER
    assert (a.BASE, a.NUM_QUERIES, a.NUM_SELECT, a.NUM_FEATURE_LEVELS) == (
        "ConditionalDETR",
        300,
        100,
        1,
    )
    assert (a.LOSS.CLASS_WEIGHT, a.LOSS.BBOX_WEIGHT, a.LOSS.GIOU_WEIGHT) == (2.0, 5.0, 2.0)
    assert (a.MATCHER.COST_CLASS, a.MATCHER.COST_BBOX, a.MATCHER.COST_GIOU) == (2.0, 5.0, 2.0)
    assert (s.BASE_LR, s.BACKBONE_MULTIPLIER, s.WEIGHT_DECAY, s.IMS_PER_BATCH) == (
        1e-4,
        0.1,
        1e-4,
        16,
    )
    assert s.CLIP_GRADIENTS.ENABLED and s.CLIP_GRADIENTS.CLIP_VALUE == 0.1
    assert s.STEPS[0] / s.MAX_ITER == 40 / 50 and s.MAX_ITER == 50 * 7500
    assert repo_cfg("cond_detr_r50_dc5_50ep.yaml").MODEL.RESNETS.RES5_DILATION == 2
    sd = repo_cfg("sd_cond_detr_r50_50ep.yaml").MODEL.ALIGN_DETR
    assert sd.DECODER.DECOUPLED and sd.DECODER.TASK_AWARE_QUERIES and sd.LOSS.TYPE == "tal"
    ladder = [
        repo_cfg(f"sd_cond_ladder_{n}.yaml").MODEL.ALIGN_DETR
        for n in ("1_base", "2_decoupled", "3_task_aware", "4_tal")
    ]
    assert [c.DECODER.DECOUPLED for c in ladder] == [False, True, True, True]
    assert [c.DECODER.TASK_AWARE_QUERIES for c in ladder] == [False, False, True, True]
    assert [c.LOSS.TYPE for c in ladder] == ["focal", "focal", "focal", "tal"]
    assert ladder[3] == sd


def test_bad_conditional_configs_are_reported():
    from align_detr.config import ConfigError

    with pytest.raises(ConfigError, match="DN.ENABLED must be False"):
        cond_cfg("MODEL.ALIGN_DETR.DN.ENABLED", "True")
    with pytest.raises(ConfigError, match="NUM_FEATURE_LEVELS must be 1"):
        cond_cfg("MODEL.ALIGN_DETR.NUM_FEATURE_LEVELS", "2")


SD_OPTS = [
    "MODEL.ALIGN_DETR.DECODER.DECOUPLED",
    "True",
    "MODEL.ALIGN_DETR.DECODER.TASK_AWARE_QUERIES",
    "True",
    "MODEL.ALIGN_DETR.DECODER.TASK_AWARE_POINT_PREDICTOR",
    "roi",
    "MODEL.ALIGN_DETR.DECODER.STREAM_POSITIONS",
    "True",
    "MODEL.ALIGN_DETR.DECODER.STREAM_EMBED",
    "True",
    "MODEL.ALIGN_DETR.LOSS.TYPE",
    "tal",
]


@pytest.mark.parametrize("sd", [False, True], ids=["conditional", "sd_conditional"])
def test_trains_and_evaluates_through_train_net(tiny_dataset, tmp_path, sd):
    opts = SD_OPTS if sd else []
    res = train_then_evaluate("tiny_cond_test.yaml", tiny_dataset, str(tmp_path / "out"), opts)
    assert 0.0 <= res["bbox"]["AP"] <= 100.0
