"""SD-DETR made whole, on both bases: the task-aware query generator samples where it should
in padded batches, per-stream positions and references, the Eq. 5 RoIAlign point predictor, the
stream embedding, Table 3's split decoder; shapes and gradients of both streams."""

import pytest
import torch
from detectron2.modeling import build_model
from helpers import batched_input, repo_cfg, sgd_steps, synthetic_image, tiny_cfg

from align_detr.modeling import Streams
from align_detr.modeling.decoder import SelfAttentionBlock
from align_detr.modeling.decoupled import DecoupledDecoderLayer
from align_detr.modeling.encoder import EncoderMemory, valid_ratios_of
from align_detr.modeling.task_aware import TaskAwareQueryGenerator

BOXES = ((20, 30, 70, 90), (80, 10, 120, 60))
D = "MODEL.ALIGN_DETR.DECODER."
SD = [D + "DECOUPLED", "True", D + "TASK_AWARE_QUERIES", "True"]
WHOLE = SD + [D + "STREAM_POSITIONS", "True", D + "STREAM_EMBED", "True"]


def cfg_of(base, *opts):
    if base == "DINO":
        return tiny_cfg(*opts)
    return repo_cfg("tiny_cond_test.yaml", *opts)


# ---- the generator in a padded batch ------------------------------------------------------------


def memories(shapes, padded, d=8, seed=0):
    """The same image's memory alone (level sizes ``shapes``) and as image 0 of a batch whose
    levels are ``padded`` (garbage in the padding; image 1 fills its map)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for sizes, n in ((shapes, 1), (padded, 2)):
        masks = []
        for (h, w), (H, W) in zip(shapes, sizes):
            m = torch.zeros(n, H, W, dtype=torch.bool)
            m[0] = True
            m[0, :h, :w] = False
            masks.append(m)
        out.append(masks)
    feats = [torch.randn(1, d, h, w, generator=g) for h, w in shapes]
    mems = []
    for masks, sizes in zip(out, (shapes, padded)):
        n = masks[0].shape[0]
        levels = []
        for f, (H, W), m in zip(feats, sizes, masks):
            x = torch.randn(n, d, H, W, generator=g) * 5.0
            x[0, :, : f.shape[2], : f.shape[3]] = f[0]
            levels.append(x.flatten(2).transpose(1, 2))
        starts = [0]
        for h, w in sizes[:-1]:
            starts.append(starts[-1] + h * w)
        mems.append(
            EncoderMemory(
                torch.cat(levels, 1),
                torch.cat([m.flatten(1) for m in masks], 1),
                torch.as_tensor(sizes, dtype=torch.long),
                torch.as_tensor(starts, dtype=torch.long),
                valid_ratios_of(masks),
                list(sizes),
            )
        )
    return mems


@pytest.mark.parametrize("predictor", ["token", "roi"])
def test_generator_samples_an_image_alike_alone_and_in_a_padded_batch(predictor):
    # Fails without the valid-ratio scaling of the sampling points (the op reads 0..1 as the
    # padded map) and without zeroing the padding's memory.
    torch.manual_seed(0)
    gen = TaskAwareQueryGenerator(8, 2, 4, predictor, roi_level=0).eval()
    for head in gen.point_heads:  # points away from the box centre
        last = head.mlp.layers[-1] if predictor == "roi" else head.layers[-1]
        torch.nn.init.normal_(last.weight, std=0.5)
    alone, batch = memories([(6, 6), (3, 3)], [(10, 12), (5, 6)])
    boxes = torch.tensor([[[0.5, 0.5, 0.4, 0.6], [0.8, 0.3, 0.5, 0.5], [0.15, 0.9, 0.3, 0.4]]])
    tokens = torch.randn(1, 3, 8)
    with torch.no_grad():
        a, a_pts = gen(alone, boxes, tokens)
        b, b_pts = gen(batch, torch.cat([boxes, boxes.flip(1)]), torch.cat([tokens, tokens]))
    for x, y in ((a.cls, b.cls[:1]), (a.loc, b.loc[:1]), (a_pts.cls, b_pts.cls[:1])):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a_pts.cls, a_pts.loc)  # the streams' own points


def transformer_outputs(model, shapes, padded, seed=0):
    """The transformer's outputs for features alone and as image 0 of a padded batch."""
    g = torch.Generator().manual_seed(seed)
    d = model.heads.class_heads[0].in_features
    outs = []
    feats = [torch.randn(1, d, h, w, generator=g) for h, w in shapes]
    for sizes, n in ((shapes, 1), (padded, 2)):
        srcs, masks = [], []
        for f, (H, W) in zip(feats, sizes):
            x = torch.randn(n, d, H, W, generator=g) * 3.0
            x[0, :, : f.shape[2], : f.shape[3]] = f[0]
            m = torch.zeros(n, H, W, dtype=torch.bool)
            m[0] = True
            m[0, : f.shape[2], : f.shape[3]] = False
            srcs.append(x)
            masks.append(m)
        pos = [model.position_embedding(m) for m in masks]
        with torch.no_grad():
            outs.append(model.transformer(srcs, masks, pos, model.heads))
    return outs


@pytest.mark.parametrize("base", ["DINO", "ConditionalDETR"])
def test_task_aware_queries_of_an_image_do_not_depend_on_the_padded_batch(base):
    torch.manual_seed(0)
    opts = WHOLE + [D + "TASK_AWARE_POINT_PREDICTOR", "roi", "MODEL.ALIGN_DETR.NUM_QUERIES", "8"]
    opts += ["MODEL.ALIGN_DETR.TWO_STAGE_SELECTION", "valid"]
    model = build_model(cfg_of(base, *opts)).eval()
    generator = model.transformer.query_selector.content
    for head in generator.point_heads:
        torch.nn.init.normal_(head.mlp.layers[-1].weight, std=0.5)
    seen = []
    hook = generator.register_forward_hook(lambda m, i, o: seen.append(o))
    if base == "DINO":
        shapes, padded = [(8, 8), (4, 4), (2, 2), (1, 1)], [(12, 16), (6, 8), (3, 4), (2, 2)]
    else:
        shapes, padded = [(4, 4)], [(6, 8)]
    alone, batch = transformer_outputs(model, shapes, padded)
    hook.remove()
    torch.testing.assert_close(alone["enc"]["pred_boxes"][0], batch["enc"]["pred_boxes"][0])
    (content_a, points_a), (content_b, points_b) = seen
    for x, y in zip((content_a, points_a), (content_b, points_b)):
        torch.testing.assert_close(x.cls[0], y.cls[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(x.loc[0], y.loc[0], atol=1e-5, rtol=1e-4)
    if base == "ConditionalDETR":
        # the whole model too (DINO's decoder is not batch-independent by design: its query
        # positions embed reference boxes scaled by the batch's valid ratios, as released)
        for a, b in zip(alone["layers"], batch["layers"]):
            torch.testing.assert_close(
                a["pred_logits"][0], b["pred_logits"][0], atol=1e-4, rtol=1e-4
            )
            torch.testing.assert_close(a["pred_boxes"][0], b["pred_boxes"][0], atol=1e-5, rtol=1e-4)


# ---- both streams, both bases -------------------------------------------------------------------


@pytest.mark.parametrize("base", ["DINO", "ConditionalDETR"])
@pytest.mark.parametrize("predictor", ["token", "roi"])
def test_both_streams_train_on_both_bases(base, predictor):
    torch.manual_seed(0)
    opts = WHOLE + [
        D + "TASK_AWARE_POINT_PREDICTOR",
        predictor,
        "MODEL.ALIGN_DETR.LOSS.TYPE",
        "tal",
    ]
    model = build_model(cfg_of(base, *opts, "MODEL.ALIGN_DETR.NUM_CLASSES", "2")).train()
    img = synthetic_image(boxes=BOXES)
    batch = [batched_input(img, BOXES, [0, 1]), batched_input(img[:96, :112], BOXES[:1], [1])]
    seen = {}
    hook = model.transformer.register_forward_hook(lambda m, i, o: seen.update(out=o))
    losses = sgd_steps(model, batch)  # opens the localisation path (zero-initialised box heads)
    hook.remove()
    assert "loss_class_enc" in losses  # the mini-detector / encoder proposals are supervised
    k = seen["out"]["enc"]["pred_logits"].shape[1]  # top-K, at most the encoder's tokens
    last = seen["out"]["layers"][-1]
    assert last["pred_logits"].shape[1:] == (k, 2) and last["pred_boxes"].shape[1:] == (k, 4)
    sum(model(batch).values()).backward()
    t = model.transformer
    for layer in t.decoder.layers:
        for block in (layer.cross_cls, layer.cross_loc):
            grads = [p.grad for p in block.parameters() if p.grad is not None]
            assert grads and all(torch.isfinite(g).all() for g in grads)
            assert sum(g.abs().sum() for g in grads) > 0
    for head in t.query_selector.content.point_heads:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert t.stream_embed.weight.grad.abs().sum() > 0
    if base == "DINO":
        assert t.decoder.ref_point_head_cls.layers[0].weight.grad.abs().sum() > 0
    else:
        assert t.query_pos_head.layers[0].weight.grad.abs().sum() > 0
        assert t.decoder.query_scale_loc.layers[0].weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        inst = model([batched_input(img)])[0]["instances"]
    assert len(inst) == 10


@pytest.mark.parametrize("base", ["DINO", "ConditionalDETR"])
def test_decoupled_without_task_aware_queries(base):
    opts = [D + "DECOUPLED", "True", D + "STREAM_EMBED", "True"]
    model = build_model(cfg_of(base, *opts)).train()
    img = synthetic_image(boxes=BOXES)
    losses = model([batched_input(img, BOXES, [0, 1])])
    sum(losses.values()).backward()
    for layer in model.transformer.decoder.layers:
        assert layer.cross_cls.ffn.linear1.weight.grad.abs().sum() > 0


def test_stream_embedding_tells_the_streams_apart_from_the_first_layer():
    # Conditional DETR's content starts at zero: without the embedding both streams' first
    # self-attention inputs are equal.
    torch.manual_seed(0)
    outs = {}
    for embed in ("False", "True"):
        model = build_model(
            cfg_of("ConditionalDETR", D + "DECOUPLED", "True", D + "STREAM_EMBED", embed)
        ).eval()
        seen = {}
        layer = model.transformer.decoder.layers[0]
        hook = layer.self_attn.register_forward_hook(lambda m, i, o: seen.update(x=i[0]))
        with torch.no_grad():
            model([batched_input(synthetic_image())])
        hook.remove()
        n = seen["x"].shape[1] // 2
        outs[embed] = (seen["x"][:, :n] - seen["x"][:, n:]).abs().max()
    assert outs["False"] == 0 and outs["True"] > 0.01


def test_split_decoder_keeps_the_streams_apart():
    blocks = dict(make_cross_block=lambda: IdentityCross())

    torch.manual_seed(0)
    shared = DecoupledDecoderLayer(lambda: SelfAttentionBlock(16, 2), **blocks).eval()
    split = DecoupledDecoderLayer(lambda: SelfAttentionBlock(16, 2), split_self_attn=True, **blocks)
    split.eval()
    assert split.self_attn_loc is not None and shared.self_attn_loc is None
    q_cls, q_loc, pos = torch.randn(1, 4, 16), torch.randn(1, 4, 16), torch.randn(1, 4, 16)
    for layer, interacts in ((shared, True), (split, False)):
        a = layer(Streams(q_cls, q_loc), pos, None, None)
        b = layer(Streams(q_cls, q_loc + 1.0), pos, None, None)
        assert (a.cls - b.cls).abs().max() > 1e-4 if interacts else torch.equal(a.cls, b.cls)


class IdentityCross(torch.nn.Module):
    def forward(self, x, query_pos, reference_points, memory):
        return x


def test_split_decoder_has_one_self_attention_per_stream():
    def count(m):
        return sum(p.numel() for p in m.parameters())

    base = [D + "DECOUPLED", "True"]
    for name in ("DINO", "ConditionalDETR"):
        a = build_model(cfg_of(name, *base))
        b = build_model(cfg_of(name, *base, D + "SPLIT_SELF_ATTN", "True"))
        per_layer = count(a.transformer.decoder.layers[0].self_attn)
        assert count(b) - count(a) == 2 * per_layer  # 2 decoder layers


def test_per_stream_references_on_dino():
    # The classification stream is re-centred on its points (its own reference box and
    # positional query), the localisation stream keeps the proposal.
    torch.manual_seed(0)
    model = build_model(cfg_of("DINO", *WHOLE, "MODEL.ALIGN_DETR.DN.ENABLED", "False")).eval()
    for head in model.transformer.query_selector.content.point_heads:
        torch.nn.init.normal_(head.layers[-1].weight, std=0.5)
    seen = []
    layer = model.transformer.decoder.layers[0]
    hooks = [
        layer.cross_cls.register_forward_hook(lambda m, i, o: seen.append(("cls", i[1], i[2]))),
        layer.cross_loc.register_forward_hook(lambda m, i, o: seen.append(("loc", i[1], i[2]))),
    ]
    with torch.no_grad():
        model([batched_input(synthetic_image())])
    for h in hooks:
        h.remove()
    (_, pos_cls, ref_cls), (_, pos_loc, ref_loc) = seen
    assert not torch.allclose(pos_cls, pos_loc)
    assert not torch.allclose(ref_cls[..., :2], ref_loc[..., :2])
    torch.testing.assert_close(ref_cls[..., 2:], ref_loc[..., 2:])  # same size
