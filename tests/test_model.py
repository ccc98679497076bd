"""The AlignDETR meta-architecture on CPU with the tiny config: losses, DN mask, overfitting,
inference output and checkpoint round trip."""

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.structures import Boxes, pairwise_iou
from helpers import batched_input, synthetic_image, tiny_cfg

from align_detr.modeling import build_denoising_queries

BOXES = ((20, 30, 70, 90), (80, 10, 120, 60))


def test_training_losses_with_and_without_ground_truth():
    model = build_model(tiny_cfg())
    model.train()
    img = synthetic_image(boxes=BOXES)
    losses = model([batched_input(img, BOXES, [0, 1]), batched_input(img)])
    names = {"loss_class", "loss_bbox", "loss_giou"}
    suffixes = ["", "_0", "_enc", "_dn", "_dn_0"]
    assert set(losses) == {n + s for n in names for s in suffixes}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert sum(g is not None and g.abs().sum() > 0 for g in grads) > 0.8 * len(grads)

    # a batch without any box: classification still pushes scores down, box losses are 0
    model.zero_grad()
    losses = model([batched_input(img), batched_input(img)])
    for s in ["", "_0", "_enc"]:
        assert losses["loss_class" + s] > 0
        assert losses["loss_bbox" + s] == 0 and losses["loss_giou" + s] == 0
    sum(losses.values()).backward()


def test_dn_attention_mask_blocks_leaks():
    targets = [
        {"labels": torch.tensor([1, 2]), "boxes": torch.rand(2, 4) * 0.5 + 0.25},
        {"labels": torch.tensor([0]), "boxes": torch.rand(1, 4) * 0.5 + 0.25},
    ]
    embed = torch.nn.Embedding(4, 8)
    content, ref, mask, meta = build_denoising_queries(targets, 6, 0.5, 1.0, 3, embed, 5)
    assert meta.group_pad == 2 and meta.num_groups == 3 and meta.pad_size == 12
    assert content.shape == (2, 12, 8) and ref.shape == (2, 12, 4) and mask.shape == (17, 17)
    pad, g2 = meta.pad_size, 2 * meta.group_pad
    assert mask[pad:, :pad].all(), "matching queries must not see DN queries"
    assert not mask[pad:, pad:].any() and not mask[:pad, pad:].any()
    for gi in range(meta.num_groups):
        lo, hi = gi * g2, (gi + 1) * g2
        assert not mask[lo:hi, lo:hi].any()
        assert mask[lo:hi, :lo].all() and mask[lo:hi, hi:pad].all()
    # image 1 has one GT: its second slot of every half-group is padding
    assert (content[1, 1] == 0).all() and (content[1, 3] == 0).all()
    q, g = meta.positive_indices(2)
    assert q.tolist() == [0, 4, 8, 1, 5, 9] and g.tolist() == [0, 0, 0, 1, 1, 1]


def test_dn_groups_do_not_influence_matching_queries():
    """Changing the DN queries of one group changes neither the matching queries' outputs nor
    the other groups' outputs (the mask works inside the real decoder)."""
    model = build_model(tiny_cfg("MODEL.ALIGN_DETR.DN.NUM_QUERIES", "4"))
    model.train()
    img = synthetic_image(boxes=BOXES)
    torch.manual_seed(0)
    inputs = [batched_input(img, BOXES, [0, 1])]
    images, mask = model.preprocess_image(inputs)
    srcs, masks, pos = model.transformer_inputs(images.tensor, mask)
    t, heads = model.transformer, model.heads
    memory = t.encoder(srcs, masks, pos)
    sel = t.query_selector(memory, heads.class_heads[-1], heads.box_heads[-1])
    targets = model.prepare_targets(inputs, images)
    content, ref, attn_mask, meta = build_denoising_queries(
        targets, 4, 0.5, 1.0, heads.num_classes, t.denoising.label_embed, sel.ref_unact.shape[1]
    )
    assert meta.num_groups == 2

    def run(dn_content):
        queries = sel.queries.map(lambda x: torch.cat([dn_content, x], 1))
        ref_unact = torch.cat([ref, sel.ref_unact], 1)
        hidden, _ = t.decoder(queries, ref_unact, memory, heads.box_heads, attn_mask)
        return hidden[-1].cls

    with torch.no_grad():
        base = run(content)
        changed = content.clone()
        changed[:, 4:8] += 5.0  # group 1
        other = run(changed)
    torch.testing.assert_close(other[:, meta.pad_size :], base[:, meta.pad_size :])
    torch.testing.assert_close(other[:, :4], base[:, :4])
    assert not torch.allclose(other[:, 4:8], base[:, 4:8])


def test_inference_output_format():
    model = build_model(tiny_cfg())
    model.eval()
    img = synthetic_image(h=100, w=140)
    with torch.no_grad():
        out = model([{**batched_input(img), "height": 200, "width": 280}])
    inst = out[0]["instances"]
    assert inst.image_size == (200, 280)
    assert len(inst) == 10  # NUM_SELECT
    assert inst.pred_boxes.tensor.shape == (10, 4) and inst.scores.shape == (10,)
    assert (inst.scores[:-1] >= inst.scores[1:]).all()
    assert inst.pred_classes.max() < 80


@pytest.mark.parametrize("thresh", [0.0, 0.5])
def test_inference_nms_option(thresh):
    """TEST_NMS_THRESH drops a lower-scored same-class box overlapping a kept one above the
    threshold; other classes and boxes below it stay; 0 keeps everything."""
    model = build_model(tiny_cfg("MODEL.ALIGN_DETR.TEST_NMS_THRESH", str(thresh))).eval()
    # cxcywh (normalised), 3 queries x 2 classes: query 1 is query 0 shifted (IoU 0.82), query
    # 2 far away; logits make class 0 of every query and class 1 of query 1 the top scores.
    boxes = torch.tensor([[[0.3, 0.3, 0.2, 0.2], [0.31, 0.31, 0.2, 0.2], [0.8, 0.8, 0.1, 0.1]]])
    logits = torch.tensor([[[3.0, -9.0], [2.0, 1.0], [1.5, -9.0]]])
    out = model.postprocess(
        {"pred_logits": logits, "pred_boxes": boxes}, [(100, 100)], [{"height": 100, "width": 100}]
    )
    inst = out[0]["instances"]
    got = sorted(zip(inst.scores.tolist(), inst.pred_classes.tolist()), reverse=True)
    kept = [(s, c) for s, c in got if s > 0.5]
    expected = [(3.0, 0), (2.0, 0), (1.5, 0), (1.0, 1)]
    if thresh:
        expected.remove((2.0, 0))  # query 1, class 0: a duplicate of query 0
    assert [c for _, c in kept] == [c for _, c in expected]
    want = torch.tensor([x for x, _ in expected]).sigmoid()
    torch.testing.assert_close(torch.tensor([s for s, _ in kept]), want)
    with pytest.raises(ValueError, match="test_nms_thresh"):
        build_model(tiny_cfg("MODEL.ALIGN_DETR.TEST_NMS_THRESH", "1.5"))


def test_overfits_one_image_and_finds_both_boxes():
    torch.manual_seed(0)
    cfg = tiny_cfg("MODEL.ALIGN_DETR.NUM_CLASSES", "2")
    model = build_model(cfg)
    model.train()
    img = synthetic_image(boxes=BOXES)
    batch = [batched_input(img, BOXES, [0, 1])]
    # lr 1e-3 x 120 steps: at 3e-4 x 90 whether both boxes are found depended on the seed (both
    # before and after the model was split into parts); this passes for seeds 0-3.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    history = []
    for _ in range(120):
        losses = model(batch)
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()
        history.append(total.item())
    assert sum(history[-5:]) / 5 < 0.5 * sum(history[:5]) / 5
    model.eval()
    with torch.no_grad():
        inst = model([batched_input(img)])[0]["instances"]
    gt = Boxes(torch.tensor(BOXES, dtype=torch.float32))
    for cls in (0, 1):
        keep = inst.pred_classes == cls
        top = inst[keep][:3]
        iou = pairwise_iou(top.pred_boxes, gt[cls : cls + 1]).max()
        assert iou > 0.5, f"class {cls}: best IoU among top predictions is {iou:.2f}"


def test_checkpoint_round_trip(tmp_path):
    cfg = tiny_cfg()
    model = build_model(cfg)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model_test")
    other = build_model(cfg)
    DetectionCheckpointer(other).load(str(tmp_path / "model_test.pth"))
    for (n, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), n
    model.eval()
    other.eval()
    img = synthetic_image()
    with torch.no_grad():
        a = model([batched_input(img)])[0]["instances"]
        b = other([batched_input(img)])[0]["instances"]
    torch.testing.assert_close(a.scores, b.scores)


def test_bad_config_values_are_reported():
    with pytest.raises(ValueError, match="MATCH_K"):
        build_model(tiny_cfg("MODEL.ALIGN_DETR.LOSS.MATCH_K", "[1, 1]"))
    with pytest.raises(ValueError, match="TAU"):
        build_model(tiny_cfg("MODEL.ALIGN_DETR.LOSS.TAU", "0.0"))
    with pytest.raises(ValueError, match="divisible"):
        build_model(tiny_cfg("MODEL.ALIGN_DETR.NHEADS", "3"))
