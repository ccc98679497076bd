# Copyright (c) align-detr contributors.
"""COCO-format datasets named in the config: ``DATASETS.TRAIN_JSON`` / ``TRAIN_IMAGES`` and
``DATASETS.TEST_JSON`` / ``TEST_IMAGES``.

:func:`apply_coco_json_config` (called by :func:`align_detr.config.load_config`, so by every
entry point and by every process ``launch`` starts) checks each named json, registers it with
detectron2 as ``coco_json_train`` / ``coco_json_test`` (``register_coco_instances``: detectron2's
own loader, which maps any category ids to contiguous ones, and ``COCOEvaluator`` scores against
the original json with pycocotools), points ``DATASETS.TRAIN`` / ``DATASETS.TEST`` at them and
takes ``MODEL.ALIGN_DETR.NUM_CLASSES`` / ``CLASS_NAMES`` from the json when the config leaves
them unset. Since the resolved values are in the config, the ``config.yaml`` that
``default_setup`` saves in ``OUTPUT_DIR`` reproduces the run, and ``--eval-only`` or the demo
with that file see the same data and class names.

:func:`inspect_coco_json` finds every problem of a json at once (missing fields, duplicate or
unknown ids, boxes outside their image, image files not found) and raises one
:class:`DatasetValidationError` naming the file, the config key and the first bad entries of
each kind. ``train_net.py`` loads the config in its parent process before ``launch``, so a bad
json stops the run there, before any worker starts.
"""

import logging
import os
from typing import Dict, List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from .coco_json_checks import CocoJsonSummary, inspect_coco_json, missing_coco_json_files

__all__ = [
    "COCO_JSON_NAMES",
    "CocoJsonSummary",
    "apply_coco_json_config",
    "inspect_coco_json",
    "missing_coco_json_files",
    "register_coco_json",
]

logger = logging.getLogger(__name__)

#: Config split -> (json key, image folder key, registered dataset name). The names contain
#: "coco" so that detectron2's loader does not warn about non-contiguous category ids (it maps
#: them, which is what we want).
COCO_JSON_NAMES = {
    "TRAIN": ("TRAIN_JSON", "TRAIN_IMAGES", "coco_json_train"),
    "TEST": ("TEST_JSON", "TEST_IMAGES", "coco_json_test"),
}
#: The number of classes when neither the config nor a json says: COCO's, the default of every
#: config in configs/.
COCO_NUM_CLASSES = 80


def register_coco_json(name: str, summary: CocoJsonSummary) -> None:
    """Registers a checked json with detectron2 under ``name`` (again, if it names another file).

    The metadata gets ``thing_classes`` and the category id map now, as detectron2's loader will
    set them (equal values: ``Metadata`` refuses to change one), so the demo and the evaluator
    know the class names without loading the dataset.
    """
    meta = {
        "thing_classes": list(summary.thing_classes),
        "thing_dataset_id_to_contiguous_id": {c: i for i, c in enumerate(summary.category_ids)},
    }
    if name in DatasetCatalog.list():
        old = MetadataCatalog.get(name)
        if (
            old.get("json_file", None) == summary.json_file
            and old.get("image_root", None) == summary.image_root
            and old.get("thing_classes", None) == meta["thing_classes"]
        ):
            return
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, meta, summary.json_file, summary.image_root)


def _resolve_classes(cfg, summaries: Dict[str, CocoJsonSummary], missing: List[str]) -> None:
    """Sets NUM_CLASSES / CLASS_NAMES from the jsons where unset; raises where they disagree."""
    from ..config_validation import ConfigError  # the config module imports this one lazily

    c = cfg.MODEL.ALIGN_DETR
    train, test = summaries.get("TRAIN"), summaries.get("TEST")
    if train and test and train.thing_classes != test.thing_classes:
        raise ConfigError(
            "DATASETS.TRAIN_JSON and DATASETS.TEST_JSON have different categories (names in the "
            f"order of their ids): {train.thing_classes} in {train.json_file} vs "
            f"{test.thing_classes} in {test.json_file}; the model's class i must mean the same "
            "in both."
        )
    source = train or test
    if source is None:
        if missing and c.NUM_CLASSES == 0 and not c.CLASS_NAMES:
            raise FileNotFoundError(
                f"{missing[0]}, and MODEL.ALIGN_DETR.NUM_CLASSES is 0 (from the data): the number "
                "of classes comes from it. Fix the path, or set NUM_CLASSES."
            )
        if c.NUM_CLASSES == 0:
            c.NUM_CLASSES = len(c.CLASS_NAMES) or COCO_NUM_CLASSES
        return
    names = list(source.thing_classes)
    what = f"{source.json_file} has {len(names)} categories {names}"
    if c.NUM_CLASSES == 0:
        c.NUM_CLASSES = len(names)
    elif c.NUM_CLASSES != len(names):
        raise ConfigError(
            f"MODEL.ALIGN_DETR.NUM_CLASSES is {c.NUM_CLASSES} but {what}. Leave NUM_CLASSES unset "
            "(0: from the json), or fix the json."
        )
    if not c.CLASS_NAMES:
        c.CLASS_NAMES = names
    elif list(c.CLASS_NAMES) != names:
        raise ConfigError(
            f"MODEL.ALIGN_DETR.CLASS_NAMES is {list(c.CLASS_NAMES)} but {what} (in the order of "
            "their ids). Leave CLASS_NAMES unset ([]: from the json), or fix the json."
        )


def apply_coco_json_config(cfg, check_files: bool = True) -> Optional[Dict[str, CocoJsonSummary]]:
    """Checks and registers the jsons a config names, and points the config at them (in place).

    For each of TRAIN and TEST whose ``DATASETS.<SPLIT>_JSON`` is set: the json and image folder
    paths become absolute (``<SPLIT>_IMAGES`` empty means the json's folder), the json is checked
    by :func:`inspect_coco_json` and registered as ``coco_json_train`` / ``coco_json_test``, and
    ``DATASETS.<SPLIT>`` becomes that one name. ``NUM_CLASSES`` 0 and ``CLASS_NAMES`` [] are then
    taken from the json (the training json when both are set); set values must agree with it.
    A json that does not exist is left to ``train_net.py``'s input check (the demo can still run
    from a saved config with the classes in it).

    Args:
        cfg (CfgNode): a merged, unfrozen config.
        check_files (bool): also check that every image file exists.

    Returns:
        dict: split -> :class:`CocoJsonSummary` of the jsons read.

    Raises:
        DatasetValidationError: a bad json (one message per json).
        FileNotFoundError: an image folder not found, or a json not found when the number of
            classes must come from it.
        ConfigError: NUM_CLASSES / CLASS_NAMES disagree with the json, or the two jsons'
            categories differ.
    """
    d = cfg.DATASETS
    summaries, missing = {}, []
    for split, (json_key, images_key, name) in COCO_JSON_NAMES.items():
        if not d[json_key]:
            continue
        json_file = os.path.abspath(os.path.expanduser(d[json_key]))
        image_root = d[images_key] or os.path.dirname(json_file)
        image_root = os.path.abspath(os.path.expanduser(image_root))
        d[json_key], d[images_key] = json_file, image_root
        d[split] = (name,)
        if not os.path.isfile(json_file):
            missing.append(f"DATASETS.{json_key} not found: {json_file}")
            continue
        summary = inspect_coco_json(
            json_file,
            image_root,
            for_evaluation=split == "TEST",
            check_files=check_files,
            key=f"DATASETS.{json_key}",
        )
        register_coco_json(name, summary)
        summaries[split] = summary
    _resolve_classes(cfg, summaries, missing)
    return summaries
