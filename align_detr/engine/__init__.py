# Copyright (c) align-detr contributors.
"""Training: the detectron2 trainer with the DETR optimizer, data pipeline and evaluator."""

from .trainer import (
    Trainer,
    build_detr_optimizer,
    get_detr_optimizer_params,
    maybe_add_full_model_gradient_clipping,
)

__all__ = [k for k in globals().keys() if not k.startswith("_")]
