"""Align-DETR: the Align loss and rank weights against independent float64 formulas, and the
many-to-one criterion on the tiny model."""

import math

import pytest
import torch
from detectron2.modeling import build_model
from helpers import batched_input, synthetic_image, tiny_cfg

from align_detr.losses import align_cls_loss, rank_weights


def dense_align_loss(logits, pos_query, pos_label, pos_iou, pos_weight, alpha, gamma, norm):
    """Entry by entry: BCE(p, w * t) on the positives, p^gamma * -log(1 - p) elsewhere."""
    x = logits.double()
    p = torch.sigmoid(x)
    total = torch.zeros((), dtype=torch.float64)
    pos = {(int(q), int(c)): i for i, (q, c) in enumerate(zip(pos_query, pos_label))}
    for qi in range(x.shape[0]):
        for ci in range(x.shape[1]):
            log_p = (
                -math.log1p(math.exp(-x[qi, ci].item())) if x[qi, ci] > -30 else x[qi, ci].item()
            )
            log_1mp = (
                -math.log1p(math.exp(x[qi, ci].item())) if x[qi, ci] < 30 else -x[qi, ci].item()
            )
            if (qi, ci) in pos:
                i = pos[(qi, ci)]
                t = max(p[qi, ci].item() ** alpha * float(pos_iou[i]) ** (1 - alpha), 0.01)
                t *= 1.0 if pos_weight is None else float(pos_weight[i])
                total += -t * log_p - (1 - t) * log_1mp
            else:
                total += -(p[qi, ci].item() ** gamma) * log_1mp
    return total / norm


def test_align_loss_matches_dense_reference_including_extreme_logits():
    torch.manual_seed(0)
    logits = torch.randn(6, 4, dtype=torch.float64) * 3
    logits[0, 1], logits[2, 3], logits[4, 0] = 50.0, -50.0, 50.0
    pos_query = torch.tensor([0, 2, 5])
    pos_label = torch.tensor([1, 3, 2])
    pos_iou = torch.tensor([0.7, 0.2, 0.95], dtype=torch.float64)
    weight = torch.tensor([1.0, 0.513, 0.264], dtype=torch.float64)
    for w in (None, weight):
        ours = align_cls_loss(logits, pos_query, pos_label, pos_iou, w, 0.25, 2.0, 3.0)
        ref = dense_align_loss(logits, pos_query, pos_label, pos_iou, w, 0.25, 2.0, 3.0)
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_align_loss_gradients_are_finite_and_target_is_detached():
    logits = torch.tensor([[50.0, -50.0, 0.3], [-2.0, 1.0, 50.0]], requires_grad=True)
    loss = align_cls_loss(
        logits, torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([0.5, 1.0])
    )
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    # with IoU = 1 and alpha = 0 the target is 1: the positive entry is plain BCE towards 1
    x = torch.tensor([[0.4, -1.0]], requires_grad=True)
    loss = align_cls_loss(x, torch.tensor([0]), torch.tensor([0]), torch.tensor([1.0]), alpha=0.0)
    expected = -torch.nn.functional.logsigmoid(torch.tensor(0.4)) + torch.sigmoid(
        torch.tensor(-1.0)
    ) ** 2 * -torch.nn.functional.logsigmoid(torch.tensor(1.0))
    torch.testing.assert_close(loss, expected)


def test_rank_weights_with_ties_and_groups_of_different_sizes():
    quality = torch.tensor([0.3, 0.9, 0.5, 0.5, 0.1, 0.8, 0.8, 0.2])
    gt = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3])
    w = rank_weights(quality, gt, tau=1.5)
    # GT 0: 0.9 first, 0.3 second; GT 1: the tie 0.5/0.5 by position, then 0.1; GT 2: tie; GT 3 alone
    ranks = torch.tensor([1, 0, 0, 1, 2, 0, 1, 0], dtype=torch.float32)
    torch.testing.assert_close(w, torch.exp(-ranks / 1.5))
    assert rank_weights(torch.zeros(0), torch.zeros(0, dtype=torch.long), 1.5).numel() == 0
    with pytest.raises(ValueError, match="tau"):
        rank_weights(quality, gt, 0.0)


class RecordingMatcher(torch.nn.Module):
    """Wraps the real matcher and records (k, GT counts, indices) of every call."""

    def __init__(self, matcher):
        super().__init__()
        self.inner = matcher
        self.calls = []

    def forward(self, outputs, targets, k):
        indices = self.inner(outputs, targets, k=k)
        self.calls.append((k, [len(t["labels"]) for t in targets], indices))
        return indices


def align_model(k_enc_and_aux=2):
    cfg = tiny_cfg(
        "MODEL.ALIGN_DETR.LOSS.TYPE",
        "align",
        "MODEL.ALIGN_DETR.LOSS.MATCH_K",
        f"[{k_enc_and_aux}]",
    )
    return build_model(cfg).train()


def test_many_to_one_criterion_matches_k_per_gt_and_once_on_the_final_layer():
    torch.manual_seed(0)
    model = align_model()
    model.criterion.matcher = recorder = RecordingMatcher(model.criterion.matcher)
    boxes = ((20, 30, 70, 90), (80, 10, 120, 60))
    img = synthetic_image(boxes=boxes)
    losses = model([batched_input(img, boxes, [0, 1])])
    assert {"loss_class_enc", "loss_class_0", "loss_class", "loss_class_dn"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    calls = recorder.calls
    assert [k for k, _, _ in calls] == [2, 2, 1]  # encoder, decoder 1, final decoder layer
    for k, counts, indices in calls:
        for g, (q, j) in zip(counts, indices):
            assert torch.bincount(j, minlength=g).tolist() == [k] * g
            assert len(set(q.tolist())) == len(q)


def test_k_is_capped_per_image_only():
    """20 queries: an image with 15 GTs gets k_eff = 1, the 1-GT image of the batch keeps 2."""
    torch.manual_seed(0)
    model = align_model()
    model.criterion.matcher = recorder = RecordingMatcher(model.criterion.matcher)
    many = [
        (5 + 8 * (i % 5), 5 + 24 * (i // 5), 12 + 8 * (i % 5), 20 + 24 * (i // 5))
        for i in range(15)
    ]
    img = synthetic_image(boxes=())
    losses = model([batched_input(img, many), batched_input(img, [(30, 30, 90, 90)])])
    assert all(torch.isfinite(v) for v in losses.values())
    k, _, enc_indices = recorder.calls[0]
    assert k == 2
    assert torch.bincount(enc_indices[0][1], minlength=15).tolist() == [1] * 15
    assert torch.bincount(enc_indices[1][1], minlength=1).tolist() == [2]
