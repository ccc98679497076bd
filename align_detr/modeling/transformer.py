"""DINO-style deformable transformer: MSDeformAttn encoder, two-stage query selection, and a
decoder with iterative box refinement (look-forward-twice is applied by the heads, see
align_detr.py).

Shapes: N images, L levels, S = sum(H_l * W_l) tokens, K selected queries, Q = DN + K decoder
queries, d = d_model, C classes.
"""

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from align_detr.layers import MSDeformAttn, box_sine_embedding, inverse_sigmoid


class MLP(nn.Module):
    """num_layers linear layers with ReLU in between (none after the last)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class FFN(nn.Module):
    """Post-norm feed-forward block: norm(x + W2 relu(W1 x))."""

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x):
        return self.norm(x + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x))))))


class EncoderLayer(nn.Module):
    def __init__(self, d_model, n_levels, n_heads, n_points, dim_feedforward, dropout):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)
        self.ffn = FFN(d_model, dim_feedforward, dropout)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask):
        """src, pos: (N, S, d); reference_points: (N, S, L, 2); padding_mask: (N, S) bool."""
        attn = self.self_attn(
            src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask
        )
        return self.ffn(self.norm(src + self.dropout(attn)))


class DecoderLayer(nn.Module):
    """Self-attention among queries, deformable cross-attention into the memory, FFN."""

    def __init__(self, d_model, n_levels, n_heads, n_points, dim_feedforward, dropout):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.norm_self = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm_cross = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.ffn = FFN(d_model, dim_feedforward, dropout)

    def forward(
        self,
        tgt,
        query_pos,
        reference_points,
        memory,
        spatial_shapes,
        level_start_index,
        memory_padding_mask,
        self_attn_mask,
    ):
        """
        Args:
            tgt, query_pos: (N, Q, d).
            reference_points: (N, Q, L, 4) boxes scaled to each level's valid area.
            memory: (N, S, d); memory_padding_mask: (N, S) bool.
            self_attn_mask: optional (Q, Q) bool, True where attention is blocked.
        """
        q = k = tgt + query_pos
        attn = self.self_attn(q, k, tgt, attn_mask=self_attn_mask, need_weights=False)[0]
        tgt = self.norm_self(tgt + self.dropout(attn))
        attn = self.cross_attn(
            tgt + query_pos,
            reference_points,
            memory,
            spatial_shapes,
            level_start_index,
            memory_padding_mask,
        )
        tgt = self.norm_cross(tgt + self.dropout(attn))
        return self.ffn(tgt)


def valid_ratios_of(masks: List[torch.Tensor]) -> torch.Tensor:
    """Fraction of each level that is real image, per image: (N, L, 2) as (w, h)."""
    ratios = []
    for mask in masks:
        _, h, w = mask.shape
        valid_h = (~mask[:, :, 0]).sum(1).float() / h
        valid_w = (~mask[:, 0, :]).sum(1).float() / w
        ratios.append(torch.stack([valid_w, valid_h], -1))
    return torch.stack(ratios, 1)


def encoder_reference_points(spatial_shapes, valid_ratios):
    """Pixel centres of every level, normalised to the valid area, seen from every level.

    Returns:
        (N, S, L, 2) normalised (x, y).
    """
    points = []
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        dev = valid_ratios.device
        ys, xs = torch.meshgrid(
            torch.arange(h, dtype=torch.float32, device=dev) + 0.5,
            torch.arange(w, dtype=torch.float32, device=dev) + 0.5,
            indexing="ij",
        )
        ys = ys.reshape(1, -1) / (valid_ratios[:, None, lvl, 1] * h)
        xs = xs.reshape(1, -1) / (valid_ratios[:, None, lvl, 0] * w)
        points.append(torch.stack([xs, ys], -1))
    points = torch.cat(points, 1)
    return points[:, :, None] * valid_ratios[:, None]


def encoder_proposals(memory, padding_mask, spatial_shapes):
    """One proposal box per encoder token: its pixel centre with side 0.05 * 2^level.

    Returns:
        proposals: (N, S, 4) in inverse-sigmoid space (finite; 0 where invalid),
        valid: (N, S) bool, tokens that are real image and whose box lies inside (0.01, 0.99).
    """
    n = memory.shape[0]
    proposals, start = [], 0
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        mask = padding_mask[:, start : start + h * w].view(n, h, w)
        start += h * w
        valid_h = (~mask[:, :, 0]).sum(1).float()
        valid_w = (~mask[:, 0, :]).sum(1).float()
        ys, xs = torch.meshgrid(
            torch.arange(h, dtype=torch.float32, device=memory.device),
            torch.arange(w, dtype=torch.float32, device=memory.device),
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
    return proposals, valid


class DeformableTransformer(nn.Module):
    """Encoder + two-stage selection + decoder. The prediction heads live in the model and are
    passed in (they are shared between refinement and the outputs).

    Args:
        class_heads: L_dec + 1 class heads (decoder layers, then the encoder head).
        box_heads: L_dec + 1 box MLPs, same order.
    """

    def __init__(
        self,
        d_model: int = 256,
        n_heads: int = 8,
        n_levels: int = 4,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        enc_n_points: int = 4,
        dec_n_points: int = 4,
        enc_dim_feedforward: int = 2048,
        dec_dim_feedforward: int = 2048,
        enc_dropout: float = 0.0,
        dec_dropout: float = 0.0,
        num_queries: int = 900,
        decoder_layer_factory=None,
        query_generator: Optional[nn.Module] = None,
    ):
        super().__init__()
        self.d_model = d_model
        self.n_levels = n_levels
        self.num_queries = num_queries
        self.encoder_layers = nn.ModuleList(
            EncoderLayer(d_model, n_levels, n_heads, enc_n_points, enc_dim_feedforward, enc_dropout)
            for _ in range(num_encoder_layers)
        )
        make_layer = decoder_layer_factory or (
            lambda: DecoderLayer(
                d_model, n_levels, n_heads, dec_n_points, dec_dim_feedforward, dec_dropout
            )
        )
        self.decoder_layers = nn.ModuleList(make_layer() for _ in range(num_decoder_layers))
        self.decoder_norm = nn.LayerNorm(d_model)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.level_embed = nn.Parameter(torch.empty(n_levels, d_model))
        # two-stage: memory -> proposal features, then the encoder heads score / refine them
        self.enc_output = nn.Linear(d_model, d_model)
        self.enc_output_norm = nn.LayerNorm(d_model)
        # mixed query selection: learnt content queries (replaced by SD-DETR's generator)
        self.query_generator = query_generator
        self.tgt_embed = nn.Embedding(num_queries, d_model) if query_generator is None else None
        self._reset_parameters()

    def _reset_parameters(self):
        # Xavier for the transformer's own weights; the query generator keeps its own init.
        for name, p in self.named_parameters():
            if p.dim() > 1 and not name.startswith("query_generator."):
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)
        if self.tgt_embed is not None:
            nn.init.normal_(self.tgt_embed.weight)

    def encode(self, srcs, masks, pos_embeds):
        """Flattens the levels and runs the encoder.

        Args:
            srcs, pos_embeds: L tensors (N, d, H_l, W_l); masks: L tensors (N, H_l, W_l) bool.

        Returns:
            dict with memory (N, S, d), padding_mask (N, S), spatial_shapes (L, 2) int64,
            level_start_index (L,), valid_ratios (N, L, 2).
        """
        flat_src, flat_mask, flat_pos, shapes = [], [], [], []
        for lvl, (src, mask, pos) in enumerate(zip(srcs, masks, pos_embeds)):
            shapes.append(src.shape[-2:])
            flat_src.append(src.flatten(2).transpose(1, 2))
            flat_mask.append(mask.flatten(1))
            flat_pos.append(pos.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))
        src = torch.cat(flat_src, 1)
        padding_mask = torch.cat(flat_mask, 1)
        pos = torch.cat(flat_pos, 1)
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=src.device)
        areas = spatial_shapes.prod(1)
        level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
        valid_ratios = valid_ratios_of(masks)
        reference_points = encoder_reference_points(spatial_shapes, valid_ratios)
        memory = src
        for layer in self.encoder_layers:
            memory = layer(
                memory, pos, reference_points, spatial_shapes, level_start_index, padding_mask
            )
        return {
            "memory": memory,
            "padding_mask": padding_mask,
            "spatial_shapes": spatial_shapes,
            "level_start_index": level_start_index,
            "valid_ratios": valid_ratios,
        }

    def select_queries(self, enc, class_head, box_head):
        """Two-stage query selection: top-K tokens by max class logit.

        Returns:
            dict with enc_logits (N, K, C), enc_boxes (N, K, 4) sigmoid boxes (undetached, for
            the encoder loss), ref_unact (N, K, 4) detached inverse-sigmoid initial references,
            tgt (N, K, d) content queries, topk_index (N, K).
        """
        memory = enc["memory"]
        proposals, valid = encoder_proposals(memory, enc["padding_mask"], enc["spatial_shapes"])
        output_memory = memory.masked_fill(~valid[..., None], 0.0)
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        logits = class_head(output_memory)  # (N, S, C)
        coords_unact = box_head(output_memory) + proposals  # (N, S, 4)
        k = min(self.num_queries, memory.shape[1])
        # invalid tokens (padding, proposals off the image) are never selected when avoidable
        scores = logits.max(-1)[0].masked_fill(~valid, -1e4)
        topk_index = scores.topk(k, dim=1)[1]  # (N, K)
        gather = lambda t: torch.gather(
            t, 1, topk_index[..., None].expand(-1, -1, t.shape[-1])
        )  # noqa: E731
        coords_sel = gather(coords_unact)
        out = {
            "enc_logits": gather(logits),
            "enc_boxes": coords_sel.sigmoid(),
            "ref_unact": coords_sel.detach(),
            "topk_index": topk_index,
        }
        if self.query_generator is None:
            out["tgt"] = self.tgt_embed.weight[None, :k].expand(memory.shape[0], -1, -1)
        else:  # SD-DETR: one content query per stream, sampled inside each proposal
            out["tgt"] = self.query_generator(
                enc, coords_sel.detach().sigmoid(), gather(output_memory)
            )
        return out

    def decode(self, tgt, ref_unact, enc, box_heads, self_attn_mask=None):
        """Runs the decoder with iterative box refinement.

        Args:
            tgt: (N, Q, d) queries (DN queries first, then the K matching queries); a tuple of
                two such tensors for the decoupled decoder (classification, localisation).
            ref_unact: (N, Q, 4) initial references in inverse-sigmoid space (detached).
            box_heads: per-layer box MLPs used for refinement.
            self_attn_mask: optional (Q, Q) bool.

        Returns:
            hidden: list over layers of normalised (N, Q, d) outputs (tuples when decoupled:
                the class stream first),
            references: list over layers of the (N, Q, 4) sigmoid reference each layer's box
                head adds to (undetached from layer 2 on: look-forward-twice).
        """
        reference = ref_unact.sigmoid()
        reference_for_loss = reference
        valid_ratios = enc["valid_ratios"]
        output = tgt
        hidden, references = [], []
        for layer_id, layer in enumerate(self.decoder_layers):
            ref_input = reference[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
            query_pos = self.ref_point_head(box_sine_embedding(ref_input[:, :, 0], self.d_model))
            output = layer(
                output,
                query_pos,
                ref_input,
                enc["memory"],
                enc["spatial_shapes"],
                enc["level_start_index"],
                enc["padding_mask"],
                self_attn_mask,
            )
            if isinstance(output, tuple):
                hidden.append(tuple(self.decoder_norm(o) for o in output))
                loc_stream = output[1]
            else:
                hidden.append(self.decoder_norm(output))
                loc_stream = output
            references.append(reference_for_loss)
            # Refinement: the next layer starts from this layer's box, detached (DINO); the
            # next layer's loss adds its delta to the undetached box (look-forward-twice).
            new_reference = (box_heads[layer_id](loc_stream) + inverse_sigmoid(reference)).sigmoid()
            reference_for_loss = new_reference
            reference = new_reference.detach()
        return hidden, references
