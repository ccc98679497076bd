# Copyright (c) align-detr contributors.
"""Augmentations for top-down imagery (aerial, satellite, microscopy), where "up" means nothing:
rotations by multiples of 90 degrees, exact on pixels and boxes."""

import numpy as np
from detectron2.data import transforms as T

__all__ = ["RandomRotation90", "Rotation90Transform"]


class Rotation90Transform(T.Transform):
    """Rotates an (H, W) image counter-clockwise by ``k`` x 90 degrees (``np.rot90``).

    Args:
        h, w: the input image size.
        k: quarter turns, 0..3.
    """

    def __init__(self, h: int, w: int, k: int):
        super().__init__()
        self._set_attributes(locals())
        self.k = k % 4

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.rot90(img, self.k, axes=(0, 1)))

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        """(N, 2) absolute (x, y) in the input -> the same points in the rotated image."""
        x, y = coords[:, 0].copy(), coords[:, 1].copy()
        w, h = self.w, self.h
        if self.k == 1:  # (x, y) -> (y, W - x)
            x, y = y, w - x
        elif self.k == 2:
            x, y = w - x, h - y
        elif self.k == 3:  # (x, y) -> (H - y, x)
            x, y = h - y, x
        return np.stack([x, y], axis=1).astype(coords.dtype)

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return self.apply_image(segmentation)

    def inverse(self) -> T.Transform:
        h, w = (self.w, self.h) if self.k % 2 else (self.h, self.w)
        return Rotation90Transform(h, w, -self.k)


class RandomRotation90(T.Augmentation):
    """Rotates by 0, 90, 180 or 270 degrees, uniformly at random (with a horizontal flip this
    covers all eight symmetries of the square)."""

    def get_transform(self, image):
        h, w = image.shape[:2]
        return Rotation90Transform(h, w, int(np.random.randint(4)))
