#!/usr/bin/env python
# Copyright (c) align-detr contributors.
"""
align-detr Training Script.

This script is a simplified version of the training script in detectron2/tools: it trains or
evaluates (``--eval-only``) a model of this project with the trainer in
``align_detr.engine``. Before anything heavy starts it checks that the datasets, weights and
device the config names are there, and says how to get them when they are not.

Examples::

    python train_net.py --config-file configs/dino_r50.yaml --num-gpus 8
    python train_net.py --config-file configs/dino_r50.yaml --eval-only MODEL.WEIGHTS model.pth
    python train_net.py --config-file configs/dino_r50.yaml --resume  # from OUTPUT_DIR
    python train_net.py --config-file configs/dino_r50.yaml MODEL.DEVICE cpu SOLVER.IMS_PER_BATCH 2
    python train_net.py --config-file configs/align_r50.yaml \\
        DATASETS.TRAIN_JSON train.json DATASETS.TRAIN_IMAGES train_images/ \\
        DATASETS.TEST_JSON val.json DATASETS.TEST_IMAGES val_images/  # your COCO-format data
"""

import logging
import os
import sys
from typing import List

from align_detr.utils.quiet import quiet_third_party_warnings

quiet_third_party_warnings()  # first: some of detectron2's warnings come when it is imported

import torch  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.engine import default_argument_parser, default_setup, launch  # noqa: E402
from detectron2.evaluation import verify_results  # noqa: E402
from detectron2.utils import comm  # noqa: E402

import align_detr.modeling  # noqa: E402,F401  (registers the model, backbones and bases)
from align_detr.config import ConfigError, load_config  # noqa: E402
from align_detr.data import DatasetValidationError, register_trees  # noqa: E402
from align_detr.data.coco_json import COCO_JSON_NAMES  # noqa: E402
from align_detr.engine import CheckpointLoadError, Trainer, check_weights_file  # noqa: E402

# Where detectron2's builtin datasets (coco_2017_train, ...) look for their files.
_BUILTIN_ROOT = os.path.abspath(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")))
_D2_DATASETS_NOW = (
    f"= {os.environ['DETECTRON2_DATASETS']!r}, i.e. {_BUILTIN_ROOT}"
    if "DETECTRON2_DATASETS" in os.environ
    else f"unset, i.e. ./datasets = {_BUILTIN_ROOT}"
)

_HOW_TO_FIX_DATASETS = f"""\
How to fix:
  * COCO: detectron2's builtin datasets (coco_2017_train, coco_2017_val, ...) read
    $DETECTRON2_DATASETS/coco/annotations/instances_{{train,val}}2017.json and
    $DETECTRON2_DATASETS/coco/{{train,val}}2017/, with DETECTRON2_DATASETS
    {_D2_DATASETS_NOW}.
    Download COCO 2017 from https://cocodataset.org/#download and unpack it there, or set
    DETECTRON2_DATASETS to the folder that holds coco/.
  * Your own COCO-format data: name the jsons and image folders on the command line,
    DATASETS.TRAIN_JSON train.json DATASETS.TRAIN_IMAGES train_images/
    DATASETS.TEST_JSON val.json DATASETS.TEST_IMAGES val_images/
    (the number of classes and their names come from the json; see docs/training.md)."""


def _check_dataset(name: str, key: str) -> List[str]:
    if name not in DatasetCatalog.list():
        return [f"dataset {name!r} ({key}) is not registered with detectron2's DatasetCatalog."]
    meta = MetadataCatalog.get(name)
    problems = []
    # Datasets registered from a COCO json carry both paths; datasets with their own loader
    # may carry neither, and then only loading them can tell.
    for attr, what in (("json_file", "annotation file"), ("image_root", "image folder")):
        path = meta.get(attr, None)
        if path and not os.path.exists(path):
            problems.append(f"dataset {name!r} ({key}): {what} not found: {os.path.abspath(path)}")
    return problems


def check_inputs(cfg, eval_only: bool = False, resume: bool = False) -> None:
    """Fails fast, with a message saying what is missing and how to fix it.

    Checks that every dataset the run will read is registered and its files exist
    (``DATASETS.TEST``, plus ``DATASETS.TRAIN`` when training, since training ends with an
    evaluation), that a local ``MODEL.WEIGHTS`` file exists when it will be loaded and fits the
    model by the checkpointer's rules (official / detrex checkpoints are recognised; with
    ``--eval-only`` every weight must load), and that a CUDA ``MODEL.DEVICE`` has a GPU. URLs
    (``detectron2://``, ``https://``) are left to the checkpointer.

    Args:
        cfg (CfgNode): the run's config.
        eval_only (bool): True for ``--eval-only`` (the training sets are not read).
        resume (bool): ``--resume``; with a checkpoint in ``OUTPUT_DIR`` the weights are unused.

    Raises:
        CheckpointLoadError: the weights file does not fit the model.
        FileNotFoundError: listing every other problem found.
    """
    splits = ("TEST",) if eval_only else ("TRAIN", "TEST")
    datasets = [(f"DATASETS.{s}", name) for s in splits for name in cfg.DATASETS[s]]
    problems, seen = [], set()
    # A json named by DATASETS.*_JSON that is not there (load_config registers only those that
    # are): say so, rather than that its dataset is not registered.
    for split in splits:
        json_key, _, name = COCO_JSON_NAMES[split]
        json_file = cfg.DATASETS[json_key]
        if json_file and not os.path.isfile(json_file):
            problems.append(f"DATASETS.{json_key} not found: {os.path.abspath(json_file)}")
            seen.add(name)
    for key, name in datasets:
        if name not in seen:
            seen.add(name)
            problems += _check_dataset(name, key)
    dataset_problem = bool(problems)

    weights = cfg.MODEL.WEIGHTS
    resuming = resume and os.path.exists(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))
    if weights and "://" not in weights and not resuming:
        if not os.path.isfile(weights):
            problems.append(
                f"MODEL.WEIGHTS file not found: {os.path.abspath(weights)}. Point MODEL.WEIGHTS "
                'to an existing checkpoint, or set it to "" to start from random initialisation.'
            )
        else:
            # The loading rules, on a model without memory: a wrong file fails here, early
            # (CheckpointLoadError), before the datasets are reported.
            print("MODEL.WEIGHTS " + check_weights_file(cfg, weights, require_all=eval_only))
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        problems.append(
            f"MODEL.DEVICE is {cfg.MODEL.DEVICE!r} but PyTorch sees no CUDA device; "
            "add `MODEL.DEVICE cpu` to the command line to run on the CPU."
        )
    if problems:
        message = "align-detr cannot start:\n" + "\n".join(f"  - {p}" for p in problems)
        if dataset_problem:
            message += "\n" + _HOW_TO_FIX_DATASETS
        raise FileNotFoundError(message)


def setup(args):
    """Creates the config from the command line and performs detectron2's basic setup."""
    register_trees()  # this project's datasets, when their files exist
    cfg = load_config(args.config_file, args.opts)
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    # Every process checks (it only stats a few paths), so no rank waits for one that failed.
    check_inputs(cfg, eval_only=args.eval_only, resume=args.resume)

    if args.eval_only:
        if not cfg.MODEL.WEIGHTS:
            logging.getLogger("align_detr").warning(
                "--eval-only without MODEL.WEIGHTS evaluates a randomly initialised model."
            )
        model = Trainer.build_model(cfg)
        Trainer.load_for_evaluation(cfg, model, resume=args.resume)
        res = Trainer.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:
            res.update(Trainer.test_with_TTA(cfg, model))
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def invoke_main() -> None:
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    # Check once here, before any process is spawned, so a missing input is one plain message
    # rather than a traceback per process. main() checks again for callers that skip this.
    try:
        register_trees()
        cfg = load_config(args.config_file, args.opts)
        check_inputs(cfg, eval_only=args.eval_only, resume=args.resume)
    except (FileNotFoundError, ConfigError, CheckpointLoadError, DatasetValidationError) as e:
        sys.exit(str(e))
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()  # pragma: no cover
