# Copyright (c) align-detr contributors.
"""align-detr: Align-DETR and SD-DETR on DETR base detectors, for detectron2.

Importing the package is cheap: it defines the config keys and registers our compiled ops
with PyTorch's dispatcher (what a ``torch.export``-ed ``.pt2`` file of a model needs to load). The model, backbones and base
detectors are registered with detectron2 by importing :mod:`align_detr.modeling`; the compiled
ops are loaded by :mod:`align_detr.layers` and :mod:`align_detr.matching`; ``train_net.py`` and
``demo/demo.py`` register this project's datasets (:func:`align_detr.data.register_trees`).
"""

import torchvision  # noqa: F401  (registers torchvision::nms, in exported models with NMS)

from . import _ext  # noqa: F401  (registers torch.ops.align_detr.*: an exported .pt2 needs them)
from .config import add_align_detr_config, load_config  # noqa: F401

__version__ = "0.1.0"
