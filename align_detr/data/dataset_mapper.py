# Copyright (c) align-detr contributors.
"""The DETR data pipeline as a detectron2 dataset mapper.

Training follows the DETR / DINO recipe: horizontal flip, then with probability 1/2 a plain
multi-scale resize (short side from ``INPUT.MIN_SIZE_TRAIN``, long side at most
``INPUT.MAX_SIZE_TRAIN``), otherwise the crop branch: resize to ``INPUT.CROP_PRE_RESIZE``, random
crop of ``INPUT.CROP.SIZE``, then the same multi-scale resize.
"""

import copy
import logging
from typing import List, Optional, Union

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from .transforms import RandomRotation90

__all__ = ["DetrDatasetMapper", "build_detr_augmentations"]


def _flip(cfg) -> List[T.Augmentation]:
    augs = []
    if cfg.INPUT.RANDOM_FLIP != "none":
        augs.append(
            T.RandomFlip(
                horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                vertical=cfg.INPUT.RANDOM_FLIP == "vertical",
            )
        )
    if cfg.INPUT.RANDOM_ROTATE_90:
        augs.append(RandomRotation90())
    return augs


def build_detr_augmentations(cfg, is_train: bool):
    """Builds the augmentation lists of the DETR recipe from a config.

    Args:
        cfg (CfgNode): a config with the align-detr keys (``add_align_detr_config``).
        is_train (bool): training or inference pipeline.

    Returns:
        tuple[list[Augmentation], list[Augmentation] or None]: the plain list and the crop-branch
        list. The crop list is None at test time and when ``INPUT.CROP.ENABLED`` is False.
    """
    if not is_train:
        return [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)], None

    def multi_scale_resize():
        return T.ResizeShortestEdge(
            cfg.INPUT.MIN_SIZE_TRAIN,
            cfg.INPUT.MAX_SIZE_TRAIN,
            sample_style=cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING,
        )

    augs = _flip(cfg) + [multi_scale_resize()]
    if not cfg.INPUT.CROP.ENABLED:
        return augs, None
    augs_with_crop = _flip(cfg) + [
        # No long-side limit here: the final resize enforces MAX_SIZE_TRAIN.
        T.ResizeShortestEdge(cfg.INPUT.CROP_PRE_RESIZE, sample_style="choice"),
        T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE),
        multi_scale_resize(),
    ]
    return augs, augs_with_crop


class DetrDatasetMapper:
    """Maps a detectron2 dataset dict to the inputs of a DETR-style model.

    The callable reads the image, applies one of two augmentation lists (chosen per image with
    ``np.random``, so detectron2's per-worker seeding makes it reproducible) and converts the
    boxes to :class:`Instances`. Crowd annotations are dropped, since DETR's set loss has no
    notion of "ignore"; boxes are clipped to the augmented image and empty ones removed.

    Output dict (the keys detectron2's ``DatasetMapper`` produces, boxes only):

    * ``"image"``: uint8 tensor (C, H, W) of the augmented image in ``image_format``.
    * ``"instances"`` (training only): ``Instances`` with ``gt_boxes`` (absolute XYXY in the
      augmented image) and ``gt_classes`` (int64). The model normalises boxes itself.
    * every input key except ``"annotations"`` (e.g. ``"height"``, ``"width"`` of the original
      image, which inference uses to rescale the predictions).
    """

    @configurable
    def __init__(
        self,
        is_train: bool,
        *,
        augmentations: List[Union[T.Augmentation, T.Transform]],
        augmentations_with_crop: Optional[List[Union[T.Augmentation, T.Transform]]] = None,
        image_format: str,
        crop_prob: float = 0.5,
    ):
        """
        Args:
            is_train (bool): training (keeps annotations) or inference (drops them).
            augmentations (list[Augmentation or Transform]): the plain pipeline.
            augmentations_with_crop (list[Augmentation or Transform] or None): the crop branch,
                used instead of ``augmentations`` with probability ``crop_prob``; None disables it.
            image_format (str): an image format supported by ``detection_utils.read_image``.
            crop_prob (float): probability of the crop branch (1/2 in DETR and DINO).
        """
        # fmt: off
        self.is_train                = is_train
        self.augmentations           = T.AugmentationList(augmentations)
        self.augmentations_with_crop = (
            T.AugmentationList(augmentations_with_crop) if augmentations_with_crop else None
        )
        self.image_format            = image_format
        self.crop_prob               = crop_prob
        # fmt: on
        logger = logging.getLogger(__name__)
        mode = "training" if is_train else "inference"
        logger.info(f"[DetrDatasetMapper] Augmentations used in {mode}: {augmentations}")
        if self.augmentations_with_crop is not None:
            logger.info(
                f"[DetrDatasetMapper] Crop branch (p={crop_prob}): {augmentations_with_crop}"
            )

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        augs, augs_with_crop = build_detr_augmentations(cfg, is_train)
        return {
            "is_train": is_train,
            "augmentations": augs,
            "augmentations_with_crop": augs_with_crop,
            "image_format": cfg.INPUT.FORMAT,
        }

    def _pick_augmentations(self) -> T.AugmentationList:
        if self.augmentations_with_crop is not None and np.random.rand() < self.crop_prob:
            return self.augmentations_with_crop
        return self.augmentations

    def __call__(self, dataset_dict):
        """
        Args:
            dataset_dict (dict): metadata of one image, in detectron2 dataset format.

        Returns:
            dict: the model input described in the class docstring.
        """
        dataset_dict = copy.deepcopy(dataset_dict)  # modified below; the dataset keeps its own
        image = utils.read_image(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)

        aug_input = T.AugInput(image)
        transforms = self._pick_augmentations()(aug_input)
        image = aug_input.image
        image_shape = image.shape[:2]  # h, w
        # Tensors travel through the DataLoader's shared memory; numpy arrays would be pickled.
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))

        if not self.is_train:
            dataset_dict.pop("annotations", None)
            return dataset_dict

        if "annotations" in dataset_dict:
            annos = [
                # Boxes only: masks and keypoints would be transformed for nothing.
                utils.transform_instance_annotations(
                    {k: v for k, v in obj.items() if k not in ("segmentation", "keypoints")},
                    transforms,
                    image_shape,
                )
                for obj in dataset_dict.pop("annotations")
                if obj.get("iscrowd", 0) == 0
            ]
            # transform_instance_annotations clipped the boxes to the image; a crop can leave
            # some with zero width or height, which filter_empty_instances removes.
            instances = utils.annotations_to_instances(annos, image_shape)
            dataset_dict["instances"] = utils.filter_empty_instances(instances)
        return dataset_dict
