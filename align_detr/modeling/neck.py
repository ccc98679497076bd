# Copyright (c) align-detr contributors.
"""Channel mapper: backbone stages to d_model channels, plus extra stride-2 levels."""

from typing import Dict, List

import torch
from detectron2.layers import ShapeSpec
from torch import nn


def _group_norm(channels: int) -> nn.GroupNorm:
    # 32 groups as in DINO; fewer when a small test model has fewer channels.
    groups = max(g for g in range(1, 33) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


class ChannelMapper(nn.Module):
    """1x1 conv + GroupNorm per backbone level; each extra level is a 3x3 stride-2 conv + GN on
    the previous one (the first extra level reads the raw last backbone level, as in DINO).

    Args:
        input_shapes: backbone output shapes.
        in_features: names of the backbone levels to use, finest first.
        out_channels: d_model.
        num_levels: total levels out; num_levels - len(in_features) extra ones.
    """

    def __init__(
        self,
        input_shapes: Dict[str, ShapeSpec],
        in_features: List[str],
        out_channels: int,
        num_levels: int,
    ):
        super().__init__()
        missing = [f for f in in_features if f not in input_shapes]
        if missing:
            raise ValueError(
                f"backbone has no feature(s) {missing}; it gives {sorted(input_shapes)}"
            )
        if num_levels < len(in_features):
            raise ValueError(
                f"NUM_FEATURE_LEVELS ({num_levels}) is below the {len(in_features)} IN_FEATURES"
            )
        self.in_features = list(in_features)
        self.lateral = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(input_shapes[f].channels, out_channels, 1), _group_norm(out_channels)
            )
            for f in in_features
        )
        extra = []
        in_ch = input_shapes[in_features[-1]].channels
        for _ in range(num_levels - len(in_features)):
            extra.append(
                nn.Sequential(
                    nn.Conv2d(in_ch, out_channels, 3, stride=2, padding=1),
                    _group_norm(out_channels),
                )
            )
            in_ch = out_channels
        self.extra = nn.ModuleList(extra)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight, gain=1)
                nn.init.zeros_(m.bias)

    def forward(self, features: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        """Returns num_levels maps (N, out_channels, H_l, W_l), finest first."""
        outs = [conv(features[f]) for conv, f in zip(self.lateral, self.in_features)]
        x = features[self.in_features[-1]]
        for conv in self.extra:
            x = conv(x)
            outs.append(x)
        return outs
