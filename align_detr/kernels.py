# Copyright (c) align-detr contributors.
"""Which implementation runs the hot ops: our compiled kernels or the PyTorch reference paths.

``MODEL.ALIGN_DETR.KERNELS`` (and :func:`kernel_mode` for code outside a model) picks one of

- ``"auto"`` (the default): the compiled op where ``align_detr._C`` has a kernel for the tensor's
  device; otherwise the reference path, after one warning that names the missing build and the
  command that fixes it. A model then still trains and predicts where our extension could not be
  built (a new GPU generation, a machine without a compiler), only slower.
- ``"compiled"``: always the compiled op; a missing build raises the ImportError of
  :func:`align_detr._ext.ops` (no silent fallback).
- ``"reference"``: always the PyTorch reference paths: deformable attention by one
  ``F.grid_sample`` per level, the matching cost as dense PyTorch tensor maths and the assignment
  by SciPy's ``linear_sum_assignment``. This is also how a model is exported to plain ONNX.

The mode is process-wide state set for the duration of a ``with`` block; a model enters its
configured mode in its ``forward``. Importing this module loads nothing but torch.
"""

import contextlib
import threading
import warnings
from typing import Iterator

import torch

from align_detr import _ext

__all__ = ["KERNEL_MODES", "current_mode", "kernel_mode", "use_compiled"]

KERNEL_MODES = ("auto", "compiled", "reference")

_state = threading.local()
_warned = set()


def current_mode() -> str:
    """The mode in force in this thread ("auto" outside any :func:`kernel_mode` block)."""
    return getattr(_state, "mode", "auto")


def check_mode(mode: str) -> str:
    """Returns ``mode``; raises a ValueError naming the allowed values if it is not one."""
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernel mode must be one of {KERNEL_MODES}, got {mode!r}")
    return mode


@contextlib.contextmanager
def kernel_mode(mode: str) -> Iterator[None]:
    """Runs the block with ``mode`` ("auto", "compiled" or "reference"); nests and restores."""
    check_mode(mode)
    previous = current_mode()
    _state.mode = mode
    try:
        yield
    finally:
        _state.mode = previous


def _has_kernel(device: torch.device) -> bool:
    if _ext._LOAD_ERROR is not None:
        return False
    if device.type == "cpu" or device.type == "meta":
        return True
    if device.type == "cuda":
        return _ext.has_cuda_kernels()
    return False


def _missing_build_reason(device: torch.device) -> str:
    if _ext._LOAD_ERROR is not None:
        return f"align_detr._C could not be imported ({_ext._LOAD_ERROR})"
    return f"align_detr._C was built without {device.type.upper()} kernels"


def use_compiled(device: torch.device, op: str) -> bool:
    """Whether ``op`` on ``device`` runs our compiled kernel in the current mode.

    In "auto" mode a missing kernel gives one warning per (op, device type) and False.
    """
    mode = current_mode()
    if mode == "reference":
        return False
    if mode == "compiled" or _has_kernel(device):
        return True
    key = (op, device.type)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"{_missing_build_reason(device)}: {op} runs its PyTorch reference path on "
            f"{device.type}, which is slower. Build the extension with `make setup` (or `pip "
            "install --no-build-isolation -e .`; add FORCE_CUDA=1 CUDA_HOME=/usr/local/cuda for "
            "the CUDA kernels), or set MODEL.ALIGN_DETR.KERNELS reference to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
    return False
