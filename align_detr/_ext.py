"""Loads the compiled extension ``align_detr._C`` and registers its Python-side pieces.

Importing ``_C`` registers the ``torch.ops.align_detr.*`` operators (CPU, and CUDA when it was
built with CUDA). This module adds what the dispatcher needs from Python: fake (meta) kernels,
so ``torch.compile`` / ``torch.export`` can trace the ops, and autograd formulas.

If the extension is missing, importing align_detr still works; the first use of an op raises
an ImportError that says how to build it.
"""

import torch

_BUILD_HINT = (
    "align_detr._C, the compiled extension, is not available ({err}). Build it from the "
    "project root with `make setup` (or `pip install --no-build-isolation -e .`); add "
    'FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="8.0;9.0" CUDA_HOME=/usr/local/cuda to build the CUDA '
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


def _check_msda_shapes(value, spatial_shapes, level_start_index, loc, attn):
    # Data-independent part of the C++ validation, so traced graphs fail as eagerly would.
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
    n, _, m, _ = value.shape
    lq, levels, points = loc.shape[1], spatial_shapes.shape[0], loc.shape[4]
    torch._check(
        tuple(loc.shape) == (n, lq, m, levels, points, 2),
        lambda: f"ms_deform_attn: sampling_locations shape {tuple(loc.shape)} does not match value {tuple(value.shape)}",
    )
    torch._check(
        tuple(attn.shape) == (n, lq, m, levels, points),
        lambda: f"ms_deform_attn: attention_weights shape {tuple(attn.shape)} does not match",
    )
    for name, t in (("sampling_locations", loc), ("attention_weights", attn)):
        torch._check(
            t.dtype == value.dtype, lambda: f"ms_deform_attn: {name} must have value's dtype"
        )
        torch._check(
            t.device == value.device, lambda: f"ms_deform_attn: {name} must be on value's device"
        )


def _register_python_parts():
    @torch.library.register_fake("align_detr::ms_deform_attn_forward")
    def _msda_forward_fake(value, spatial_shapes, level_start_index, loc, attn):
        _check_msda_shapes(value, spatial_shapes, level_start_index, loc, attn)
        n, _, m, d = value.shape
        return value.new_empty((n, loc.shape[1], m * d))

    @torch.library.register_fake("align_detr::ms_deform_attn_backward")
    def _msda_backward_fake(value, spatial_shapes, level_start_index, loc, attn, grad_output):
        _check_msda_shapes(value, spatial_shapes, level_start_index, loc, attn)
        return torch.empty_like(value), torch.empty_like(loc), torch.empty_like(attn)

    def _msda_setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _msda_backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, loc, attn = ctx.saved_tensors
        grad_value, grad_loc, grad_attn = torch.ops.align_detr.ms_deform_attn_backward(
            value, spatial_shapes, level_start_index, loc, attn, grad_output.contiguous()
        )
        return grad_value, None, None, grad_loc, grad_attn

    torch.library.register_autograd(
        "align_detr::ms_deform_attn_forward", _msda_backward, setup_context=_msda_setup_context
    )


if _LOAD_ERROR is None:
    _register_python_parts()
