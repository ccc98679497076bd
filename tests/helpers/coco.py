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
