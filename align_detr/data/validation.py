# Copyright (c) align-detr contributors.
"""Checks of the training annotations before training starts.

Errors (a record or annotation the pipeline cannot use) are collected over the whole dataset and
raised together; annotations that detectron2 would silently drop (empty boxes, boxes entirely
outside their image) are removed with a logged warning.
"""

import logging
import math
import os
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch.utils.data as torchdata
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.build import filter_images_with_only_crowd_annotations
from detectron2.structures import BoxMode

__all__ = [
    "DatasetValidationError",
    "load_and_validate_dataset_dicts",
    "validate_dataset_dicts",
]

logger = logging.getLogger(__name__)

_REQUIRED_IMAGE_FIELDS = ("file_name", "height", "width")
_REQUIRED_ANNOTATION_FIELDS = ("bbox", "bbox_mode", "category_id")
_COCO_FIELDS_HINT = (
    "COCO json files need, per image, id, file_name, height and width, and per annotation, id, "
    "image_id, bbox [x, y, w, h], category_id and iscrowd."
)
# Outcomes of the annotation check that keep the dataset trainable.
_DROP_EMPTY = "zero or negative size"
_DROP_OUTSIDE = "entirely outside the image"
_KEEP = "keep"
_CLIPPED = "clipped"


class DatasetValidationError(ValueError):
    """A training dataset that cannot be trained on; the message lists every problem found."""


class _Findings:
    """Problems found in one dataset, by kind, with where each one is."""

    def __init__(self):
        self.errors: Dict[str, List[str]] = defaultdict(list)
        self.dropped: Dict[str, List[str]] = defaultdict(list)
        self.clipped = 0


def _finite_numbers(values) -> bool:
    try:
        return all(math.isfinite(float(v)) for v in values)
    except (TypeError, ValueError):
        return False


def check_record(record: Dict[str, Any], where: str, check_files: bool) -> Optional[str]:
    """The error of one image record ("kind: detail"), or None when it is usable."""
    missing = [k for k in _REQUIRED_IMAGE_FIELDS if k not in record]
    if missing:
        return f"image record without {', '.join(missing)}: {where}"
    h, w = record["height"], record["width"]
    if not _finite_numbers((h, w)) or h <= 0 or w <= 0:
        return f"image height / width not positive: {where}: height={h}, width={w}"
    if check_files and not os.path.isfile(record["file_name"]):
        return f"image file not found: {record['file_name']}"
    return None


def check_annotation(obj: Dict[str, Any], height: float, width: float) -> str:
    """What to do with one annotation of an image of the given size.

    Returns:
        "keep", "clipped" (kept; partly outside the image, the mapper clips it), one of the drop
        reasons, or an error "kind: detail" for an annotation that cannot be used.
    """
    missing = [k for k in _REQUIRED_ANNOTATION_FIELDS if k not in obj]
    if missing:
        return f"annotation without {', '.join(missing)}: "
    box = obj["bbox"]
    if not isinstance(box, (list, tuple, np.ndarray)) or len(box) != 4:
        return f"bbox is not 4 numbers: bbox={box!r}"
    if not _finite_numbers(box):
        return f"bbox has a non-finite value: bbox={list(box)}"
    mode = obj["bbox_mode"]
    if mode not in (BoxMode.XYXY_ABS, BoxMode.XYWH_ABS):
        return _KEEP  # relative / rotated modes: left to detectron2
    x0, y0, x1, y1 = BoxMode.convert([float(v) for v in box], mode, BoxMode.XYXY_ABS)
    if x1 <= x0 or y1 <= y0:
        return _DROP_EMPTY
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        return _DROP_OUTSIDE
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        return _CLIPPED
    return _KEEP


def _report(findings: _Findings, name: str, max_listed: int, header: Optional[str] = None) -> None:
    """Raises for the errors of a dataset (one message: ``header``, then the first
    ``max_listed`` problems of each kind); logs what was dropped or will be clipped."""
    if findings.errors:
        lines = []
        for kind, items in findings.errors.items():
            listed = "; ".join(items[:max_listed])
            more = f" (and {len(items) - max_listed} more)" if len(items) > max_listed else ""
            lines.append(f"  - {kind}: {len(items)} x, e.g. {listed}{more}")
        if header is None:
            header = f"Training dataset {name!r} has problems that must be fixed before training:"
        raise DatasetValidationError(header + "\n" + "\n".join(lines) + "\n" + _COCO_FIELDS_HINT)
    for kind, items in findings.dropped.items():
        logger.warning(
            "Dataset %r: dropped %d annotation(s) with boxes %s, e.g. %s",
            name,
            len(items),
            kind,
            "; ".join(items[:max_listed]),
        )
    if findings.clipped:
        logger.warning(
            "Dataset %r: %d box(es) extend beyond their image; they are clipped to it.",
            name,
            findings.clipped,
        )


def validate_dataset_dicts(
    dicts: List[Dict[str, Any]], name: str, check_files: bool = True, max_listed: int = 5
) -> List[Dict[str, Any]]:
    """Checks the dataset dicts of one training set before training starts.

    Errors (raised together in one :class:`DatasetValidationError`): a record without
    ``file_name`` / ``height`` / ``width`` or with a non-positive size, an annotation without
    ``bbox`` / ``bbox_mode`` / ``category_id``, a bbox that is not 4 finite numbers, a missing
    image file (``check_files``).

    Annotations that detectron2's pipeline would silently drop are removed here with a logged
    warning: boxes of zero or negative width or height and boxes entirely outside the image.
    Boxes partly outside the image are kept (the mapper clips them), and counted in the log.
    Images without annotations are left to ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``.

    Args:
        dicts (list[dict]): detectron2 dataset dicts (boxes in any absolute ``BoxMode``).
        name (str): the dataset name, for the messages.
        check_files (bool): also check that every image file exists.
        max_listed (int): problems listed per kind.

    Returns:
        list[dict]: the dicts, with the unusable annotations removed (copies where changed).

    Raises:
        DatasetValidationError: listing every problem found.
    """
    findings = _Findings()
    out = []
    for i, record in enumerate(dicts):
        where = f"image {record.get('image_id', i)!r} ({record.get('file_name', '?')})"
        problem = check_record(record, where, check_files)
        if problem is not None:
            kind, detail = problem.split(": ", 1)
            findings.errors[kind].append(detail)
            continue
        annos = record.get("annotations", [])
        kept = []
        for j, obj in enumerate(annos):
            awhere = f"{where}, annotation {obj.get('id', j)!r}"
            verdict = check_annotation(obj, record["height"], record["width"])
            if verdict in (_KEEP, _CLIPPED):
                findings.clipped += verdict == _CLIPPED
                kept.append(obj)
            elif verdict in (_DROP_EMPTY, _DROP_OUTSIDE):
                findings.dropped[verdict].append(f"{awhere}: bbox={list(obj['bbox'])}")
            else:
                kind, detail = verdict.split(": ", 1)
                findings.errors[kind].append(f"{awhere}: {detail}" if detail else awhere)
        if len(kept) != len(annos):
            record = dict(record, annotations=kept)
        out.append(record)
    _report(findings, name, max_listed)
    return out


def load_and_validate_dataset_dicts(
    names: Sequence[str], filter_empty: bool = True, check_files: bool = True
) -> List[Dict[str, Any]]:
    """Loads the named training sets, validates them and concatenates them.

    Like ``get_detection_dataset_dicts`` for box detection, with :func:`validate_dataset_dicts`
    on every set and clear errors for a loader that fails on a malformed file.

    Raises:
        DatasetValidationError: a set that fails to load or validate, or nothing left to train on.
    """
    if isinstance(names, str):
        names = [names]
    if not names:
        raise DatasetValidationError("DATASETS.TRAIN is empty: name at least one training set.")
    all_dicts = []
    for name in names:
        json_file = MetadataCatalog.get(name).get("json_file", None)
        source = f" from {json_file}" if json_file else ""
        try:
            dicts = DatasetCatalog.get(name)
        except KeyError as e:
            if name not in DatasetCatalog.list():
                raise
            raise DatasetValidationError(
                f"Training dataset {name!r} cannot be loaded{source}: a record lacks the "
                f"field {e}. {_COCO_FIELDS_HINT}"
            ) from e
        except (ValueError, AssertionError, TypeError) as e:
            raise DatasetValidationError(
                f"Training dataset {name!r} cannot be loaded{source}: {e}"
            ) from e
        if isinstance(dicts, torchdata.Dataset):
            raise DatasetValidationError(
                f"Training dataset {name!r} is a torch Dataset; the resumable loader needs a "
                "list of dataset dicts."
            )
        if not dicts:
            raise DatasetValidationError(f"Training dataset {name!r} is empty.")
        all_dicts += validate_dataset_dicts(dicts, name, check_files=check_files)
    if filter_empty:
        all_dicts = filter_images_with_only_crowd_annotations(all_dicts)
        all_dicts = [d for d in all_dicts if d.get("annotations")]
    if not all_dicts:
        raise DatasetValidationError(
            f"No training images with usable annotations left in {list(names)}"
            + (
                " (DATALOADER.FILTER_EMPTY_ANNOTATIONS removed images without boxes)."
                if filter_empty
                else "."
            )
        )
    return all_dicts
