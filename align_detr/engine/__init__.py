# Copyright (c) align-detr contributors.
"""Training: the detectron2 trainer with the DETR optimizer, data pipeline and evaluator;
single-image inference and drawing (the demo)."""

from .trainer import (
    Trainer,
    build_detr_optimizer,
    get_detr_optimizer_params,
    maybe_add_full_model_gradient_clipping,
)
from .predictor import Predictor, dataset_metadata, draw_predictions

__all__ = [k for k in globals().keys() if not k.startswith("_")]
