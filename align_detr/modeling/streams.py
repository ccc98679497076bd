# Copyright (c) align-detr contributors.
"""The decoder's query streams.

SD-DETR decouples the decoder into a classification stream and a localisation stream; the
class heads read the first, the box heads (and box refinement) the second. A plain decoder has
one stream, which :class:`Streams` represents as the same tensor in both fields, so every part
downstream (denoising-query concatenation, heads, refinement) reads ``.cls`` / ``.loc`` without
knowing which decoder produced them.
"""

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

__all__ = ["StreamEmbedding", "Streams"]


@dataclass(frozen=True)
class Streams:
    """Queries of the decoder, each (N, Q, d).

    Attributes:
        cls: the classification stream (what the class heads read).
        loc: the localisation stream (what the box heads read); the same tensor object as
            ``cls`` for a single-stream decoder.
    """

    cls: torch.Tensor
    loc: torch.Tensor

    @classmethod
    def single(cls, x: torch.Tensor) -> "Streams":
        """One stream serving both tasks."""
        return cls(x, x)

    @property
    def is_single(self) -> bool:
        return self.cls is self.loc

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Streams":
        """Applies ``fn`` to each stream (once when there is a single stream)."""
        if self.is_single:
            return Streams.single(fn(self.cls))
        return Streams(fn(self.cls), fn(self.loc))


class StreamEmbedding(nn.Module):
    """A learnt vector per stream added to its content queries, so that the two streams differ
    from the first decoder layer on even when they start from the same content (SD-DETR
    without task-aware queries, or Conditional DETR's zero content).

    Args:
        d_model: d.
    """

    def __init__(self, d_model: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(2, d_model))
        # small against the LayerNorm-scaled content, large against Conditional DETR's zeros
        nn.init.normal_(self.weight, std=0.1)

    def forward(self, queries: Streams) -> Streams:
        """(N, Q, d) per stream -> the same plus the stream's vector (always two streams)."""
        return Streams(queries.cls + self.weight[0], queries.loc + self.weight[1])
