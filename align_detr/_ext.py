"""Loads the compiled extension ``align_detr._C`` and registers every op's Python-side parts.

Importing ``_C`` registers the ``torch.ops.align_detr.*`` operators (CPU, and CUDA when it was
built with CUDA). This module adds, for all of them and in this one place, what the dispatcher
needs from Python: fake (meta) kernels, so ``torch.compile`` / ``torch.export`` can trace the
ops, and the autograd formula of ``ms_deform_attn_forward``. It imports nothing but torch.

If the extension is missing, importing align_detr still works; the first use of an op raises
an ImportError that says how to build it.
"""

import torch

_BUILD_HINT = (
    "align_detr._C, the compiled extension, is not available ({err}). Build it from the "
    "project root with `make setup` (or `pip install --no-build-isolation -e .`); add "
    'FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX" CUDA_HOME=/usr/local/cuda to build the CUDA '
    "kernels on a machine without a GPU."
)

try:
    from align_detr import _C  # noqa: F401

    _LOAD_ERROR = None
except ImportError as e:  # only a missing/broken build is tolerated here
    _LOAD_ERROR = e


def ops():
    """Returns ``torch.ops.align_detr``, raising a clear ImportError if ``_C`` is not built."""
    if _LOAD_ERROR is not None:
        raise ImportError(_BUILD_HINT.format(err=_LOAD_ERROR)) from _LOAD_ERROR
    return torch.ops.align_detr


def has_cuda_kernels() -> bool:
    """True when ``_C`` was compiled with the CUDA kernels."""
    if _LOAD_ERROR is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(
        "align_detr::ms_deform_attn_forward", "CUDA"
    )


# ---- ms_deform_attn -------------------------------------------------------------------------


def _check_msda_shapes(value, spatial_shapes, level_start_index, loc, attn):
    # Data-independent part of the C++ validation, so traced graphs fail as eager would.
    torch._check(
        value.dim() == 4,
        lambda: f"ms_deform_attn: value must be (N, S, M, D), got {tuple(value.shape)}",
    )
    torch._check(
        loc.dim() == 6, lambda: "ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2)"
    )
    torch._check(
        attn.dim() == 5, lambda: "ms_deform_attn: attention_weights must be (N, Lq, M, L, P)"
    )
    torch._check(
        spatial_shapes.dim() == 2 and level_start_index.dim() == 1,
        lambda: "ms_deform_attn: spatial_shapes must be (L, 2) and level_start_index (L,)",
    )
    torch._check(
        value.dtype.is_floating_point,
        lambda: f"ms_deform_attn: value must be a floating-point tensor, got {value.dtype}",
    )
    n, _, m, _ = value.shape
    lq, levels, points = loc.shape[1], spatial_shapes.shape[0], loc.shape[4]
    torch._check(
        tuple(loc.shape) == (n, lq, m, levels, points, 2),
        lambda: f"ms_deform_attn: sampling_locations shape {tuple(loc.shape)} does not match "
        f"value {tuple(value.shape)}",
    )
    torch._check(
        tuple(attn.shape) == (n, lq, m, levels, points),
        lambda: f"ms_deform_attn: attention_weights shape {tuple(attn.shape)} does not match",
    )
    for name, t in (("sampling_locations", loc), ("attention_weights", attn)):
        torch._check(
            t.dtype == value.dtype,
            lambda name=name: f"ms_deform_attn: {name} must have value's dtype",
        )
        torch._check(
            t.device == value.device,
            lambda name=name: f"ms_deform_attn: {name} must be on value's device",
        )
    for name, t in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        torch._check(
            t.device.type == "cpu" or t.device == value.device,
            lambda name=name: f"ms_deform_attn: {name} must be on the CPU or on value's device",
        )


def _register_ms_deform_attn():
    @torch.library.register_fake("align_detr::ms_deform_attn_forward")
    def _forward_fake(value, spatial_shapes, level_start_index, loc, attn):
        _check_msda_shapes(value, spatial_shapes, level_start_index, loc, attn)
        n, _, m, d = value.shape
        return value.new_empty((n, loc.shape[1], m * d))

    @torch.library.register_fake("align_detr::ms_deform_attn_backward")
    def _backward_fake(
        value, spatial_shapes, level_start_index, loc, attn, grad_output, output_mask=(1, 1, 1)
    ):
        _check_msda_shapes(value, spatial_shapes, level_start_index, loc, attn)
        return tuple(
            torch.empty_like(t) if want else value.new_empty((0,))
            for t, want in zip((value, loc, attn), output_mask)
        )

    def _setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, loc, attn = ctx.saved_tensors
        # Only the gradients autograd asks for are computed.
        mask = [bool(ctx.needs_input_grad[i]) for i in (0, 3, 4)]
        if not any(mask):
            return None, None, None, None, None
        grad_value, grad_loc, grad_attn = torch.ops.align_detr.ms_deform_attn_backward(
            value, spatial_shapes, level_start_index, loc, attn, grad_output.contiguous(), mask
        )
        return (
            grad_value if mask[0] else None,
            None,
            None,
            grad_loc if mask[1] else None,
            grad_attn if mask[2] else None,
        )

    torch.library.register_autograd(
        "align_detr::ms_deform_attn_forward", _backward, setup_context=_setup_context
    )


# ---- matching_cost --------------------------------------------------------------------------


def _register_matching_cost():
    @torch.library.register_fake("align_detr::matching_cost")
    def _matching_cost_fake(
        pred_logits,
        pred_boxes,
        gt_labels,
        gt_boxes,
        gt_offsets,
        cw,
        bw,
        gw,
        alpha,
        gamma,
        defer_errors=False,
    ):
        # Data-independent part of the C++ validation, so traced graphs fail as eager would.
        torch._check(pred_logits.dim() == 3, lambda: "matching_cost: pred_logits must be (B, Q, C)")
        torch._check(
            pred_boxes.dim() == 3 and pred_boxes.shape[2] == 4,
            lambda: "matching_cost: pred_boxes must be (B, Q, 4)",
        )
        torch._check(
            gt_labels.dim() == 1
            and gt_boxes.dim() == 2
            and gt_boxes.shape[0] == gt_labels.shape[0],
            lambda: "matching_cost: gt_labels must be (sumG,) and gt_boxes (sumG, 4)",
        )
        dtype = (
            torch.float64
            if torch.float64 in (pred_logits.dtype, pred_boxes.dtype)
            else torch.float32
        )
        size = pred_logits.shape[1] * gt_labels.shape[0] + (1 if defer_errors else 0)
        return pred_logits.new_empty((size,), dtype=dtype)


if _LOAD_ERROR is None:
    _register_ms_deform_attn()
    _register_matching_cost()
