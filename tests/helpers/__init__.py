"""Helpers shared by the tests: configs, a tiny COCO dataset on disk, loading scripts."""

from align_detr.utils.synthetic import batched_input, synthetic_image

from .coco import (
    CVAT_CATEGORY_IDS,
    CVAT_CLASS_NAMES,
    register_coco,
    unregister,
    write_coco,
    write_cvat_export,
    write_labelme_export,
)
from .configs import ROOT, config_path, repo_cfg, tiny_cfg
from .golden import batched_differences_without_padding_mask, golden_fixture, golden_model
from .scripts import load_script, run_train_net, train_then_evaluate
from .steps import sgd_steps

__all__ = [
    "CVAT_CATEGORY_IDS",
    "CVAT_CLASS_NAMES",
    "ROOT",
    "batched_differences_without_padding_mask",
    "batched_input",
    "config_path",
    "golden_fixture",
    "golden_model",
    "load_script",
    "register_coco",
    "repo_cfg",
    "run_train_net",
    "sgd_steps",
    "synthetic_image",
    "tiny_cfg",
    "train_then_evaluate",
    "unregister",
    "write_coco",
    "write_cvat_export",
    "write_labelme_export",
]
