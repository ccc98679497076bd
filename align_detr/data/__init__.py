# Copyright (c) align-detr contributors.
"""Data pipeline: the DETR dataset mapper, and this project's datasets (registered on import)."""

from .dataset_mapper import DetrDatasetMapper, build_detr_augmentations
from .datasets import datasets_root, register_trees

__all__ = [k for k in globals().keys() if not k.startswith("_")]
