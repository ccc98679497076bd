#!/usr/bin/env python
# Copyright (c) align-detr contributors.
"""Builds the tree-crown quickstart dataset (COCO format) from the DeepForest sample data.

The images are NEON airborne RGB orthophotos (10 cm/px) with tree-crown boxes annotated by the
DeepForest authors (Weinstein et al.), shipped in the ``deepforest`` PyPI package
(``deepforest/data/``, VOC XML + PNG). Only those data files are read: ``deepforest`` itself is
never imported (it needs heavy dependencies), so it is installed with ``pip install --no-deps``.

Two protocols, each a train and a test split, all under ``--out`` (default
``$ALIGN_DETR_DATASETS/trees`` or ``./datasets/trees``), one category ("tree")::

    train/, annotations/trees_train.json   tiles of the left part of every annotated image
    val/,   annotations/trees_val.json     tiles of the right ``--holdout`` part of each image
    xsite_train/, annotations/trees_xsite_train.json   tiles of the two YELL crops (whole)
    xsite_val/,   annotations/trees_xsite_val.json     OSBS_029 and SOAP_061, whole

* **Held-out regions** (``trees_train`` / ``trees_val``), what a user does with their own
  imagery: annotate part of it, find the rest. Each of the four images (two NEON YELL crops,
  OSBS_029, SOAP_061) is split at ``x = (1 - holdout) * width``; training tiles lie entirely
  left of the split, test tiles entirely right of it, so no training pixel is ever tested.
* **Cross-site** (``trees_xsite_*``): train on the YELL site only, test on two other sites
  (Florida OSBS, California SOAP) that look nothing like it: a much harder transfer question.

Tiling: tiles of at most ``--tile`` px whose origins are spread evenly so the tiles cover the
region (neighbours overlap a little when the size is not a multiple of the tile; test tiles are
adjacent instead, so each crown is scored once). A box is
clipped to the tile and kept when the clipped part keeps at least ``--min-visible`` of its area
and is at least ``--min-side`` px wide and high; otherwise it is a sliver and dropped (so a crown
cut by the split counts on the side that holds most of it, or on neither). The cross-site test
images are whole, every box clipped to the image. Tiles left without a box are not written.
Each image record carries its ``source`` image and ``window`` (x0, y0, x1, y1) in it.
Re-running with the same options is a no-op (``--force`` rebuilds).

Example::

    python tools/prepare_trees.py            # installs deepforest==2.1.0 --no-deps if missing
    python tools/prepare_trees.py --source path/to/voc_dir --out /tmp/trees
"""

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image

DEEPFOREST_REQ = "deepforest==2.1.0"
TRAIN_IMAGES = (
    "2019_YELL_2_528000_4978000_image_crop2",
    "2019_YELL_2_541000_4977000_image_crop",
)
VAL_IMAGES = ("OSBS_029", "SOAP_061")
#: Fraction of each image's width (its right part) held out for the test split.
HOLDOUT = 0.3
SPLITS = ("train", "val", "xsite_train", "xsite_val")
CATEGORIES = [{"id": 1, "name": "tree", "supercategory": "plant"}]
ATTRIBUTION = (
    "Imagery: NEON (National Ecological Observatory Network, NSF) airborne RGB orthophotos; "
    "tree-crown annotations: the DeepForest authors (Weinstein et al.), from the deepforest "
    "2.1.0 package (MIT)."
)

Box = Tuple[float, float, float, float]


def default_root() -> str:
    return os.path.abspath(os.path.expanduser(os.getenv("ALIGN_DETR_DATASETS", "datasets")))


def read_voc(xml_path: str) -> Tuple[int, int, List[Tuple[str, Box]]]:
    """Reads a VOC XML file.

    Returns:
        (width, height, [(label, (x0, y0, x1, y1)), ...]) with the corners as written in the file.
    """
    root = ET.parse(xml_path).getroot()
    size = root.find("size")
    width, height = int(size.findtext("width")), int(size.findtext("height"))
    objects = []
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        box = tuple(float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        objects.append((obj.findtext("name", "").strip(), box))
    return width, height, objects


def tile_origins(size: int, tile: int) -> List[int]:
    """Origins of ceil(size / tile) tiles spread evenly over [0, size - tile]."""
    if size <= tile:
        return [0]
    n = math.ceil(size / tile)
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def clip_box(
    box: Box, window: Tuple[int, int, int, int], min_visible: float, min_side: float
) -> Optional[Box]:
    """Clips an absolute xyxy box to ``window`` (x0, y0, x1, y1) and returns it in window
    coordinates, or None when it is a sliver (see the module docstring)."""
    x0, y0, x1, y1 = box
    wx0, wy0, wx1, wy1 = window
    area = (x1 - x0) * (y1 - y0)
    if area <= 0:
        return None
    cx0, cy0, cx1, cy1 = max(x0, wx0), max(y0, wy0), min(x1, wx1), min(y1, wy1)
    w, h = cx1 - cx0, cy1 - cy0
    if w < min_side or h < min_side or w * h < min_visible * area:
        return None
    return (cx0 - wx0, cy0 - wy0, cx1 - wx0, cy1 - wy0)


def _annotation(ann_id: int, image_id: int, box: Box) -> Dict:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": 1,
        "bbox": [x0, y0, w, h],
        "area": w * h,
        "iscrowd": 0,
    }


def _coco(images: List[Dict], annotations: List[Dict]) -> Dict:
    return {
        "info": {"description": "DeepForest tree crowns (align-detr quickstart)"},
        "licenses": [{"name": ATTRIBUTION}],
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }


def _image_path(source: str, stem: str) -> str:
    for ext in (".png", ".jpg", ".tif"):
        path = os.path.join(source, stem + ext)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"no image for {stem!r} in {source}")


def region_of(width: int, part: str, holdout: float) -> Tuple[int, int]:
    """The x range [x0, x1) of an image's "left" (training) or "right" (held-out) part, or of
    the "whole" image."""
    split = int(round(width * (1.0 - holdout)))
    return {"left": (0, split), "right": (split, width), "whole": (0, width)}[part]


def tile_edges(size: int, tile: int) -> List[Tuple[int, int]]:
    """ceil(size / tile) adjacent, non-overlapping intervals of near-equal length covering
    [0, size)."""
    n = max(1, math.ceil(size / tile))
    edges = [round(i * size / n) for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


def tile_windows(
    x_range: Tuple[int, int], height: int, tile: int, overlap: bool = True
) -> List[Tuple[int, ...]]:
    """Tiles of at most ``tile`` px covering columns ``x_range`` of an image of ``height``:
    full-size tiles that may overlap (``overlap``, for training), or adjacent ones that do not
    (for testing: every crown is scored once)."""
    x0, x1 = x_range
    if overlap:
        xs = [(x, min(x + tile, x1 - x0)) for x in tile_origins(x1 - x0, tile)]
        ys = [(y, min(y + tile, height)) for y in tile_origins(height, tile)]
    else:
        xs, ys = tile_edges(x1 - x0, tile), tile_edges(height, tile)
    return [(x0 + xa, ya, x0 + xb, yb) for ya, yb in ys for xa, xb in xs]


def build_split(
    source: str,
    stems: Sequence[str],
    out_dir: str,
    split: str,
    tile: Optional[int],
    min_visible: float,
    min_side: float,
    part: str = "whole",
    holdout: float = HOLDOUT,
) -> Dict:
    """Writes the images of one split under ``out_dir/split`` and returns its COCO dict.

    With ``tile`` set, the ``part`` ("left", "right" or "whole") of each image is cut into tiles
    (see module docstring); with None the images are copied whole (boxes clipped to the image,
    nothing dropped but empty boxes).
    """
    os.makedirs(os.path.join(out_dir, split), exist_ok=True)
    images, annotations = [], []
    for stem in stems:
        width, height, objects = read_voc(os.path.join(source, stem + ".xml"))
        img = Image.open(_image_path(source, stem)).convert("RGB")
        if img.size != (width, height):
            raise ValueError(f"{stem}: image is {img.size}, XML says {(width, height)}")
        if tile:
            windows = tile_windows(
                region_of(width, part, holdout), height, tile, overlap=part != "right"
            )
        else:
            windows = [(0, 0, width, height)]
        for window in windows:
            if tile:
                boxes = [clip_box(b, window, min_visible, min_side) for _, b in objects]
            else:  # whole held-out images: keep every box, clipped to the image
                boxes = [clip_box(b, window, 0.0, 1e-6) for _, b in objects]
            boxes = [b for b in boxes if b is not None]
            if not boxes:
                continue
            image_id = len(images) + 1
            name = f"{stem}_{window[0]}_{window[1]}.png" if tile else f"{stem}.png"
            crop = img.crop(window)
            crop.save(os.path.join(out_dir, split, name))
            images.append(
                {
                    "id": image_id,
                    "file_name": name,
                    "width": crop.width,
                    "height": crop.height,
                    "source": stem,
                    "window": list(window),
                }
            )
            for b in boxes:
                annotations.append(_annotation(len(annotations) + 1, image_id, b))
    return _coco(images, annotations)


def find_deepforest_data(install: bool = True) -> str:
    """Directory ``deepforest/data`` of the installed package (found without importing it).

    Installs ``deepforest==2.1.0`` with ``pip install --no-deps`` when it is missing and
    ``install`` is True.
    """
    spec = importlib.util.find_spec("deepforest")
    if spec is None and install:
        print(f"deepforest not found; installing {DEEPFOREST_REQ} (data only, --no-deps)")
        subprocess.check_call(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", DEEPFOREST_REQ]
        )
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("deepforest")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the deepforest package is not installed; run `pip install --no-deps {DEEPFOREST_REQ}`"
            " (or `make setup`), or pass --source with a folder of VOC XML + PNG files"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def prepare(
    source: str,
    out_dir: str,
    train_stems: Sequence[str] = TRAIN_IMAGES,
    val_stems: Sequence[str] = VAL_IMAGES,
    tile: int = 400,
    min_visible: float = 0.5,
    min_side: float = 4.0,
    force: bool = False,
    holdout: float = HOLDOUT,
) -> Dict[str, str]:
    """Builds the four splits; returns {split name: json path}. ``train_stems`` /
    ``val_stems`` are the cross-site protocol's sites; the held-out-region protocol uses all of
    them. Skips work already done with the same options (``params.json`` records them)."""
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must be in (0, 1), got {holdout}")
    params = {
        "source_files": sorted(train_stems) + sorted(val_stems),
        "tile": tile,
        "min_visible": min_visible,
        "min_side": min_side,
        "holdout": holdout,
        "version": 2,
    }
    ann_dir = os.path.join(out_dir, "annotations")
    jsons = {s: os.path.join(ann_dir, f"trees_{s}.json") for s in SPLITS}
    params_path = os.path.join(ann_dir, "params.json")
    if not force and all(os.path.exists(p) for p in [params_path, *jsons.values()]):
        with open(params_path) as f:
            if json.load(f) == params:
                print(f"{out_dir}: already prepared (use --force to rebuild)")
                return jsons
    os.makedirs(ann_dir, exist_ok=True)
    every = list(train_stems) + list(val_stems)
    plan = (  # split, images, tile, part of each image
        ("train", every, tile, "left"),
        ("val", every, tile, "right"),
        ("xsite_train", train_stems, tile, "whole"),
        ("xsite_val", val_stems, None, "whole"),
    )
    for split, stems, split_tile, part in plan:
        coco = build_split(
            source, stems, out_dir, split, split_tile, min_visible, min_side, part, holdout
        )
        with open(jsons[split], "w") as f:
            json.dump(coco, f)
        print(
            f"{split}: {len(coco['images'])} images, {len(coco['annotations'])} boxes -> "
            f"{jsons[split]}"
        )
    with open(params_path, "w") as f:
        json.dump(params, f)
    return jsons


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source",
        help="folder with the VOC XML + PNG files "
        "(default: the installed deepforest package's data folder)",
    )
    parser.add_argument("--out", default=None, help="output folder (default: <root>/trees)")
    parser.add_argument("--tile", type=int, default=400)
    parser.add_argument(
        "--min-visible",
        type=float,
        default=0.5,
        help="least fraction of a box's area that must stay inside a tile",
    )
    parser.add_argument(
        "--min-side", type=float, default=4.0, help="least width and height (px) of a clipped box"
    )
    parser.add_argument(
        "--holdout",
        type=float,
        default=HOLDOUT,
        help="fraction of each image's width (its right part) held out for testing",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)
    source = args.source or find_deepforest_data()
    out = args.out or os.path.join(default_root(), "trees")
    prepare(
        source,
        out,
        tile=args.tile,
        min_visible=args.min_visible,
        min_side=args.min_side,
        force=args.force,
        holdout=args.holdout,
    )
    print(ATTRIBUTION)


if __name__ == "__main__":
    main()
