"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021) on our compiled op.

``ms_deform_attn`` is the differentiable functional form of ``torch.ops.align_detr.
ms_deform_attn_forward`` (CPU and CUDA kernels in csrc/ms_deform_attn); ``MSDeformAttn`` is the
attention module with its sampling-offset, attention-weight, value and output projections.
"""

import math
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from align_detr import _ext, kernels

from .ms_deform_attn_reference import ms_deform_attn_grid_sample

#: The level sizes as a (L, 2) int64 tensor of (H_l, W_l), or as L pairs of ints (or of symbolic
#: sizes while a model is exported).
LevelShapes = Union[torch.Tensor, Sequence[Tuple[int, int]]]


def level_table(shapes: Sequence[Tuple[int, int]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The op's level table for L level sizes: (L, 2) int64 (H_l, W_l) and (L,) int64 starts.

    Built on the CPU from one scalar per size, so that sizes which are symbols (the image size of
    an exported model) stay symbols in the traced graph instead of being frozen to the example.
    """

    def scalar(v):
        return torch.scalar_tensor(v, dtype=torch.long)

    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    table = torch.stack([torch.stack([scalar(h), scalar(w)]) for h, w in shapes])
    return table, torch.stack([scalar(s) for s in starts])


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: LevelShapes,
    level_start_index: Optional[torch.Tensor],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Bilinearly samples every level at the given locations and sums them with the weights.

    Args:
        value: (N, S, M, D) per-head values of all levels, flattened level by level in row-major
            (h, w) order; S = sum(H_l * W_l).
        spatial_shapes: (L, 2) int64, (H_l, W_l) of each level, or L (H_l, W_l) pairs.
        level_start_index: (L,) int64, first row of each level in S (exclusive cumsum); may be
            None when spatial_shapes is given as pairs.
            The level table (spatial_shapes, level_start_index) may be on the CPU while value is
            on a GPU, and should be: the op reads it on the host, so a CPU table costs no device
            synchronisation (and CUDA graphs can capture the call); a table on value's device
            costs one blocking copy per call.
        sampling_locations: (N, Lq, M, L, P, 2) normalised (x, y); 0..1 covers the map, pixel
            x = loc_x * W - 0.5 (grid_sample with align_corners=False, zero padding).
        attention_weights: (N, Lq, M, L, P), already normalised by the caller.

    Returns:
        (N, Lq, M * D), differentiable in value, sampling_locations and attention_weights (only
        the gradients autograd asks for are computed). Mixed floating dtypes (e.g. fp16 value
        under autocast) are promoted to the widest one.

    Raises:
        TypeError: if value, sampling_locations or attention_weights is not floating point.
        RuntimeError: on inconsistent shapes, devices or level tables (the message names the
            argument).
    """
    for name, t in (
        ("value", value),
        ("sampling_locations", sampling_locations),
        ("attention_weights", attention_weights),
    ):
        if not t.is_floating_point():
            raise TypeError(
                f"ms_deform_attn: {name} must be a floating-point tensor, got {t.dtype}"
            )
    dtype = torch.promote_types(
        value.dtype, torch.promote_types(sampling_locations.dtype, attention_weights.dtype)
    )
    if not kernels.use_compiled(value.device, "ms_deform_attn"):
        return ms_deform_attn_grid_sample(
            value.to(dtype),
            spatial_shapes,
            sampling_locations.to(dtype),
            attention_weights.to(dtype),
        )
    if not isinstance(spatial_shapes, torch.Tensor):
        spatial_shapes, level_start_index = level_table(spatial_shapes)
    return _ext.ops().ms_deform_attn_forward(
        value.to(dtype),
        spatial_shapes,
        level_start_index,
        sampling_locations.to(dtype),
        attention_weights.to(dtype),
    )


# (W_l, H_l) of a CPU level table on another device, per (table, device, dtype): made once, so a
# CPU table costs no host-to-device copy per call (and CUDA graph capture sees none).
_NORMALIZERS: Dict[Tuple, torch.Tensor] = {}


def _level_normalizer(spatial_shapes: LevelShapes, like: torch.Tensor) -> torch.Tensor:
    """(L, 2) (W_l, H_l) of each level, on like's device and in its dtype."""
    if isinstance(spatial_shapes, torch.Tensor):
        if spatial_shapes.device == like.device or torch.compiler.is_compiling():
            return spatial_shapes.flip(-1).to(device=like.device, dtype=like.dtype)
        sizes = tuple(spatial_shapes.flatten().tolist())
    else:
        sizes = tuple(v for hw in spatial_shapes for v in hw)
        if not all(isinstance(v, int) for v in sizes):  # symbolic sizes: traced, never cached
            return level_table(spatial_shapes)[0].flip(-1).to(device=like.device, dtype=like.dtype)
    key = (sizes, like.device, like.dtype)
    norm = _NORMALIZERS.get(key)
    if norm is None:
        if len(_NORMALIZERS) >= 64:
            _NORMALIZERS.clear()
        norm = torch.tensor(sizes, dtype=like.dtype).view(-1, 2).flip(-1).to(like.device)
        _NORMALIZERS[key] = norm
    return norm


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module.

    Each query predicts, per head, level and point, an offset around its reference point and an
    attention weight (softmax over levels x points), then reads the value maps there.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        """
        Args:
            d_model: channels of queries, values and output.
            n_levels: number of feature levels L.
            n_heads: attention heads M; d_model must be divisible by it.
            n_points: sampling points P per head and level.
        """
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        for name, v in (("n_levels", n_levels), ("n_heads", n_heads), ("n_points", n_points)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self):
        """Deformable-DETR initialisation: the offsets start on a ring of M directions, point i
        at radius i + 1 pixels; attention starts uniform; projections are Xavier-uniform."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float64) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([angles.cos(), angles.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]  # onto the unit square
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float64).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten().float())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        spatial_shapes: LevelShapes,
        level_start_index: Optional[torch.Tensor],
        input_padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            query: (N, Lq, C).
            reference_points: (N, Lq, L, 2) normalised (x, y) points, or (N, Lq, L, 4) boxes
                (cx, cy, w, h); with boxes the offsets are scaled by half the box size / P.
            input_flatten: (N, S, C) the flattened levels.
            spatial_shapes: (L, 2) int64 (H_l, W_l), on the CPU for GPU inputs (see
                :func:`ms_deform_attn`), or L (H_l, W_l) pairs (what an exported model needs).
            level_start_index: (L,) int64, on the same device as spatial_shapes (None with
                pairs).
            input_padding_mask: optional (N, S) bool, True on padding; those values are zeroed.

        Returns:
            (N, Lq, C).
        """
        n, lq, _ = query.shape
        _, s, _ = input_flatten.shape
        m, lv, p = self.n_heads, self.n_levels, self.n_points
        if len(spatial_shapes) != lv:
            raise ValueError(f"expected {lv} levels, got spatial_shapes of {len(spatial_shapes)}")
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(n, s, m, self.d_model // m)
        offsets = self.sampling_offsets(query).view(n, lq, m, lv, p, 2)
        weights = self.attention_weights(query).view(n, lq, m, lv * p)
        weights = weights.softmax(-1).view(n, lq, m, lv, p)
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: normalise by (W, H)
            normalizer = _level_normalizer(spatial_shapes, offsets)
            locations = (
                reference_points[:, :, None, :, None, :]
                + offsets / normalizer[None, None, None, :, None, :]
            )
        elif reference_points.shape[-1] == 4:
            locations = (
                reference_points[:, :, None, :, None, :2]
                + offsets / p * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(
                "reference_points must end in 2 (points) or 4 (boxes), got "
                f"{tuple(reference_points.shape)}"
            )
        out = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)
        return self.output_proj(out)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_levels={self.n_levels}, n_heads={self.n_heads}, "
            f"n_points={self.n_points}"
        )
