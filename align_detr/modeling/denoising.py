# Copyright (c) align-detr contributors.
"""Contrastive denoising (DINO CDN): noised copies of the ground truth as extra decoder queries.

Layout of the DN part of the decoder queries, per image: G groups of 2 * P slots, P = the
largest GT count in the batch; in each group the first P slots are positive queries (GT boxes
with small noise, label flipped with probability LABEL_NOISE_RATIO / 2), the next P negative
queries (noise between 1 and 2 half-sizes, to be classified as background). Slots beyond an
image's own GT count are padding (zero embedding). The self-attention mask stops the matching
queries from seeing any DN query and stops every DN group from seeing the other groups.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import nn

from align_detr.layers import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid


@dataclass
class DenoisingMeta:
    """Where the DN queries are and which GT each positive one reconstructs."""

    num_groups: int  # G
    group_pad: int  # P, the largest GT count in the batch
    pad_size: int  # number of DN queries = G * 2 * P

    def positive_indices(self, num_gt: int, device=None):
        """(query_idx, gt_idx) of the positive DN queries of an image with num_gt boxes, grouped
        by GT index (as the matchers return them)."""
        gt = torch.arange(num_gt, device=device)
        groups = torch.arange(self.num_groups, device=device) * 2 * self.group_pad
        query = (groups[None, :] + gt[:, None]).flatten()  # GT-major: gt0 in every group, ...
        return query.long(), gt.repeat_interleave(self.num_groups).long()


def denoising_groups(num_dn_queries: int, max_gt: int) -> int:
    """Groups so that positives + negatives come to about 2 * num_dn_queries (DINO's rule)."""
    if max_gt == 0:
        return 0
    return max(1, num_dn_queries // max_gt)


def build_denoising_queries(
    targets: List[Dict[str, torch.Tensor]],
    num_dn_queries: int,
    label_noise_ratio: float,
    box_noise_scale: float,
    num_classes: int,
    label_embed: torch.nn.Embedding,
    num_matching_queries: int,
):
    """Builds the DN queries and the self-attention mask.

    Args:
        targets: per image dicts with "labels" (G_b,) int64 and "boxes" (G_b, 4) normalised
            cxcywh.
        label_embed: embedding of the class labels (num_classes + 1 rows, the last unused
            padding row).
        num_matching_queries: K, the queries that follow the DN part.

    Returns:
        (content (N, pad, d), ref_unact (N, pad, 4), attn_mask (pad + K, pad + K) bool, meta),
        or None when the batch has no GT box.
    """
    device = label_embed.weight.device
    counts = [len(t["labels"]) for t in targets]
    max_gt = max(counts) if counts else 0
    groups = denoising_groups(num_dn_queries, max_gt)
    if groups == 0:
        return None
    n, d = len(targets), label_embed.embedding_dim
    pad = groups * 2 * max_gt
    content = torch.zeros(n, pad, d, device=device)
    ref_unact = torch.zeros(n, pad, 4, device=device)
    for b, t in enumerate(targets):
        g = counts[b]
        if g == 0:
            continue
        labels = t["labels"].to(device).repeat(2 * groups)  # (2G * g,) pos, neg, pos, neg, ...
        boxes = t["boxes"].to(device).repeat(2 * groups, 1)
        negative = torch.arange(2 * groups, device=device).repeat_interleave(g) % 2 == 1
        if label_noise_ratio > 0:
            flip = torch.rand(labels.shape, device=device) < label_noise_ratio * 0.5
            random_labels = torch.randint(0, num_classes, labels.shape, device=device)
            labels = torch.where(flip, random_labels, labels)
        if box_noise_scale > 0:
            xyxy = box_cxcywh_to_xyxy(boxes)
            half = boxes[:, 2:].repeat(1, 2) / 2
            sign = torch.randint(0, 2, boxes.shape, device=device) * 2.0 - 1.0
            part = torch.rand(boxes.shape, device=device)
            part = part + negative[:, None].float()  # negatives: between 1 and 2 half-sizes
            xyxy = (xyxy + sign * part * half * box_noise_scale).clamp(0.0, 1.0)
            boxes = box_xyxy_to_cxcywh(xyxy)
        slots = torch.arange(2 * groups, device=device).repeat_interleave(
            g
        ) * max_gt + torch.arange(g, device=device).repeat(2 * groups)
        content[b, slots] = label_embed(labels)
        ref_unact[b, slots] = inverse_sigmoid(boxes)
    total = pad + num_matching_queries
    attn_mask = torch.zeros(total, total, dtype=torch.bool, device=device)
    attn_mask[pad:, :pad] = True  # matching queries never see the DN queries
    for gi in range(groups):  # each DN group sees only itself (and the matching queries)
        lo, hi = gi * 2 * max_gt, (gi + 1) * 2 * max_gt
        attn_mask[lo:hi, :lo] = True
        attn_mask[lo:hi, hi:pad] = True
    return content, ref_unact, attn_mask, DenoisingMeta(groups, max_gt, pad)


@dataclass
class DenoisingQueries:
    """The DN part of the decoder queries of a batch.

    Attributes:
        content: (N, pad, d) label embeddings of the noised labels (zeros in padding slots).
        ref_unact: (N, pad, 4) noised GT boxes in inverse-sigmoid space.
        attn_mask: (pad + K, pad + K) bool self-attention mask, True where blocked.
        meta: where the DN queries are.
    """

    content: torch.Tensor
    ref_unact: torch.Tensor
    attn_mask: torch.Tensor
    meta: DenoisingMeta


class ContrastiveDenoising(nn.Module):
    """DINO's contrastive denoising queries, with their label embedding.

    Args:
        num_classes: C; the label embedding has C + 1 rows (the last is never a real label).
        d_model: d.
        num_queries: DN queries per image (positive + negative, over all groups).
        label_noise_ratio: twice the probability of flipping a label.
        box_noise_scale: box noise in units of half the box size.
    """

    def __init__(
        self,
        num_classes: int,
        d_model: int,
        num_queries: int = 100,
        label_noise_ratio: float = 0.5,
        box_noise_scale: float = 1.0,
    ):
        super().__init__()
        if num_queries < 1:
            raise ValueError(f"ContrastiveDenoising: num_queries must be >= 1, got {num_queries}")
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale
        self.label_embed = nn.Embedding(num_classes + 1, d_model)

    def forward(self, targets, num_matching_queries: int) -> Optional[DenoisingQueries]:
        """DN queries for the batch's targets, or None when the batch has no GT box."""
        dn = build_denoising_queries(
            targets,
            self.num_queries,
            self.label_noise_ratio,
            self.box_noise_scale,
            self.num_classes,
            self.label_embed,
            num_matching_queries,
        )
        return None if dn is None else DenoisingQueries(*dn)
