# Copyright (c) align-detr contributors.
"""Training: the detectron2 trainer with the DETR optimizer, data pipeline and evaluator;
checkpoints, hooks, single-image inference and drawing (the demo)."""

from . import d2_compat
from .checkpoint import (
    AtomicCheckpointer,
    CheckpointLoadError,
    check_weights_file,
    load_checkpoint,
)
from .hooks import EMAHook, ModelEMA, ResumeStateHook
from .predictor import Predictor, dataset_metadata, draw_predictions
from .solver import (
    build_detr_optimizer,
    get_detr_optimizer_params,
    maybe_add_full_model_gradient_clipping,
)
from .trainer import Trainer, check_finite_losses, test_with_tta

__all__ = [k for k in globals().keys() if not k.startswith("_")]
