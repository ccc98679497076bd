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

__all__ = ["Streams"]


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
