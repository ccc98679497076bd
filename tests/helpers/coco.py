"""A tiny COCO-format dataset written to disk, and its registration with detectron2."""

import json
import os

import cv2
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from align_detr.utils.synthetic import synthetic_image


def write_coco(folder, num_images=3):
    """Writes images with two coloured boxes each and their COCO json; returns the json path."""
    os.makedirs(folder, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        boxes = ((10 + 5 * i, 20, 60 + 5 * i, 80), (70, 15 + 3 * i, 115, 70 + 3 * i))
        name = f"img{i}.png"
        cv2.imwrite(os.path.join(folder, name), synthetic_image(boxes=boxes, seed=i))
        images.append({"id": i + 1, "file_name": name, "height": 128, "width": 128})
        for j, (x0, y0, x1, y1) in enumerate(boxes):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": j + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                }
            )
    categories = [{"id": 1, "name": "red"}, {"id": 2, "name": "green"}]
    path = os.path.join(folder, "annotations.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return path


def unregister(name: str) -> None:
    """Removes a dataset from detectron2's catalogs (no-op when absent)."""
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)


def register_coco(name: str, json_file: str, image_root: str, metadata=None) -> str:
    """(Re-)registers a COCO json dataset under ``name``; returns the name."""
    unregister(name)
    register_coco_instances(name, dict(metadata or {}), json_file, image_root)
    return name


def _draw(path: str, boxes, seed: int, h: int = 128, w: int = 128) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cv2.imwrite(path, synthetic_image(h=h, w=w, boxes=boxes, seed=seed))


def _polygon(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def write_labelme_export(folder: str, num_images: int = 3) -> str:
    """A COCO json as labelme's ``labelme2coco.py`` writes it: ``info`` / ``licenses``, image
    and annotation ids from 0, category ids from 1 (``supercategory`` None), images under
    ``JPEGImages/`` with ``file_name`` relative to the json's folder, polygon ``segmentation``
    lists, ``area`` and ``iscrowd``. Two classes, "red" (1) and "green" (2). Returns the json."""
    images, annotations = [], []
    for i in range(num_images):
        boxes = ((10 + 5 * i, 20, 60 + 5 * i, 80), (70, 15 + 3 * i, 115, 70 + 3 * i))
        name = f"JPEGImages/img{i}.png"
        _draw(os.path.join(folder, name), boxes, seed=i)
        images.append(
            {
                "license": 0,
                "url": None,
                "file_name": name,
                "height": 128,
                "width": 128,
                "date_captured": None,
                "id": i,
            }
        )
        for j, (x0, y0, x1, y1) in enumerate(boxes):
            annotations.append(
                {
                    "id": len(annotations),
                    "image_id": i,
                    "category_id": j + 1,
                    "segmentation": _polygon(x0, y0, x1, y1),
                    "area": float((x1 - x0) * (y1 - y0)),
                    "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                    "iscrowd": 0,
                }
            )
    data = {
        "info": {"description": None, "url": None, "version": None, "year": 2024},
        "licenses": [{"url": None, "id": 0, "name": None}],
        "images": images,
        "type": "instances",
        "annotations": annotations,
        "categories": [
            {"supercategory": None, "id": 1, "name": "red"},
            {"supercategory": None, "id": 2, "name": "green"},
        ],
    }
    path = os.path.join(folder, "annotations.json")
    with open(path, "w") as f:
        json.dump(data, f)
    return path


#: Category ids of :func:`write_cvat_export`, and their names (in id order).
CVAT_CATEGORY_IDS = (0, 5, 7)
CVAT_CLASS_NAMES = ["red", "green", "unused"]


def write_cvat_export(folder: str, num_images: int = 3) -> tuple:
    """A COCO json as CVAT's "COCO 1.0" export writes it: ``annotations/instances_default.json``
    beside an ``images/`` folder, category ids 0, 5 and 7 (7 never used: non-contiguous, from 0),
    empty ``segmentation`` for boxes, ``attributes``, and one last image without annotations.
    Returns ``(json_file, image_folder)``."""
    image_dir = os.path.join(folder, "images")
    images, annotations = [], []
    for i in range(num_images + 1):
        boxes = () if i == num_images else ((10 + 5 * i, 20, 60 + 5 * i, 80), (70, 15, 115, 70))
        name = f"frame_{i:06d}.png"
        _draw(os.path.join(image_dir, name), boxes, seed=10 + i)
        images.append(
            {
                "id": i + 1,
                "width": 128,
                "height": 128,
                "file_name": name,
                "license": 0,
                "flickr_url": "",
                "coco_url": "",
                "date_captured": 0,
            }
        )
        for j, (x0, y0, x1, y1) in enumerate(boxes):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": CVAT_CATEGORY_IDS[j],
                    "segmentation": [],
                    "area": float((x1 - x0) * (y1 - y0)),
                    "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                    "iscrowd": 0,
                    "attributes": {"occluded": False},
                }
            )
    data = {
        "licenses": [{"name": "", "id": 0, "url": ""}],
        "info": {"contributor": "", "date_created": "", "description": "", "year": ""},
        "categories": [
            {"id": c, "name": n, "supercategory": ""}
            for c, n in zip(CVAT_CATEGORY_IDS, CVAT_CLASS_NAMES)
        ],
        "images": images,
        "annotations": annotations,
    }
    path = os.path.join(folder, "annotations", "instances_default.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f)
    return path, image_dir
