# Copyright (c) align-detr contributors.
"""Running exported detectors: batching images the way the graph expects, and one predictor for
an ``.onnx`` file (ONNX Runtime) or a ``.pt2`` file (``torch.export.load``).

:func:`resized_batch` is the pre-processing outside the graph (detectron2's test resize, then
top-left padding into one uint8 batch); :class:`ExportedPredictor` gives detectron2
``Instances`` like :class:`~align_detr.engine.predictor.Predictor`, so the demo draws both alike.
"""

from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch

from .formats import load_pt2, onnx_metadata

__all__ = ["ExportedPredictor", "compare_detections", "export_metadata", "resized_batch"]


def compare_detections(
    got, expected, box_tol: float = 0.01, score_tol: float = 1e-4
) -> Dict[str, float]:
    """How many of an exported model's detections PyTorch also gives, and how closely.

    Ranks are not compared: two detections whose scores differ by less than the numerical noise
    (common with random weights) may swap. Each detection of ``got`` is paired with the unused
    detection of ``expected`` of the same image and label whose box is nearest; the pair agrees
    when the box is within ``box_tol`` px and the score within ``score_tol``.

    Args:
        got, expected: (boxes (N, K, 4), scores (N, K), labels (N, K)).

    Returns:
        ``matched``: fraction of detections that agree; ``box_px`` and ``score``: the largest
        |difference| of a box coordinate and of a score among them.
    """
    boxes, scores, labels = (torch.as_tensor(t) for t in got)
    e_boxes, e_scores, e_labels = (torch.as_tensor(t) for t in expected)
    agreed, box_px, score = 0, 0.0, 0.0
    for i in range(boxes.shape[0]):
        free = torch.ones(e_scores.shape[1], dtype=torch.bool)
        for k in range(boxes.shape[1]):
            ok = free & (e_labels[i] == labels[i, k])
            if not bool(ok.any()):
                continue
            dist = (e_boxes[i] - boxes[i, k]).abs().max(-1)[0].masked_fill(~ok, float("inf"))
            j = int(dist.argmin())
            score_diff = float((e_scores[i, j] - scores[i, k]).abs())
            if float(dist[j]) > box_tol or score_diff > score_tol:
                continue
            free[j] = False
            agreed += 1
            box_px, score = max(box_px, float(dist[j])), max(score, score_diff)
    return {"matched": agreed / max(1, scores.numel()), "box_px": box_px, "score": score}


def export_metadata(cfg, class_names: Sequence[str]) -> Dict[str, Any]:
    """What a runner of the exported file needs from the config."""
    return {
        "input_format": cfg.INPUT.FORMAT,
        "min_size_test": int(cfg.INPUT.MIN_SIZE_TEST),
        "max_size_test": int(cfg.INPUT.MAX_SIZE_TEST),
        "class_names": list(class_names),
        "base": cfg.MODEL.ALIGN_DETR.BASE,
        "num_select": int(cfg.MODEL.ALIGN_DETR.NUM_SELECT),
        "test_nms_thresh": float(cfg.MODEL.ALIGN_DETR.TEST_NMS_THRESH),
    }


def _resize(image: np.ndarray, min_size: int, max_size: int) -> np.ndarray:
    from detectron2.data import transforms as T

    return (
        T.ResizeShortestEdge([min_size, min_size], max_size).get_transform(image).apply_image(image)
    )


def resized_batch(
    images_bgr: Sequence[np.ndarray], metadata: Dict[str, Any], resize: bool = True
) -> Tuple[torch.Tensor, torch.Tensor, List[Tuple[int, int]]]:
    """Images (H x W x 3 uint8 BGR, as OpenCV reads them) -> the exported graph's inputs.

    Returns:
        (images, image_sizes, original_sizes): (N, 3, H, W) uint8 in the model's channel order,
        each image at the top-left of the zero-padded batch; (N, 2) int64 (h, w) after the
        resize; the (h, w) of each input, to map boxes back.
    """
    arrays, original = [], []
    for image in images_bgr:
        original.append(image.shape[:2])
        if metadata.get("input_format", "BGR") == "RGB":
            image = image[:, :, ::-1]
        if resize:
            image = _resize(image, metadata["min_size_test"], metadata["max_size_test"])
        arrays.append(np.ascontiguousarray(image.transpose(2, 0, 1)))
    height = max(a.shape[1] for a in arrays)
    width = max(a.shape[2] for a in arrays)
    batch = torch.zeros((len(arrays), 3, height, width), dtype=torch.uint8)
    for i, a in enumerate(arrays):
        batch[i, :, : a.shape[1], : a.shape[2]] = torch.from_numpy(a)
    sizes = torch.tensor([a.shape[1:] for a in arrays], dtype=torch.int64)
    return batch, sizes, original


class ExportedPredictor:
    """Runs an exported ``.onnx`` (ONNX Runtime, CPU) or ``.pt2`` file on BGR images.

    Args:
        path: the exported file.
        confidence_threshold: detections below this score are dropped.
    """

    def __init__(self, path: str, confidence_threshold: float = 0.5):
        self.path = path
        self.confidence_threshold = confidence_threshold
        if path.endswith(".onnx"):
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.log_severity_level = 3  # no "unused initializer" chatter
            self.session = onnxruntime.InferenceSession(
                path, options, providers=["CPUExecutionProvider"]
            )
            self.metadata = onnx_metadata(path)
            self.module = None
        elif path.endswith(".pt2"):
            self.module, self.metadata = load_pt2(path)
            self.session = None
        else:
            raise ValueError(f"exported model must be a .onnx or .pt2 file, got {path}")

    def run(self, images: torch.Tensor, image_sizes: torch.Tensor):
        """The graph's raw outputs (boxes, scores, labels) as tensors, for a prepared batch."""
        if self.session is not None:
            outputs = self.session.run(
                None, {"images": images.numpy(), "image_sizes": image_sizes.numpy()}
            )
            return tuple(torch.from_numpy(o) for o in outputs)
        with torch.no_grad():
            return tuple(self.module(images, image_sizes))

    def __call__(self, image_bgr: np.ndarray):
        """detectron2 Instances (pred_boxes in the input image's pixels, scores, pred_classes)
        with score >= the threshold."""
        from detectron2.structures import Boxes, Instances

        images, sizes, original = resized_batch([image_bgr], self.metadata)
        boxes, scores, labels = self.run(images, sizes)
        (h, w), (rh, rw) = original[0], sizes[0].tolist()
        scale = torch.tensor([w / rw, h / rh, w / rw, h / rh], dtype=boxes.dtype)
        keep = scores[0] >= max(self.confidence_threshold, 1e-12)
        inst = Instances((h, w))
        inst.pred_boxes = Boxes(boxes[0][keep] * scale)
        inst.scores = scores[0][keep]
        inst.pred_classes = labels[0][keep]
        return inst
