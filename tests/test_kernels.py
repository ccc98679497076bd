"""MODEL.ALIGN_DETR.KERNELS: the PyTorch reference paths equal our compiled ops (deformable
attention, matching, a whole training step and inference), "auto" falls back with one warning
when the build is missing, "compiled" raises, and CUDA launch failures raise."""

import copy
import glob
import os
import re
import warnings

import pytest
import torch
from detectron2.modeling import build_model
from helpers import ROOT, batched_input, synthetic_image, tiny_cfg

from align_detr import _ext, kernels
from align_detr.config import ConfigError
from align_detr.layers import ms_deform_attn
from align_detr.matching import HungarianMatcher

pytestmark = pytest.mark.skipif(_ext._LOAD_ERROR is not None, reason="align_detr._C not built")

BOXES = ((20, 30, 70, 90), (80, 10, 120, 60))


def random_msda(seed=0, shapes=((6, 7), (3, 4), (1, 1)), n=2, m=2, d=4, lq=5, p=3):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    value = torch.randn(n, s, m, d, generator=g, dtype=torch.float64, requires_grad=True)
    # some locations outside the map on purpose
    loc = torch.rand(n, lq, m, len(shapes), p, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2
    attn = torch.rand(n, lq, m, len(shapes), p, generator=g, dtype=torch.float64)
    return value, list(shapes), loc.requires_grad_(), attn.requires_grad_()


def test_msda_reference_equals_compiled_with_gradients():
    value, shapes, loc, attn = random_msda()
    grads = {}
    for mode in ("compiled", "reference"):
        with kernels.kernel_mode(mode):
            out = ms_deform_attn(value, shapes, None, loc, attn)
        grads[mode] = (out,) + torch.autograd.grad(out.square().sum(), (value, loc, attn))
    for ours, ref in zip(grads["compiled"], grads["reference"]):
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)


def test_msda_accepts_the_level_table_or_the_sizes():
    value, shapes, loc, attn = random_msda(seed=1)
    table = torch.tensor(shapes)
    starts = torch.tensor([0, shapes[0][0] * shapes[0][1], sum(h * w for h, w in shapes[:2])])
    with torch.no_grad():
        a = ms_deform_attn(value, table, starts, loc, attn)
        b = ms_deform_attn(value, shapes, None, loc, attn)
    assert torch.equal(a, b)


def random_targets(g, sizes, num_classes):
    out = []
    for n in sizes:
        ctr = torch.rand(n, 2, generator=g) * 0.8 + 0.1
        wh = torch.rand(n, 2, generator=g) * 0.3 + 0.02
        out.append(
            {
                "labels": torch.randint(0, num_classes, (n,), generator=g),
                "boxes": torch.cat([ctr, wh], 1),
            }
        )
    return out


@pytest.mark.parametrize("k", [1, 2, 4])
def test_matcher_reference_equals_compiled(k):
    g = torch.Generator().manual_seed(k)
    outputs = {
        "pred_logits": torch.randn(3, 30, 7, generator=g) * 2,
        "pred_boxes": torch.cat(
            [torch.rand(3, 30, 2, generator=g), torch.rand(3, 30, 2, generator=g) * 0.4], -1
        ),
    }
    targets = random_targets(g, [5, 0, 11], 7)  # an image without GT too
    matcher = HungarianMatcher()
    with kernels.kernel_mode("compiled"):
        ours = matcher(outputs, targets, k)
    with kernels.kernel_mode("reference"):
        ref = matcher(outputs, targets, k)
    for (r1, c1), (r2, c2) in zip(ours, ref):
        assert torch.equal(r1, r2) and torch.equal(c1, c2)


def test_reference_cost_rejects_bad_data_like_the_op():
    from align_detr.matching import matching_cost_reference

    logits = torch.zeros(1, 4, 3)
    boxes = torch.full((1, 4, 4), 0.5)
    with pytest.raises(RuntimeError, match="outside"):
        matching_cost_reference(logits, boxes, [torch.tensor([3])], [torch.full((1, 4), 0.5)])
    with pytest.raises(RuntimeError, match="pred_boxes contains non-finite"):
        matching_cost_reference(logits, boxes * float("nan"), [torch.tensor([0])], [boxes[0, :1]])


def _model_pair(*opts):
    compiled = build_model(tiny_cfg(*opts, "MODEL.ALIGN_DETR.KERNELS", "compiled"))
    # Off the initialisation, whose sampling points sit exactly on pixel centres, where bilinear
    # interpolation has a kink and each implementation may pick either one-sided derivative.
    torch.manual_seed(0)
    with torch.no_grad():
        for p in compiled.parameters():
            p.add_(torch.randn_like(p) * 1e-2)
    reference = build_model(tiny_cfg(*opts, "MODEL.ALIGN_DETR.KERNELS", "reference"))
    reference.load_state_dict(compiled.state_dict())
    assert compiled.kernels == "compiled" and reference.kernels == "reference"
    return compiled, reference


@pytest.mark.parametrize("loss", ["focal", "align"])
def test_training_step_and_inference_same_with_reference_kernels(loss):
    opts = ("MODEL.ALIGN_DETR.LOSS.TYPE", loss, "MODEL.ALIGN_DETR.LOSS.MATCH_K", "[2]")
    compiled, reference = _model_pair(*opts)
    img = synthetic_image()
    batch = [batched_input(img, BOXES, [0, 1]), batched_input(img[:, :100], BOXES[:1], [1])]
    results = {}
    for name, model in (("compiled", compiled), ("reference", reference)):
        model.train()
        torch.manual_seed(3)  # the same denoising noise
        losses = model(copy.deepcopy(batch))
        model.zero_grad()
        sum(losses.values()).backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        model.eval()
        with torch.no_grad():
            inst = model([{"image": b["image"]} for b in batch])[0]["instances"]
        results[name] = (losses, grads, inst)
    (l1, g1, i1), (l2, g2, i2) = results["compiled"], results["reference"]
    assert l1.keys() == l2.keys()
    for key in l1:
        torch.testing.assert_close(l1[key], l2[key], rtol=1e-4, atol=1e-5, msg=key)
    assert g1.keys() == g2.keys()
    for key in g1:
        torch.testing.assert_close(g1[key], g2[key], rtol=1e-3, atol=1e-5, msg=key)
    assert torch.equal(i1.pred_classes, i2.pred_classes)
    torch.testing.assert_close(i1.scores, i2.scores, rtol=0, atol=1e-5)
    torch.testing.assert_close(i1.pred_boxes.tensor, i2.pred_boxes.tensor, rtol=0, atol=1e-3)


def test_auto_falls_back_with_one_warning_and_compiled_raises(monkeypatch):
    monkeypatch.setattr(_ext, "_LOAD_ERROR", ImportError("libcudart.so.13: cannot open"))
    monkeypatch.setattr(kernels, "_warned", set())
    value, shapes, loc, attn = random_msda(seed=2)
    with kernels.kernel_mode("reference"):
        expected = ms_deform_attn(value, shapes, None, loc, attn)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with kernels.kernel_mode("auto"):
            first = ms_deform_attn(value, shapes, None, loc, attn)
            ms_deform_attn(value, shapes, None, loc, attn)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert "libcudart" in messages[0] and "make setup" in messages[0]
    assert torch.equal(first, expected)
    with kernels.kernel_mode("compiled"), pytest.raises(ImportError, match="make setup"):
        ms_deform_attn(value, shapes, None, loc, attn)


def test_a_model_trains_with_auto_when_the_build_is_missing(monkeypatch):
    model = build_model(tiny_cfg())
    monkeypatch.setattr(_ext, "_LOAD_ERROR", ImportError("no _C"))
    monkeypatch.setattr(kernels, "_warned", set())
    img = synthetic_image()
    with pytest.warns(RuntimeWarning, match="no _C"):
        losses = model([batched_input(img, BOXES, [0, 1])])
    assert all(torch.isfinite(v) for v in losses.values())


def test_kernel_setting_is_checked():
    with pytest.raises(ConfigError, match="KERNELS"):
        tiny_cfg("MODEL.ALIGN_DETR.KERNELS", "fast")
    with pytest.raises(ValueError, match="kernel mode"):
        with kernels.kernel_mode("fast"):
            pass


def test_every_cuda_launch_is_checked_and_nothing_prints():
    """A failed kernel launch must raise at once (C10_CUDA_KERNEL_LAUNCH_CHECK after each
    launch), never print and carry on."""
    sources = glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True)
    sources += glob.glob(os.path.join(ROOT, "csrc", "**", "*.cpp"), recursive=True)
    sources += glob.glob(os.path.join(ROOT, "csrc", "**", "*.h"), recursive=True)
    assert sources
    launches = 0
    for path in sources:
        text = open(path).read()
        assert not re.search(r"\b(f?printf|std::cout|std::cerr)\b", text), path
        for match in re.finditer(r">>>\s*\(", text):
            launches += 1
            end = text.index(";", match.end())
            following = text[end : end + 200]
            assert "C10_CUDA_KERNEL_LAUNCH_CHECK();" in following, f"{path}: unchecked launch"
    assert launches >= 3
