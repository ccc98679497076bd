"""The usual pure-PyTorch formulation of multi-scale deformable attention (one ``F.grid_sample``
per level): the speed and correctness reference of the benchmarks and tests, the path
``MODEL.ALIGN_DETR.KERNELS`` "reference" (or "auto" without our build) runs, and what a model
exported to plain ONNX contains (``GridSample`` nodes).

Not part of ``align_detr.layers``' public surface: use :func:`align_detr.layers.ms_deform_attn`.
"""

from typing import Sequence, Tuple, Union

import torch
import torch.nn.functional as F


def ms_deform_attn_grid_sample(
    value: torch.Tensor,
    spatial_shapes: Union[torch.Tensor, Sequence[Tuple[int, int]]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Same contract as :func:`align_detr.layers.ms_deform_attn` (without level_start_index).

    Args:
        value: (N, S, M, D).
        spatial_shapes: (L, 2) int64 (H_l, W_l), on any device (read on the host), or L
            (H_l, W_l) pairs; pairs of symbolic sizes keep an exported graph's image size
            dynamic.
        sampling_locations: (N, Lq, M, L, P, 2) normalised (x, y).
        attention_weights: (N, Lq, M, L, P).

    Returns:
        (N, Lq, M * D).
    """
    n, _, m, d = value.shape
    _, lq, _, levels, points, _ = sampling_locations.shape
    if isinstance(spatial_shapes, torch.Tensor):
        spatial_shapes = spatial_shapes.tolist()
    shapes = [(h, w) for h, w in spatial_shapes]
    sizes = [h * w for h, w in shapes]
    grids = 2 * sampling_locations - 1
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        # (N, H*W, M, D) -> (N*M, D, H, W)
        v = value.split(sizes, dim=1)[lvl].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (N*M, Lq, P, 2)
        sampled.append(
            F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, levels * points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)  # (N*M, D, Lq)
    return out.view(n, m * d, lq).transpose(1, 2).contiguous()
