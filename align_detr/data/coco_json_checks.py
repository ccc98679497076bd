# Copyright (c) align-detr contributors.
"""Checks of a COCO-format json named in the config (``DATASETS.*_JSON``).

:func:`inspect_coco_json` finds every problem of a json at once (missing fields, duplicate or
unknown ids, boxes outside their image, image files not found) and raises one
:class:`DatasetValidationError` naming the file, the config key and the first bad entries of
each kind; :mod:`.coco_json` registers the checked json and resolves the config from it.
"""

import json
import os
from collections import defaultdict
from typing import Any, Dict, List, NamedTuple, Tuple

from detectron2.structures import BoxMode

from .validation import (
    _DROP_EMPTY,
    _DROP_OUTSIDE,
    DatasetValidationError,
    _Findings,
    _finite_numbers,
    _report,
    check_annotation,
)

__all__ = ["CocoJsonSummary", "inspect_coco_json", "missing_coco_json_files"]

_MAX_LISTED = 5


class CocoJsonSummary(NamedTuple):
    """What the rest of the pipeline needs to know about one checked COCO json."""

    json_file: str  # absolute path
    image_root: str  # absolute path
    thing_classes: List[str]  # category names, in the order of their sorted ids
    category_ids: List[int]  # sorted; contiguous id i is category_ids[i]
    num_images: int
    num_empty_images: int  # images without any annotation
    num_annotations: int


class _Parsed(NamedTuple):
    summary: CocoJsonSummary
    findings: _Findings
    file_names: List[str]  # per image, as written in the json


# (json path, mtime, size, image_root, for_evaluation) -> _Parsed. load_config runs more than
# once per process (train_net's parent check, then main), so the json is read once.
_CACHE: Dict[Tuple, _Parsed] = {}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _where_image(img: Dict[str, Any]) -> str:
    return f"image id={img.get('id')!r} ({img.get('file_name', '?')})"


def _parse(json_file: str, image_root: str, for_evaluation: bool, key: str) -> _Parsed:
    try:
        with open(json_file, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetValidationError(f"COCO json {json_file} ({key}) is not valid JSON: {e}") from e
    top = [
        k
        for k in ("images", "annotations", "categories")
        if not isinstance(data, dict) or not isinstance(data.get(k), list)
    ]
    if top:
        raise DatasetValidationError(
            f"COCO json {json_file} ({key}) is not a COCO instances file: it needs the lists "
            f"{', '.join(repr(k) for k in top)} at its top level."
        )
    findings = _Findings()
    err = findings.errors

    categories = {}
    for i, cat in enumerate(data["categories"]):
        if (
            not isinstance(cat, dict)
            or not _is_int(cat.get("id"))
            or not isinstance(cat.get("name"), str)
        ):
            err["category without an integer id and a string name"].append(
                f"categories[{i}]={cat!r}"
            )
        elif cat["id"] in categories:
            err["duplicate category id"].append(f"id={cat['id']} ({cat['name']!r})")
        else:
            categories[cat["id"]] = cat["name"]
    if not data["categories"]:
        err["no categories"].append("the 'categories' list is empty")

    images: Dict[Any, Dict[str, Any]] = {}
    bad_images = set()  # listed but unusable: their annotations are not reported again
    file_names = []
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict):
            err["image record that is not an object"].append(f"images[{i}]={img!r}")
            continue
        where = _where_image(img)
        if isinstance(img.get("id"), (int, str)):
            bad_images.add(img["id"])  # until it passes every check below
        missing = [k for k in ("id", "file_name", "height", "width") if k not in img]
        if missing:
            err[f"image record without {', '.join(missing)}"].append(f"images[{i}] {where}")
            continue
        h, w = img["height"], img["width"]
        if not (isinstance(h, (int, float)) and isinstance(w, (int, float))):
            err["image height / width not numbers"].append(f"{where}: height={h!r}, width={w!r}")
            continue
        if not _finite_numbers((h, w)) or h <= 0 or w <= 0:
            err["image height / width not positive"].append(f"{where}: height={h}, width={w}")
            continue
        if not isinstance(img["id"], (int, str)) or isinstance(img["id"], bool):
            err["image id not an integer or a string"].append(where)
            continue
        if img["id"] in images:
            err["duplicate image id"].append(where)
            continue
        images[img["id"]] = img
        bad_images.discard(img["id"])
        file_names.append(str(img["file_name"]))

    required = ("id", "image_id", "bbox", "category_id") + (("area",) if for_evaluation else ())
    known_ids = sorted(categories)
    shown_ids = ", ".join(map(str, known_ids[:10])) + (", ..." if len(known_ids) > 10 else "")
    ann_ids = set()
    annotated = set()
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            err["annotation that is not an object"].append(f"annotations[{i}]={ann!r}")
            continue
        where = f"annotation id={ann.get('id')!r} (image id={ann.get('image_id')!r})"
        missing = [k for k in required if k not in ann]
        if missing:
            kind = f"annotation without {', '.join(missing)}"
            if "area" in missing:
                kind += " (pycocotools' evaluation needs 'area')"
            err[kind].append(f"annotations[{i}] {where}")
            continue
        if ann["id"] in ann_ids:  # detectron2's loader asserts unique annotation ids
            err["duplicate annotation id"].append(where)
        ann_ids.add(ann["id"])
        img = images.get(ann["image_id"])
        if img is None:
            if ann["image_id"] not in bad_images:
                err["annotation of an image id not in 'images'"].append(where)
            continue
        annotated.add(ann["image_id"])
        if ann["category_id"] not in categories:
            err[f"category_id not among the categories' ids ({shown_ids})"].append(
                f"{where}: category_id={ann['category_id']!r}"
            )
        obj = {"bbox": ann["bbox"], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0}
        verdict = check_annotation(obj, img["height"], img["width"])
        size = f"{img['width']}x{img['height']}"
        if verdict == _DROP_OUTSIDE:
            err[
                "box [x, y, w, h] entirely outside its image (wrong image size or box format?)"
            ].append(f"{where}: bbox={ann['bbox']} in a {size} image")
        elif verdict == _DROP_EMPTY:
            # A stray click in an annotation tool; the training pipeline drops these (logged).
            findings.dropped[verdict].append(f"{where}: bbox={ann['bbox']}")
        elif verdict.startswith("bbox "):
            kind, detail = verdict.split(": ", 1)
            err[kind].append(f"{where}: {detail}")

    cat_ids = sorted(categories)
    summary = CocoJsonSummary(
        json_file=json_file,
        image_root=image_root,
        thing_classes=[categories[c] for c in cat_ids],
        category_ids=cat_ids,
        num_images=len(images),
        num_empty_images=len(images) - len(annotated),
        num_annotations=len(data["annotations"]),
    )
    return _Parsed(summary, findings, file_names)


def missing_coco_json_files(summary: CocoJsonSummary, file_names: List[str]) -> List[str]:
    """The ``file_name`` entries with no file under ``summary.image_root``."""
    return [f for f in file_names if not os.path.isfile(os.path.join(summary.image_root, f))]


def inspect_coco_json(
    json_file: str,
    image_root: str,
    for_evaluation: bool = False,
    check_files: bool = True,
    key: str = "json",
    max_listed: int = _MAX_LISTED,
) -> CocoJsonSummary:
    """Checks a COCO instances json (and its image files) and summarises it.

    Errors, all collected and raised together: a file that is not JSON or lacks the
    ``images`` / ``annotations`` / ``categories`` lists; an image without ``id``, ``file_name``,
    ``height`` or ``width`` or with a non-positive size; a category without an integer ``id`` and
    a ``name``; duplicate ids; an annotation without ``id``, ``image_id``, ``bbox`` or
    ``category_id`` (and ``area`` when ``for_evaluation``: pycocotools needs it); an annotation
    of an image or a category the json does not list; a bbox that is not 4 finite numbers or lies
    entirely outside its image; an image file not found under ``image_root``
    (``check_files``). Boxes of zero size are only logged (the training pipeline drops them).

    Args:
        json_file (str): the COCO json.
        image_root (str): the folder the images' ``file_name`` entries are relative to.
        for_evaluation (bool): the json will be scored by ``COCOEvaluator``.
        check_files (bool): also check that every image file exists.
        key (str): the config key that names the json, for the message.
        max_listed (int): bad entries listed per kind of problem.

    Returns:
        CocoJsonSummary

    Raises:
        FileNotFoundError: the json or the image folder does not exist.
        DatasetValidationError: naming the file and the first bad entries of each kind.
    """
    json_file, image_root = os.path.abspath(json_file), os.path.abspath(image_root)
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"{key}: COCO json not found: {json_file}")
    st = os.stat(json_file)
    cache_key = (json_file, st.st_mtime_ns, st.st_size, image_root, for_evaluation, key)
    parsed = _CACHE.get(cache_key)
    if parsed is None:
        parsed = _CACHE[cache_key] = _parse(json_file, image_root, for_evaluation, key)
    summary, findings = parsed.summary, parsed.findings
    if check_files:
        if not os.path.isdir(image_root):
            raise FileNotFoundError(f"{key}: image folder of {json_file} not found: {image_root}")
        missing = missing_coco_json_files(summary, parsed.file_names)
        if missing:
            # A copy: the cached findings stay those of the json alone.
            findings = _Findings()
            findings.errors = defaultdict(list, parsed.findings.errors)
            findings.dropped = parsed.findings.dropped
            findings.errors[f"image file not found under {image_root}"] = missing
    _report(
        findings,
        json_file,
        max_listed,
        header=f"COCO json {json_file} ({key}) has problems; fix them and run again:",
    )
    return summary
