# Copyright (c) align-detr contributors.
"""Data pipeline: the DETR dataset mapper."""

from .dataset_mapper import DetrDatasetMapper, build_detr_augmentations

__all__ = [k for k in globals().keys() if not k.startswith("_")]
