# Copyright (c) align-detr contributors.
"""The DETR optimizer: parameter groups (backbone learning-rate multiplier, no weight decay on
norms and embeddings), AdamW or SGD, and full-model gradient clipping."""

import itertools
from typing import Any, Dict, List, Type

import torch
from detectron2.layers.batch_norm import LayerNorm as D2LayerNorm
from detectron2.solver.build import maybe_add_gradient_clipping, reduce_param_groups

__all__ = [
    "build_detr_optimizer",
    "get_detr_optimizer_params",
    "maybe_add_full_model_gradient_clipping",
]

# Normalisation layers get SOLVER.WEIGHT_DECAY_NORM (detectron2's list, plus its channels-first
# LayerNorm). FrozenBatchNorm2d has buffers only, so it never shows up.
_NORM_MODULE_TYPES = (
    torch.nn.modules.batchnorm._BatchNorm,  # BatchNorm1d/2d/3d, SyncBatchNorm, NaiveSyncBatchNorm
    torch.nn.GroupNorm,
    torch.nn.modules.instancenorm._InstanceNorm,
    torch.nn.LayerNorm,
    torch.nn.LocalResponseNorm,
    D2LayerNorm,
)


def _is_embedding(module: torch.nn.Module, param_name: str) -> bool:
    # nn.Embedding tables (content queries, DN label embedding) and bare parameters whose own
    # name says they are an embedding (e.g. "level_embed"). Only the parameter's own name is
    # checked, so heads such as "class_embed.weight" (nn.Linear) keep their weight decay.
    return isinstance(module, torch.nn.Embedding) or "embed" in param_name


def get_detr_optimizer_params(
    model: torch.nn.Module,
    base_lr: float,
    weight_decay: float,
    weight_decay_norm: float = 0.0,
    weight_decay_embed: float = 0.0,
    backbone_multiplier: float = 0.1,
    linear_proj_multiplier: float = 1.0,
) -> List[Dict[str, Any]]:
    """Parameter groups of the DETR recipe.

    Like detectron2's ``get_default_optimizer_params(weight_decay_norm=...)``, plus what this
    detectron2 version lacks: no weight decay on embeddings, and a learning-rate multiplier for
    every parameter whose full name contains "backbone". Frozen parameters are left out.

    Args:
        model (nn.Module): the model.
        base_lr (float): learning rate of every non-backbone parameter.
        weight_decay (float): weight decay of every parameter that is neither a norm nor an
            embedding.
        weight_decay_norm (float): weight decay of the parameters of normalisation layers.
        weight_decay_embed (float): weight decay of nn.Embedding weights and of parameters whose
            own name contains "embed".
        backbone_multiplier (float): learning-rate factor of the backbone.
        linear_proj_multiplier (float): learning-rate factor of the deformable attentions'
            sampling-offset projections (names containing "sampling_offsets").

    Returns:
        list[dict]: parameter groups (``params``, ``lr``, ``weight_decay``), merged so that
        parameters with equal hyper-parameters share a group.
    """
    params: List[Dict[str, Any]] = []
    memo = set()
    for module_name, module in model.named_modules():
        for param_name, value in module.named_parameters(recurse=False):
            if not value.requires_grad or value in memo:
                continue
            memo.add(value)
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            lr, wd = base_lr, weight_decay
            if isinstance(module, _NORM_MODULE_TYPES):
                wd = weight_decay_norm
            elif _is_embedding(module, param_name):
                wd = weight_decay_embed
            if "backbone" in full_name:
                lr = base_lr * backbone_multiplier
            elif "sampling_offsets" in full_name:
                lr = base_lr * linear_proj_multiplier
            params.append({"params": [value], "lr": lr, "weight_decay": wd})
    return reduce_param_groups(params)


def maybe_add_full_model_gradient_clipping(
    cfg, optimizer_type: Type[torch.optim.Optimizer]
) -> Type[torch.optim.Optimizer]:
    """Adds gradient clipping to an optimizer class, as ``SOLVER.CLIP_GRADIENTS`` asks.

    ``CLIP_TYPE`` "full_model" clips the L2 norm (``NORM_TYPE``) of all gradients together at
    ``CLIP_VALUE``, as DETR does; detectron2 itself only clips per parameter, so "value" and
    "norm" are handed to its ``maybe_add_gradient_clipping``.

    Clipping happens inside ``step()``, so under AMP it sees the gradients that ``GradScaler``
    has already unscaled.

    Args:
        cfg (CfgNode): the config.
        optimizer_type (type): a ``torch.optim.Optimizer`` subclass.

    Returns:
        type: ``optimizer_type`` itself when clipping is off, else a subclass of it.
    """
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not clip.ENABLED:
        return optimizer_type
    if clip.CLIP_TYPE != "full_model":
        return maybe_add_gradient_clipping(cfg, optimizer_type)
    max_norm, norm_type = clip.CLIP_VALUE, clip.NORM_TYPE

    def step(self, closure=None):
        all_params = itertools.chain(*[g["params"] for g in self.param_groups])
        torch.nn.utils.clip_grad_norm_(all_params, max_norm, norm_type)
        return super(clipped_type, self).step(closure)

    clipped_type = type(
        optimizer_type.__name__ + "WithFullModelGradientClip", (optimizer_type,), {"step": step}
    )
    return clipped_type


def build_detr_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Builds the optimizer named by ``SOLVER.OPTIMIZER`` ("ADAMW" or "SGD").

    Args:
        cfg (CfgNode): the config; reads ``SOLVER.{OPTIMIZER, BASE_LR, WEIGHT_DECAY,
            WEIGHT_DECAY_NORM, WEIGHT_DECAY_EMBED, BACKBONE_MULTIPLIER, LINEAR_PROJ_MULTIPLIER,
            MOMENTUM, NESTEROV, CLIP_GRADIENTS}``.
        model (nn.Module): the model.

    Returns:
        torch.optim.Optimizer

    Raises:
        ValueError: for an unknown ``SOLVER.OPTIMIZER``.
    """
    params = get_detr_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        weight_decay_embed=cfg.SOLVER.WEIGHT_DECAY_EMBED,
        backbone_multiplier=cfg.SOLVER.BACKBONE_MULTIPLIER,
        linear_proj_multiplier=cfg.SOLVER.LINEAR_PROJ_MULTIPLIER,
    )
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name == "ADAMW":
        optimizer_type, kwargs = torch.optim.AdamW, {}
    elif name == "SGD":
        optimizer_type = torch.optim.SGD
        kwargs = {"momentum": cfg.SOLVER.MOMENTUM, "nesterov": cfg.SOLVER.NESTEROV}
    else:
        raise ValueError(
            f"Unknown SOLVER.OPTIMIZER {cfg.SOLVER.OPTIMIZER!r}; expected 'ADAMW' or 'SGD'."
        )
    optimizer_type = maybe_add_full_model_gradient_clipping(cfg, optimizer_type)
    return optimizer_type(
        params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY, **kwargs
    )
