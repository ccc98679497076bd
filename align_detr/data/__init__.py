# Copyright (c) align-detr contributors.
"""Data pipeline: the DETR dataset mapper, validation of the training annotations, the resumable
training loader, and this project's datasets (registered by :func:`register_trees`)."""

from .build import ResumableBatchSampler, build_resumable_train_loader
from .dataset_mapper import DetrDatasetMapper, build_detr_augmentations
from .datasets import datasets_root, register_trees
from .validation import (
    DatasetValidationError,
    load_and_validate_dataset_dicts,
    validate_dataset_dicts,
)

__all__ = [k for k in globals().keys() if not k.startswith("_")]
