"""One training step of the whole model on CUDA against the CPU from the same weights (the tiny
config and its SD-DETR variant), and a mixed-precision step. Written against detectron2's public
``build_model(cfg)``.

Skipped unless a GPU is visible and align_detr._C was built with the CUDA kernels.
"""

import pytest
import torch
from detectron2.modeling import build_model
from helpers import batched_input, synthetic_image, tiny_cfg

from align_detr import _ext

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and _ext.has_cuda_kernels()),
    reason="needs a CUDA GPU and align_detr._C built with the CUDA kernels (make gpu-check)",
)

BOXES = ((20, 30, 70, 90), (80, 10, 120, 60))
SD = (
    "MODEL.ALIGN_DETR.DECODER.DECOUPLED",
    "True",
    "MODEL.ALIGN_DETR.DECODER.TASK_AWARE_QUERIES",
    "True",
)
# Denoising draws its noise on the model's device, so CPU and CUDA would see different
# queries: it is off for the comparison (the AMP step below keeps it on).
NO_DN = ("MODEL.ALIGN_DETR.DN.ENABLED", "False")


def batch():
    img = synthetic_image(boxes=BOXES)
    other = synthetic_image(boxes=BOXES[:1], seed=1)
    return [batched_input(img, BOXES, [0, 1]), batched_input(other, BOXES[:1], [1])]


def train_step(model):
    model.train()
    model.zero_grad(set_to_none=True)
    losses = model(batch())
    sum(losses.values()).backward()
    grads = {
        name: p.grad.detach().double().cpu()
        for name, p in model.named_parameters()
        if p.grad is not None
    }
    return {k: v.detach().double().cpu() for k, v in losses.items()}, grads


@pytest.mark.parametrize("opts", [(), SD], ids=["tiny", "sd_detr"])
def test_training_step_on_cuda_matches_cpu(opts):
    cpu_model = build_model(tiny_cfg(*opts, *NO_DN))
    cuda_model = build_model(tiny_cfg(*opts, *NO_DN, "MODEL.DEVICE", "cuda"))
    cuda_model.load_state_dict(cpu_model.state_dict())
    assert next(cuda_model.parameters()).is_cuda
    losses_cpu, grads_cpu = train_step(cpu_model)
    losses_cuda, grads_cuda = train_step(cuda_model)
    assert set(losses_cuda) == set(losses_cpu)
    for name, value in losses_cpu.items():
        torch.testing.assert_close(losses_cuda[name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert set(grads_cuda) == set(grads_cpu)
    for name, g in grads_cpu.items():
        err = (grads_cuda[name] - g).norm()
        assert err <= 1e-4 * g.norm() + 1e-7, f"{name}: |diff| {err:.3g} vs |grad| {g.norm():.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_step_is_finite(dtype):
    model = build_model(tiny_cfg(*SD, "MODEL.DEVICE", "cuda")).train()
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for _ in range(2):
        with torch.autocast("cuda", dtype=dtype):
            losses = model(batch())
        assert all(torch.isfinite(v) for v in losses.values()), losses
        opt.zero_grad()
        scaler.scale(sum(losses.values())).backward()
        scaler.step(opt)
        scaler.update()
    assert all(torch.isfinite(p).all() for p in model.parameters())
