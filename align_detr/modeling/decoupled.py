# Copyright (c) align-detr contributors.
"""SD-DETR: spatially decoupled classification and localisation in the decoder.

:class:`DecoupledDecoderLayer`: one self-attention shared by the two query streams
(classification and localisation tokens concatenated, 2Q tokens, the DN mask tiled 2x2), then a
separate cross-attention block (cross-attention + norm + FFN) per stream (SD-DETR's
"disentangled feature learning"; the paper's Eq. 3). Each stream may have its own positional
query and its own reference (the paper's Fig. 3), or share the base's. The blocks come from the
base detector, so the layer works on any base whose decoder layer is "self-attention, then a
cross-attention block": deformable blocks on DINO, conditional ones on Conditional DETR.
Table 3's control, the whole decoder layer split, gives each stream its own self-attention too.

The task-aware query generator lives in :mod:`.task_aware` (re-exported here).
"""

from typing import Callable, Optional, Union

import torch
from torch import nn

from .streams import Streams
from .task_aware import TaskAwareQueryGenerator

__all__ = ["DecoupledDecoderLayer", "TaskAwareQueryGenerator", "per_stream"]


def per_stream(x: Union[torch.Tensor, Streams]) -> Streams:
    """``x`` as Streams: a tensor serves both streams."""
    return x if isinstance(x, Streams) else Streams.single(x)


class DecoupledDecoderLayer(nn.Module):
    """Shared self-attention over both streams, then one cross-attention block per stream.

    Args:
        make_self_attn: builds a block ``(x (N, L, d), pos (N, L, d), mask (L, L) or None) ->
            x``; called once (shared, over L = 2Q tokens) or, with ``split_self_attn``, twice
            (one per stream, over its Q tokens: Table 3's whole-decoder split).
        make_cross_block: builds a cross-attention block ``(x, query_pos, reference_points,
            memory) -> x``; called twice (classification, localisation).
        split_self_attn: see above.
    """

    def __init__(
        self,
        make_self_attn: Union[nn.Module, Callable[[], nn.Module]],
        make_cross_block: Callable[[], nn.Module],
        split_self_attn: bool = False,
    ):
        super().__init__()
        # a built module is accepted for the shared case (the original signature)
        self.self_attn = make_self_attn if isinstance(make_self_attn, nn.Module) else None
        if self.self_attn is None:
            self.self_attn = make_self_attn()
        self.self_attn_loc: Optional[nn.Module] = None
        if split_self_attn:
            if isinstance(make_self_attn, nn.Module):
                raise ValueError("split_self_attn needs a factory for the self-attention")
            self.self_attn_loc = make_self_attn()
        self.cross_cls = make_cross_block()
        self.cross_loc = make_cross_block()

    def forward(self, queries: Streams, query_pos, reference_points, memory, self_attn_mask=None):
        """
        Args:
            queries: the two streams, each (N, Q, d); a single stream starts both from it.
            query_pos: (N, Q, d), or Streams of one per stream.
            reference_points: the base's cross-attention references (a tensor shared by both
                streams, or Streams of one per stream).
            self_attn_mask: optional (Q, Q) bool; tiled to (2Q, 2Q) so a classification token
                and its localisation partner keep exactly the original visibility.

        Returns:
            Streams, each (N, Q, d).
        """
        pos, ref = per_stream(query_pos), per_stream(reference_points)
        if self.self_attn_loc is not None:
            x_cls = self.self_attn(queries.cls, pos.cls, self_attn_mask)
            x_loc = self.self_attn_loc(queries.loc, pos.loc, self_attn_mask)
        else:
            n_q = queries.cls.shape[1]
            x = torch.cat([queries.cls, queries.loc], 1)
            mask = self_attn_mask.repeat(2, 2) if self_attn_mask is not None else None
            x = self.self_attn(x, torch.cat([pos.cls, pos.loc], 1), mask)
            x_cls, x_loc = x[:, :n_q], x[:, n_q:]
        return Streams(
            self.cross_cls(x_cls, pos.cls, ref.cls, memory),
            self.cross_loc(x_loc, pos.loc, ref.loc, memory),
        )
