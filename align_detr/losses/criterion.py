# Copyright (c) align-detr contributors.
"""The set criterion: matching plus classification and box losses for every output.

Outputs of one forward pass (see AlignDETR.forward): the encoder proposals, each decoder layer,
the DN queries of each decoder layer and, for H-Deformable-DETR, each decoder layer of the
one-to-many (hybrid) query group. The plan per output says how many queries each GT gets (k; 1 is
one-to-one) and whether rank weights apply. The classification loss type is shared: "focal"
(DINO), "align" (Align-DETR) or "tal" (SD-DETR's task-alignment loss).
"""

from typing import Dict, List, Optional, Sequence

import torch
from detectron2.utils import comm
from torch import nn

from align_detr.layers import box_cxcywh_to_xyxy, paired_iou_and_giou

from .align import align_cls_loss, quality_target, rank_weights
from .focal import sigmoid_focal_loss
from .tal import tal_cls_loss


def _focal_class_loss(crit, logits, query, labels, iou, weight, normalizer):
    onehot = torch.zeros_like(logits)
    onehot[query, labels] = 1.0
    return sigmoid_focal_loss(logits, onehot, crit.focal_alpha, crit.gamma) / normalizer


def _align_class_loss(crit, logits, query, labels, iou, weight, normalizer):
    return align_cls_loss(logits, query, labels, iou, weight, crit.alpha, crit.gamma, normalizer)


def _tal_class_loss(crit, logits, query, labels, iou, weight, normalizer):
    return tal_cls_loss(logits, query, labels, iou, weight, crit.gamma, normalizer)


#: Classification losses by name: (criterion, logits (B*Q, C), matched flat query (P,), labels
#: (P,), IoU (P,), rank weights (P,), normalizer) -> scalar.
CLASS_LOSSES = {"focal": _focal_class_loss, "align": _align_class_loss, "tal": _tal_class_loss}


class SetCriterion(nn.Module):
    """
    Args:
        num_classes: C.
        matcher: callable (outputs, targets, k) -> per image (query_idx, gt_idx) grouped by GT.
        match_k: queries per GT for [encoder, decoder layer 1, ..., decoder layer N].
        loss_type: "focal", "align" or "tal".
        class_weight, bbox_weight, giou_weight: loss weights (1, 5, 2 in the papers).
        focal_alpha: focal loss alpha (focal only).
        alpha: quality-target exponent for "align" (t = s^alpha IoU^(1-alpha)); "tal" uses 0.25
            as in SD-DETR.
        gamma: focusing exponent of every loss type.
        tau: rank-weight temperature; weights apply to outputs with k > 1.
        dn_enabled: the model adds DN queries (their losses are always reported).
        class_agnostic_enc: match and supervise the encoder output with every GT as class 0
            (Deformable / H-Deformable DETR's two-stage proposals).
        hybrid_k: H-DETR's one-to-many branch: queries per GT (its GT "repeated k times",
            matched as k-to-one on the GT itself: the same optimum without a k times larger
            cost matrix).
        hybrid_weight: weight of every one-to-many loss term (H-DETR's lambda).
        hybrid_rank_weighted: rank weights exp(-rank / tau) among each GT's k one-to-many
            positives (Align-DETR on H-DETR); off in H-DETR itself.
    """

    def __init__(
        self,
        num_classes: int,
        matcher,
        match_k: Sequence[int],
        loss_type: str = "focal",
        class_weight: float = 1.0,
        bbox_weight: float = 5.0,
        giou_weight: float = 2.0,
        focal_alpha: float = 0.25,
        alpha: float = 0.25,
        gamma: float = 2.0,
        tau: float = 1.5,
        dn_enabled: bool = True,
        class_agnostic_enc: bool = False,
        hybrid_k: int = 6,
        hybrid_weight: float = 1.0,
        hybrid_rank_weighted: bool = False,
    ):
        super().__init__()
        if loss_type not in CLASS_LOSSES:
            raise ValueError(
                f"SetCriterion: loss_type must be one of {sorted(CLASS_LOSSES)}, got {loss_type!r}"
            )
        if any(int(k) != k or k < 1 for k in match_k):
            raise ValueError(
                f"SetCriterion: match_k entries must be integers >= 1, got {list(match_k)}"
            )
        if tau <= 0:
            raise ValueError(f"SetCriterion: tau must be > 0, got {tau}")
        if int(hybrid_k) != hybrid_k or hybrid_k < 1 or hybrid_weight < 0:
            raise ValueError(
                f"SetCriterion: hybrid_k must be an integer >= 1 and hybrid_weight >= 0, got "
                f"{hybrid_k} and {hybrid_weight}"
            )
        self.num_classes = num_classes
        self.matcher = matcher
        self.match_k = [int(k) for k in match_k]
        self.loss_type = loss_type
        self.class_weight = class_weight
        self.bbox_weight = bbox_weight
        self.giou_weight = giou_weight
        self.focal_alpha = focal_alpha
        self.alpha = alpha
        self.gamma = gamma
        self.tau = tau
        self.dn_enabled = dn_enabled
        self.class_agnostic_enc = class_agnostic_enc
        self.hybrid_k = int(hybrid_k)
        self.hybrid_weight = hybrid_weight
        self.hybrid_rank_weighted = hybrid_rank_weighted

    # ---- one output ------------------------------------------------------------------------

    def output_losses(self, out, targets, indices, normalizer, rank_weighted: bool):
        """Losses of one output given its matching.

        Args:
            out: pred_logits (B, Q, C), pred_boxes (B, Q, 4) sigmoid cxcywh.
            indices: per image (query_idx, gt_idx), grouped by GT.
            normalizer: the (process-averaged) GT count, times DN groups for DN outputs.
            rank_weighted: apply exp(-rank / tau) to the positives of each GT.

        Returns:
            dict with weighted "class", "bbox", "giou" scalars.
        """
        logits, boxes = out["pred_logits"], out["pred_boxes"]
        b, q, c = logits.shape
        device = logits.device
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)]).to(
            device
        )
        query_idx = torch.cat([src for src, _ in indices]).to(device)
        gt_idx = torch.cat([tgt for _, tgt in indices]).to(device)
        labels = torch.cat(
            [t["labels"][j.to(t["labels"].device)] for t, (_, j) in zip(targets, indices)]
        ).to(device)
        gt_boxes = torch.cat(
            [t["boxes"][j.to(t["boxes"].device)] for t, (_, j) in zip(targets, indices)]
        ).to(device)
        # GT ids unique across the batch, for grouping the positives of each GT
        offsets = torch.cumsum(torch.tensor([0] + [len(t["labels"]) for t in targets[:-1]]), 0)
        group = gt_idx + offsets.to(device)[batch_idx] if len(targets) else gt_idx

        pred = boxes[batch_idx, query_idx]
        iou, giou = paired_iou_and_giou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(gt_boxes))
        weight = torch.ones_like(iou)
        if rank_weighted and pred.shape[0] > 0:
            score = logits[batch_idx, query_idx, labels].sigmoid()
            weight = rank_weights(quality_target(score, iou, self.alpha), group, self.tau)

        class_loss = CLASS_LOSSES[self.loss_type]
        loss_class = class_loss(
            self,
            logits.reshape(b * q, c),
            batch_idx * q + query_idx,
            labels,
            iou,
            weight,
            normalizer,
        )
        loss_bbox = (weight * (pred - gt_boxes).abs().sum(-1)).sum() / normalizer
        loss_giou = (weight * (1 - giou)).sum() / normalizer
        return {
            "class": loss_class * self.class_weight,
            "bbox": loss_bbox * self.bbox_weight,
            "giou": loss_giou * self.giou_weight,
        }

    # ---- every output ----------------------------------------------------------------------

    def num_boxes(self, targets, device, clamp: bool = True) -> float:
        """GT boxes per process, averaged over processes (at least 1 with ``clamp``)."""
        n = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        world = comm.get_world_size()
        if world > 1:
            torch.distributed.all_reduce(n)
        return max(n.item() / world, 1.0) if clamp else n.item() / world

    @staticmethod
    def _layer_suffixes(layers) -> List[str]:
        """_0 .. _{N-2} for the intermediate decoder layers, "" for the last one."""
        return [f"_{i}" for i in range(len(layers) - 1)] + [""]

    def forward(
        self, outputs: Dict, targets: List[Dict[str, torch.Tensor]]
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            outputs: "layers": list over decoder layers of {pred_logits, pred_boxes} (matching
                queries); "enc": the encoder proposals (or None for a base without them);
                "dn_layers": list over decoder layers of the DN queries' predictions, or None;
                "dn_meta": the DenoisingMeta of the DN queries, or None.
            targets: per image "labels" (G_b,) int64 and "boxes" (G_b, 4) normalised cxcywh.

        Returns:
            loss dict: loss_{class,bbox,giou} for the final layer, with suffixes _0.._{N-2} for
            the other layers, _enc for the encoder, _dn / _dn_i for DN, and the suffix
            _one2many after those of the one-to-many layers ("one2many_layers", H-DETR).
        """
        layers = outputs["layers"]
        named = [(s, out, targets) for s, out in zip(self._layer_suffixes(layers), layers)]
        if outputs.get("enc") is not None:
            enc_targets = targets
            if self.class_agnostic_enc:
                enc_targets = [dict(t, labels=torch.zeros_like(t["labels"])) for t in targets]
            named.insert(0, ("_enc", outputs["enc"], enc_targets))
        if len(self.match_k) != len(named):
            raise ValueError(
                f"SetCriterion: match_k has {len(self.match_k)} entries but the model gave "
                f"{len(named)} matched outputs"
            )
        device = layers[-1]["pred_logits"].device
        num_gt = self.num_boxes(targets, device, clamp=False)  # one all-reduce per step
        normalizer = max(num_gt, 1.0)
        losses = {}

        def add(prefix_suffix: str, parts: Dict[str, torch.Tensor]):
            for name, value in parts.items():
                losses[f"loss_{name}{prefix_suffix}"] = value

        for (suffix, out, tgts), k in zip(named, self.match_k):
            indices = self.matcher(out, tgts, k=k)
            add(suffix, self.output_losses(out, tgts, indices, normalizer, rank_weighted=k > 1))

        one2many: Optional[List] = outputs.get("one2many_layers")
        if one2many is not None:
            k = self.hybrid_k
            # H-DETR normalises by the GT count of its repeated targets: k times the GT count
            norm = max(num_gt * k, 1.0)
            ranked = self.hybrid_rank_weighted and k > 1
            for suffix, out in zip(self._layer_suffixes(one2many), one2many):
                indices = self.matcher(out, targets, k=k)
                parts = self.output_losses(out, targets, indices, norm, rank_weighted=ranked)
                add(suffix + "_one2many", {n: v * self.hybrid_weight for n, v in parts.items()})

        dn_layers: Optional[List] = outputs.get("dn_layers")
        dn_meta = outputs.get("dn_meta")
        if dn_layers is not None and dn_meta is not None:
            dn_indices = [dn_meta.positive_indices(len(t["labels"])) for t in targets]
            dn_norm = normalizer * dn_meta.num_groups
            for i, out in enumerate(dn_layers):
                suffix = "_dn" if i == len(dn_layers) - 1 else f"_dn_{i}"
                add(suffix, self.output_losses(out, targets, dn_indices, dn_norm, False))
        elif self.dn_enabled:
            # DN is on but the batch has no GT box: keep the loss dict's keys stable (detectron2
            # logs and sums them every iteration) with zeros that keep the graph connected
            zero = layers[-1]["pred_logits"].sum() * 0.0
            for i in range(len(layers)):
                suffix = "_dn" if i == len(layers) - 1 else f"_dn_{i}"
                add(suffix, {"class": zero, "bbox": zero, "giou": zero})
        return losses
