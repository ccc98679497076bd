# Copyright (c) align-detr contributors.
"""Datasets of this project, registered with detectron2 by :func:`register_trees` (which
``train_net.py``, ``demo/demo.py`` and the tools call) when their files exist.

The tree-crown quickstart data written by ``tools/prepare_trees.py`` under
``$ALIGN_DETR_DATASETS/trees`` (default ``./datasets/trees``): ``trees_train`` / ``trees_val``
(every image split into a training part and a held-out part) and ``trees_xsite_train`` /
``trees_xsite_val`` (train on one site, test on two others).
NEON airborne imagery with crown boxes by the DeepForest authors; one class, "tree".
"""

import os

from detectron2.data import DatasetCatalog
from detectron2.data.datasets import register_coco_instances

__all__ = ["datasets_root", "register_trees"]

TREE_CLASSES = ("tree",)  # the one category of tools/prepare_trees.py
TREE_SPLITS = ("train", "val", "xsite_train", "xsite_val")


def datasets_root() -> str:
    """Root folder of this project's datasets: ``$ALIGN_DETR_DATASETS`` or ``./datasets``."""
    return os.path.abspath(os.path.expanduser(os.getenv("ALIGN_DETR_DATASETS", "datasets")))


def register_trees(root: str = None) -> list:
    """Registers the ``trees_*`` datasets whose json and image folder exist under
    ``root/trees``; already registered names are left alone. Returns the names registered."""
    base = os.path.join(root or datasets_root(), "trees")
    done = []
    for split in TREE_SPLITS:
        name = f"trees_{split}"
        json_file = os.path.join(base, "annotations", f"trees_{split}.json")
        image_root = os.path.join(base, split)
        if name in DatasetCatalog.list() or not os.path.isfile(json_file):
            continue
        # The class names are known without reading the json (demo / Visualizer need them).
        register_coco_instances(name, {"thing_classes": list(TREE_CLASSES)}, json_file, image_root)
        done.append(name)
    return done
