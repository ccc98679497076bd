# Copyright (c) align-detr contributors.
"""Single-image inference and drawing, for ``demo/demo.py`` and the quickstart report.

:class:`Predictor` does what detectron2's ``DefaultPredictor`` does (test-time resize, input
format, weights loading), loading weights with this project's checkpointer (other
implementations' checkpoints are converted; every weight must load), with checks that fail with
a plain message, plus a confidence threshold and, with ``TEST.AUG.ENABLED``, test-time
augmentation;
:func:`draw_predictions` draws boxes, class names and scores with detectron2's ``Visualizer``.
"""

import os
from typing import Optional, Sequence

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.catalog import Metadata
from detectron2.modeling import build_model
from detectron2.structures import Instances
from detectron2.utils.visualizer import ColorMode, Visualizer

from ..modeling.test_time_augmentation import build_tta_model
from .checkpoint import load_for_inference

__all__ = ["Predictor", "dataset_metadata", "draw_predictions"]

GT_COLOR = (0.1, 0.9, 0.2)  # ground truth: green
PRED_COLOR = (1.0, 0.15, 0.1)  # predictions: red


def dataset_metadata(cfg):
    """Metadata with the class names of ``cfg``'s model: ``MODEL.ALIGN_DETR.CLASS_NAMES`` when
    set (a config saved by a run on ``DATASETS.*_JSON`` has them, so it needs no dataset), else
    the first test (else train) dataset's, with ``thing_classes`` filled in (a COCO json
    registration only sets them once loaded); generic names when unknown."""
    class_names = list(cfg.MODEL.ALIGN_DETR.CLASS_NAMES)
    if class_names:
        # A free-standing Metadata: the catalog's entries refuse to change a value, and one
        # process may load several configs (tests, notebooks).
        return Metadata(name="align_detr_class_names", thing_classes=class_names)
    names = list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN)
    for name in names:
        meta = MetadataCatalog.get(name)
        if not meta.get("thing_classes", None) and name in DatasetCatalog.list():
            try:
                DatasetCatalog.get(name)  # sets thing_classes from the json
            except Exception:  # noqa: BLE001  (files gone: fall through to generic names)
                continue
        if meta.get("thing_classes", None):
            return meta
    meta = MetadataCatalog.get("__align_detr_unnamed__")
    if not meta.get("thing_classes", None):
        meta.thing_classes = [f"class {i}" for i in range(cfg.MODEL.ALIGN_DETR.NUM_CLASSES)]
    return meta


class Predictor:
    """Runs a trained model on single images (numpy HxWx3 uint8, **BGR** as read by OpenCV).

    Args:
        cfg (CfgNode): the model's config; ``MODEL.WEIGHTS`` must name an existing checkpoint.
        confidence_threshold (float): detections below this score are dropped.

    Raises:
        FileNotFoundError: ``MODEL.WEIGHTS`` is empty or does not exist.
    """

    def __init__(self, cfg, confidence_threshold: float = 0.5):
        weights = cfg.MODEL.WEIGHTS
        if not weights:
            raise FileNotFoundError(
                "MODEL.WEIGHTS is empty: the demo needs trained weights, e.g. "
                "--opts MODEL.WEIGHTS output/quickstart/model_final.pth"
            )
        if "://" not in weights and not os.path.isfile(weights):
            raise FileNotFoundError(f"MODEL.WEIGHTS file not found: {os.path.abspath(weights)}")
        if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("MODEL.DEVICE is cuda but no GPU is visible; add MODEL.DEVICE cpu")
        self.cfg = cfg
        self.confidence_threshold = confidence_threshold
        self.metadata = dataset_metadata(cfg)
        self.model = build_model(cfg).eval()
        load_for_inference(cfg, self.model)  # the EMA weights when EMA.ENABLED
        if cfg.TEST.AUG.ENABLED:  # the inference that is scored as "bbox_TTA"
            self.model = build_tta_model(cfg, self.model).eval()
        self.resize = T.ResizeShortestEdge(
            [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
        )
        self.input_format = cfg.INPUT.FORMAT

    @torch.no_grad()
    def __call__(self, image_bgr: np.ndarray) -> Instances:
        """Returns the detections (on the CPU) with score >= the threshold, in image pixels."""
        image = image_bgr[:, :, ::-1] if self.input_format == "RGB" else image_bgr
        height, width = image.shape[:2]
        resized = self.resize.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
        inputs = {"image": tensor.to(self.model.device), "height": height, "width": width}
        instances = self.model([inputs])[0]["instances"].to("cpu")
        return instances[instances.scores >= self.confidence_threshold]


def draw_predictions(
    image_rgb: np.ndarray,
    instances: Instances,
    metadata,
    gt_boxes: Optional[Sequence[Sequence[float]]] = None,
    scale: float = 1.0,
    show_labels: bool = True,
) -> np.ndarray:
    """Draws predicted boxes with "class score%" labels (red) and optional ground-truth xyxy
    boxes (green) on an RGB image; returns the RGB drawing (size = image size x ``scale``)."""
    vis = Visualizer(image_rgb, metadata, scale=scale, instance_mode=ColorMode.IMAGE)
    if gt_boxes is not None and len(gt_boxes):
        vis.overlay_instances(
            boxes=np.asarray(gt_boxes), assigned_colors=[GT_COLOR] * len(gt_boxes)
        )
    n = len(instances)
    if n:
        labels = None
        if show_labels:
            names = metadata.get("thing_classes", None) or []
            classes = instances.pred_classes.tolist()
            labels = [
                f"{names[c] if c < len(names) else c} {s * 100:.0f}%"
                for c, s in zip(classes, instances.scores.tolist())
            ]
        vis.overlay_instances(
            boxes=instances.pred_boxes.tensor.numpy(),
            labels=labels,
            assigned_colors=[PRED_COLOR] * n,
        )
    return vis.output.get_image()
