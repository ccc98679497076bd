# Copyright (c) align-detr contributors.
"""Data pipeline: the DETR dataset mapper, validation of the training annotations, the resumable
training loader, this project's datasets (registered by :func:`register_trees`), and the
COCO jsons a config names (``DATASETS.TRAIN_JSON`` ..., :func:`apply_coco_json_config`)."""

from .build import ResumableBatchSampler, build_resumable_train_loader
from .coco_json import apply_coco_json_config, inspect_coco_json
from .dataset_mapper import DetrDatasetMapper, build_detr_augmentations
from .datasets import datasets_root, register_trees
from .validation import (
    DatasetValidationError,
    load_and_validate_dataset_dicts,
    validate_dataset_dicts,
)

__all__ = [k for k in globals().keys() if not k.startswith("_")]
