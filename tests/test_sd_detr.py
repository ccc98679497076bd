"""SD-DETR: the decoupled decoder, task-aware queries and the task-alignment loss."""

import pytest
import torch
from detectron2.modeling import build_model
from helpers import batched_input, sgd_steps, synthetic_image, tiny_cfg, train_then_evaluate

from align_detr.layers import FFN, MSDeformAttn
from align_detr.losses.tal import tal_cls_loss
from align_detr.modeling import Streams
from align_detr.modeling.decoder import DeformableCrossAttentionBlock, SelfAttentionBlock
from align_detr.modeling.decoupled import DecoupledDecoderLayer, TaskAwareQueryGenerator
from align_detr.modeling.encoder import EncoderMemory

BOXES = ((20, 30, 70, 90), (80, 10, 120, 60))
SD = (
    "MODEL.ALIGN_DETR.DECODER.DECOUPLED",
    "True",
    "MODEL.ALIGN_DETR.DECODER.TASK_AWARE_QUERIES",
    "True",
)


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("dn", ["True", "False"])
def test_decoupled_outputs_and_gradients_reach_both_streams(dn):
    model = build_model(tiny_cfg(*SD, "MODEL.ALIGN_DETR.DN.ENABLED", dn)).train()
    img = synthetic_image(boxes=BOXES)
    batch = [batched_input(img, BOXES, [0, 1]), batched_input(img)]
    losses = sgd_steps(model, batch)  # opens the localisation path (zero-initialised box heads)
    assert ("loss_class_dn" in losses) == (dn == "True")
    sum(model(batch).values()).backward()
    for layer in model.transformer.decoder.layers:
        for cross in (layer.cross_cls.attn, layer.cross_loc.attn):
            assert cross.sampling_offsets.weight.grad.abs().sum() > 0
            assert cross.value_proj.weight.grad.abs().sum() > 0
    gen = model.transformer.query_selector.content
    assert all(h.layers[-1].weight.grad.abs().sum() > 0 for h in gen.point_heads)
    model.eval()
    with torch.no_grad():
        inst = model([batched_input(img)])[0]["instances"]
    assert len(inst) == 10 and inst.pred_boxes.tensor.shape == (10, 4)


def test_parameter_count_grows_by_one_cross_attention_ffn_and_norms_per_layer():
    base = build_model(tiny_cfg())
    decoupled = build_model(tiny_cfg("MODEL.ALIGN_DETR.DECODER.DECOUPLED", "True"))
    full = build_model(tiny_cfg(*SD))
    d, levels, heads, points, ffn, layers, k = 32, 4, 2, 2, 64, 2, 20
    per_layer = count(MSDeformAttn(d, levels, heads, points)) + count(torch.nn.LayerNorm(d))
    per_layer += count(FFN(d, ffn, 0.0))
    assert count(decoupled) - count(base) == layers * per_layer
    generator = count(TaskAwareQueryGenerator(d, levels, 8))
    assert count(full) - count(decoupled) == generator - k * d  # replaces the learnt content


def sampling_locations(model, img):
    """Sampling offsets the two streams' cross-attentions predict for the same input."""
    seen = {}
    hooks = [
        layer.__getattr__(name).attn.sampling_offsets.register_forward_hook(
            lambda m, i, o, key=(li, name): seen.__setitem__(key, o.detach().clone())
        )
        for li, layer in enumerate(model.transformer.decoder.layers)
        for name in ("cross_cls", "cross_loc")
    ]
    with torch.no_grad():
        model.eval()
        model([batched_input(img)])
        model.train()
    for h in hooks:
        h.remove()
    return seen


def test_streams_look_at_different_places_after_training():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(*SD, "MODEL.ALIGN_DETR.NUM_CLASSES", "2")).train()
    img = synthetic_image(boxes=BOXES)
    before = sampling_locations(model, img)
    assert torch.allclose(before[(1, "cross_cls")], before[(1, "cross_loc")])  # same init
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(5):
        loss = sum(model([batched_input(img, BOXES, [0, 1])]).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = sampling_locations(model, img)
    for li in range(2):
        diff = (after[(li, "cross_cls")] - after[(li, "cross_loc")]).abs().max()
        assert diff > 1e-3, f"layer {li}: both streams still sample the same locations"


def test_decoupled_layer_tiles_the_attention_mask():
    layer = DecoupledDecoderLayer(
        SelfAttentionBlock(16, 2), lambda: DeformableCrossAttentionBlock(16, 1, 2, 2, 32, 0.0)
    ).eval()
    n, q, s = 1, 4, 9
    shapes, starts = torch.tensor([[3, 3]]), torch.tensor([0])
    memory = EncoderMemory(torch.randn(n, s, 16), None, shapes, starts, None, [(3, 3)])
    ref = torch.rand(n, q, 1, 4) * 0.5 + 0.25
    mask = torch.zeros(q, q, dtype=torch.bool)
    mask[2:, :2] = True  # queries 2, 3 must not see 0, 1
    q_cls, q_loc = torch.randn(n, q, 16), torch.randn(n, q, 16)
    pos = torch.randn(n, q, 16)
    args = (pos, ref, memory, mask)
    out = layer(Streams(q_cls, q_loc), *args)
    q_cls2, q_loc2 = q_cls.clone(), q_loc.clone()
    q_cls2[:, :2] += 3.0
    q_loc2[:, :2] -= 3.0
    out2 = layer(Streams(q_cls2, q_loc2), *args)
    for a, b in ((out.cls, out2.cls), (out.loc, out2.loc)):
        torch.testing.assert_close(a[:, 2:], b[:, 2:])  # blocked in both streams


def dense_tal(logits, pos_query, pos_label, pos_iou, gamma, norm):
    x = logits.double()
    p = torch.sigmoid(x)
    log_p, log_1mp = torch.nn.functional.logsigmoid(x), torch.nn.functional.logsigmoid(-x)
    loss = -(p**gamma) * log_1mp  # negatives
    for q, c, u in zip(pos_query.tolist(), pos_label.tolist(), pos_iou.double().tolist()):
        s = p[q, c].item()
        t = s**0.25 * u**0.75
        bce = -t * log_p[q, c] - (1 - t) * log_1mp[q, c]
        loss[q, c] = abs(t - s) ** gamma * bce
    return loss.sum() / norm


def test_tal_matches_independent_formula():
    torch.manual_seed(0)
    logits = torch.randn(5, 3, dtype=torch.float64) * 4
    logits[1, 2] = 50.0
    logits[3, 0] = -50.0
    pq, pl = torch.tensor([0, 1, 3]), torch.tensor([2, 2, 0])
    iou = torch.tensor([0.3, 0.9, 0.6], dtype=torch.float64)
    ours = tal_cls_loss(logits, pq, pl, iou, None, 2.0, 2.0)
    torch.testing.assert_close(
        ours, dense_tal(logits, pq, pl, iou, 2.0, 2.0), rtol=1e-10, atol=1e-10
    )
    x = logits.clone().requires_grad_()
    tal_cls_loss(x, pq, pl, iou).backward()
    assert torch.isfinite(x.grad).all()


def test_task_aware_queries_need_the_decoupled_decoder():
    with pytest.raises(ValueError, match="DECOUPLED"):
        build_model(tiny_cfg("MODEL.ALIGN_DETR.DECODER.TASK_AWARE_QUERIES", "True"))


def test_decoupled_model_trains_and_evaluates_through_train_net(
    tiny_dataset, tmp_path
):  # noqa: F811
    opts = ["MODEL.ALIGN_DETR.LOSS.TYPE", "tal", *SD]
    res = train_then_evaluate("tiny_test.yaml", tiny_dataset, str(tmp_path / "out"), opts)
    assert 0.0 <= res["bbox"]["AP"] <= 100.0
