# Copyright (c) align-detr contributors.
"""Deployment: the detector as one graph (:class:`ExportableDetector`), its ``torch.export``
(pt2) and ONNX files (:mod:`.formats`), and a predictor that runs them (:mod:`.runtime`).
``tools/export_model.py`` is the command line; docs/deploy.md the guide."""

from .detector import ExportableDetector, padding_mask
from .formats import MSDA_FLAVOURS, export_onnx, export_pt2, load_pt2, onnx_metadata, trace
from .runtime import ExportedPredictor, compare_detections, export_metadata, resized_batch

__all__ = [
    "ExportableDetector",
    "ExportedPredictor",
    "MSDA_FLAVOURS",
    "compare_detections",
    "export_metadata",
    "export_onnx",
    "export_pt2",
    "load_pt2",
    "onnx_metadata",
    "padding_mask",
    "resized_batch",
    "trace",
]
