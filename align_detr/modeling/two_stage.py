# Copyright (c) align-detr contributors.
"""Two-stage query selection (Deformable DETR / DINO): every encoder token proposes a box, the
encoder's heads score and refine the proposals, and the top-K become the decoder's initial
reference boxes. Their content queries come from a separate module (mixed query selection:
learnt embeddings in DINO; sampled inside each box in SD-DETR).

Shapes: N images, S encoder tokens, K selected queries, d = d_model, C classes.
"""

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import nn

from align_detr.layers import inverse_sigmoid

from .encoder import EncoderMemory
from .streams import Streams

__all__ = [
    "SCORE_MODES",
    "SELECTION_MODES",
    "LearntContentQueries",
    "SelectedQueries",
    "TwoStageQuerySelector",
    "encoder_proposals",
]


def encoder_proposals(
    padding_mask: torch.Tensor, shapes: List[Tuple[int, int]], dtype=torch.float32
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One proposal box per encoder token: its pixel centre with side 0.05 * 2^level.

    Args:
        padding_mask: (N, S) bool, True on padding.
        shapes: the L level sizes (H_l, W_l).

    Returns:
        proposals: (N, S, 4) in inverse-sigmoid space (finite; 0 where invalid),
        valid: (N, S) bool, tokens that are real image and whose box lies inside (0.01, 0.99).
    """
    n = padding_mask.shape[0]
    device = padding_mask.device
    proposals, start = [], 0
    for lvl, (h, w) in enumerate(shapes):
        mask = padding_mask[:, start : start + h * w].view(n, h, w)
        start += h * w
        valid_h = (~mask[:, :, 0]).sum(1).float()
        valid_w = (~mask[:, 0, :]).sum(1).float()
        ys, xs = torch.meshgrid(
            torch.arange(h, dtype=torch.float32, device=device),
            torch.arange(w, dtype=torch.float32, device=device),
            indexing="ij",
        )
        grid = torch.stack([xs, ys], -1)[None] + 0.5  # (1, H, W, 2)
        scale = torch.stack([valid_w, valid_h], -1).clamp(min=1).view(n, 1, 1, 2)
        grid = grid / scale
        wh = torch.full_like(grid, 0.05 * (2.0**lvl))
        proposals.append(torch.cat([grid, wh], -1).view(n, -1, 4))
    proposals = torch.cat(proposals, 1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1) & ~padding_mask
    proposals = inverse_sigmoid(proposals).masked_fill(~valid[..., None], 0.0)
    return proposals.to(dtype), valid


@dataclass
class SelectedQueries:
    """The decoder's matching queries and the encoder output they came from.

    Attributes:
        queries: content queries (N, K, d) per stream.
        ref_unact: (N, K, 4) initial reference boxes in inverse-sigmoid space, detached.
        enc_logits: (N, K, C) the encoder head's logits of the selected tokens (for its loss).
        enc_boxes: (N, K, 4) their sigmoid boxes, undetached.
        token_logits: (N, S, C) the encoder head's logits of every token (H-Deformable-DETR
            supervises all of them).
        token_boxes: (N, S, 4) the sigmoid boxes of every token, undetached (1 where invalid
            with ``selection="all"``).
        centres: (N, K, 2) per stream, the image-normalised position the content module
            derived each query from (SD-DETR's task-aware points), or None.
    """

    queries: Streams
    ref_unact: torch.Tensor
    enc_logits: torch.Tensor
    enc_boxes: torch.Tensor
    token_logits: Optional[torch.Tensor] = None
    token_boxes: Optional[torch.Tensor] = None
    centres: Optional[Streams] = None


class LearntContentQueries(nn.Module):
    """DINO's mixed query selection: K learnt content embeddings, the same for every image.

    Args:
        num_queries: K.
        d_model: d.
        init: "xavier" (the released DINO / Align-DETR code) or "normal" (nn.Embedding's
            N(0, 1), as H-Deformable-DETR).
    """

    def __init__(self, num_queries: int, d_model: int, init: str = "xavier"):
        super().__init__()
        if init not in ("xavier", "normal"):
            raise ValueError(
                f'LearntContentQueries: init must be "xavier" or "normal", got {init!r}'
            )
        self.embed = nn.Embedding(num_queries, d_model)
        if init == "xavier":
            nn.init.xavier_uniform_(self.embed.weight)

    def forward(self, memory: EncoderMemory, boxes: torch.Tensor, token_features: torch.Tensor):
        """Returns (one stream of (N, K, d) content queries, None): boxes and features are
        unused, and the queries have no position of their own."""
        n, k = boxes.shape[:2]
        return Streams.single(self.embed.weight[None, :k].expand(n, -1, -1)), None


#: Which encoder tokens two-stage selection may pick.
SELECTION_MODES = ("all", "valid")

#: What ranks the tokens: the max class logit (DINO) or the logit of class 0 (Deformable DETR /
#: H-Deformable-DETR, whose encoder is trained class-agnostically with every GT as class 0).
SCORE_MODES = ("max", "first")


class TwoStageQuerySelector(nn.Module):
    """Scores every encoder token with the encoder heads and keeps the top K.

    Invalid tokens (padding, or a proposal box not inside (0.01, 0.99)) have their features
    zeroed before the heads, so they all share one score. ``selection`` says what happens to them:

    - ``"all"`` (the released DINO / Align-DETR code): the top-K runs over every token; an
      invalid token's proposal is at infinity, so if it is picked its reference box is
      (1, 1, 1, 1). Published checkpoints reproduce their outputs only this way.
    - ``"valid"``: invalid tokens are never picked while K valid ones exist.

    Args:
        d_model: d.
        num_queries: K (at most S are kept).
        content: module ``(memory, boxes (N, K, 4), token_features (N, K, d)) -> (Streams,
            centres)`` giving the content queries of the selected boxes (and, or None, the
            per-stream points they came from).
        selection: "all" or "valid".
        score: "max" or "first" (:data:`SCORE_MODES`).
    """

    def __init__(
        self, d_model: int, num_queries: int, content: nn.Module, selection="all", score="max"
    ):
        super().__init__()
        if selection not in SELECTION_MODES:
            raise ValueError(
                f"TwoStageQuerySelector: selection must be one of {SELECTION_MODES}, got "
                f"{selection!r}"
            )
        if score not in SCORE_MODES:
            raise ValueError(
                f"TwoStageQuerySelector: score must be one of {SCORE_MODES}, got {score!r}"
            )
        self.selection = selection
        self.score = score
        self.num_queries = num_queries
        self.enc_output = nn.Linear(d_model, d_model)
        self.enc_output_norm = nn.LayerNorm(d_model)
        self.content = content

    def forward(
        self,
        enc: EncoderMemory,
        class_head: nn.Module,
        box_head: nn.Module,
        num_queries: Optional[int] = None,
    ):
        """Returns the :class:`SelectedQueries` of the top-K tokens by score (K =
        ``num_queries`` when given, e.g. H-DETR's one-to-one + one-to-many count in training)."""
        memory = enc.memory
        proposals, valid = encoder_proposals(enc.padding_mask, enc.shapes, memory.dtype)
        output_memory = memory.masked_fill(~valid[..., None], 0.0)
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        logits = class_head(output_memory)  # (N, S, C)
        scores = logits.max(-1)[0] if self.score == "max" else logits[..., 0]
        if self.selection == "all":
            proposals = proposals.masked_fill(~valid[..., None], float("inf"))
        else:
            scores = scores.masked_fill(~valid, -1e4)
        coords_unact = box_head(output_memory) + proposals  # (N, S, 4)
        k = min(num_queries or self.num_queries, memory.shape[1])
        topk_index = scores.topk(k, dim=1)[1]  # (N, K)

        def gather(t):
            return torch.gather(t, 1, topk_index[..., None].expand(-1, -1, t.shape[-1]))

        coords_sel = gather(coords_unact)
        boxes = coords_sel.detach().sigmoid()
        queries, centres = self.content(enc, boxes, gather(output_memory))
        return SelectedQueries(
            queries=queries,
            ref_unact=coords_sel.detach(),
            enc_logits=gather(logits),
            enc_boxes=coords_sel.sigmoid(),
            token_logits=logits,
            token_boxes=coords_unact.sigmoid(),
            centres=centres,
        )
