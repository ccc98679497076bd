# Copyright (c) align-detr contributors.
"""Small building blocks of the DETR heads and transformer layers: MLP and the post-norm FFN."""

import torch.nn.functional as F
from torch import nn

__all__ = ["FFN", "MLP"]


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU in between (none after the last).

    Args:
        in_dim, hidden_dim, out_dim: widths of the input, the hidden layers and the output.
        num_layers: number of linear layers (>= 1).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MLP: num_layers must be >= 1, got {num_layers}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        """(..., in_dim) -> (..., out_dim)."""
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class FFN(nn.Module):
    """Post-norm feed-forward block: ``norm(x + W2 relu(W1 x))``, (..., d_model) -> same.

    Args:
        d_model: width of the input and output.
        dim_feedforward: hidden width.
        dropout: dropout after the activation and after the second projection.
    """

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float = 0.0):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x):
        return self.norm(x + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x))))))
