# Copyright (c) align-detr contributors.
"""The training data stream: a validation pass over the annotations, and a resumable loader.

detectron2's training loader is an infinite seeded index stream (``TrainingSampler``) with
per-worker random augmentation. A resumed run restarts that stream from its beginning and the
workers' random states are lost, so it sees other images, augmented differently, than the run it
continues. Here every part of the stream is a pure function of ``(seed, position)``:

* the index order of epoch ``e`` is ``randperm(N)`` seeded from ``(seed, e)``;
* rank ``r`` of ``W`` takes stream positions ``r, r + W, r + 2W, ...`` (as ``TrainingSampler``);
* images are grouped into per-rank batches by aspect ratio (as ``AspectRatioGroupedDataset``:
  width > height or not, from the dataset dict);
* the mapper (augmentation) of the image at stream position ``g`` runs with numpy, Python and
  torch RNGs seeded from ``(seed, g)``, in the main process or in any DataLoader worker.

Resuming at iteration ``i`` therefore only replays the index arithmetic of the first ``i``
batches (no image is read) and continues with exactly the batches the uninterrupted run saw.
"""

import contextlib
import copy
import hashlib
import logging
import math
import os
import random
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.utils.data as torchdata
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.build import filter_images_with_only_crowd_annotations
from detectron2.structures import BoxMode
from detectron2.utils import comm

__all__ = [
    "DatasetValidationError",
    "ResumableBatchSampler",
    "build_resumable_train_loader",
    "derive_seed",
    "load_and_validate_dataset_dicts",
    "seeded_rng",
    "validate_dataset_dicts",
]

logger = logging.getLogger(__name__)

_REQUIRED_IMAGE_FIELDS = ("file_name", "height", "width")
_REQUIRED_ANNOTATION_FIELDS = ("bbox", "bbox_mode", "category_id")
_COCO_FIELDS_HINT = (
    "COCO json files need, per image, id, file_name, height and width, and per annotation, id, "
    "image_id, bbox [x, y, w, h], category_id and iscrowd."
)


class DatasetValidationError(ValueError):
    """A training dataset that cannot be trained on; the message lists every problem found."""


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (stable across processes and Python runs)."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@contextlib.contextmanager
def seeded_rng(seed: int):
    """Runs the block with numpy, Python and torch (CPU) RNGs seeded by ``seed``, then puts the
    previous states back, so the caller's random streams are left untouched."""
    np_state, py_state, torch_state = (
        np.random.get_state(),
        random.getstate(),
        torch.get_rng_state(),
    )
    np.random.seed(seed % (1 << 32))
    random.seed(seed)
    torch.manual_seed(seed)  # also reseeds CUDA's default generators, which mappers do not use
    try:
        yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
        torch.set_rng_state(torch_state)


# ---- validation -----------------------------------------------------------------------------


def _finite_numbers(values) -> bool:
    try:
        return all(math.isfinite(float(v)) for v in values)
    except (TypeError, ValueError):
        return False


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
    errors: Dict[str, List[str]] = {}
    dropped: Dict[str, List[str]] = {"zero or negative size": [], "entirely outside the image": []}
    clipped = 0

    def error(kind: str, where: str) -> None:
        errors.setdefault(kind, []).append(where)

    out = []
    for i, record in enumerate(dicts):
        where = f"image {record.get('image_id', i)!r} ({record.get('file_name', '?')})"
        missing = [k for k in _REQUIRED_IMAGE_FIELDS if k not in record]
        if missing:
            error(f"image record without {', '.join(missing)}", where)
            continue
        h, w = record["height"], record["width"]
        if not _finite_numbers((h, w)) or h <= 0 or w <= 0:
            error("image height / width not positive", f"{where}: height={h}, width={w}")
            continue
        if check_files and not os.path.isfile(record["file_name"]):
            error("image file not found", record["file_name"])
            continue
        annos = record.get("annotations", [])
        kept = []
        for j, obj in enumerate(annos):
            awhere = f"{where}, annotation {obj.get('id', j)!r}"
            missing = [k for k in _REQUIRED_ANNOTATION_FIELDS if k not in obj]
            if missing:
                error(f"annotation without {', '.join(missing)}", awhere)
                continue
            box = obj["bbox"]
            if not isinstance(box, (list, tuple, np.ndarray)) or len(box) != 4:
                error("bbox is not 4 numbers", f"{awhere}: bbox={box!r}")
                continue
            if not _finite_numbers(box):
                error("bbox has a non-finite value", f"{awhere}: bbox={list(box)}")
                continue
            mode = obj["bbox_mode"]
            if mode not in (BoxMode.XYXY_ABS, BoxMode.XYWH_ABS):
                kept.append(obj)  # relative / rotated modes: left to detectron2
                continue
            x0, y0, x1, y1 = BoxMode.convert([float(v) for v in box], mode, BoxMode.XYXY_ABS)
            if x1 <= x0 or y1 <= y0:
                dropped["zero or negative size"].append(f"{awhere}: bbox={list(box)}")
                continue
            if x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
                dropped["entirely outside the image"].append(f"{awhere}: bbox={list(box)}")
                continue
            if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
                clipped += 1
            kept.append(obj)
        if len(kept) != len(annos):
            record = dict(record, annotations=kept)
        out.append(record)

    if errors:
        lines = []
        for kind, items in errors.items():
            listed = "; ".join(items[:max_listed])
            more = f" (and {len(items) - max_listed} more)" if len(items) > max_listed else ""
            lines.append(f"  - {kind}: {len(items)} x, e.g. {listed}{more}")
        raise DatasetValidationError(
            f"Training dataset {name!r} has problems that must be fixed before training:\n"
            + "\n".join(lines)
            + "\n"
            + _COCO_FIELDS_HINT
        )
    for kind, items in dropped.items():
        if items:
            logger.warning(
                "Dataset %r: dropped %d annotation(s) with boxes %s, e.g. %s",
                name,
                len(items),
                kind,
                "; ".join(items[:max_listed]),
            )
    if clipped:
        logger.warning(
            "Dataset %r: %d box(es) extend beyond their image; they are clipped to it.",
            name,
            clipped,
        )
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


# ---- the resumable loader -------------------------------------------------------------------


class ResumableBatchSampler(torchdata.Sampler):
    """Per-rank batches of stream positions, a pure function of ``(seed, batch number)``.

    Yields lists of ``(position, dataset_index)`` pairs. :meth:`set_start` makes the next
    iterator begin at a given batch number (replaying only index arithmetic).
    """

    def __init__(
        self,
        dataset: Sequence[Dict[str, Any]],
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        aspect_ratio_grouping: bool = True,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._size = len(dataset)
        if self._size == 0:
            raise ValueError("ResumableBatchSampler needs a non-empty dataset")
        self._batch_size = batch_size
        self.seed = int(seed)
        self._shuffle = shuffle
        # Bucket per image as detectron2's AspectRatioGroupedDataset: width > height or not.
        self._bucket = (
            [0 if d["width"] > d["height"] else 1 for d in dataset]
            if aspect_ratio_grouping
            else [0] * self._size
        )
        self._rank = comm.get_rank() if rank is None else rank
        self._world = comm.get_world_size() if world_size is None else world_size
        self.start_batch = 0

    def set_start(self, batch: int) -> None:
        """The next iterator starts with batch number ``batch`` (0 = the beginning)."""
        self.start_batch = int(batch)

    def _order(self, epoch: int) -> List[int]:
        if not self._shuffle:
            return list(range(self._size))
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        return torch.randperm(self._size, generator=g).tolist()

    def _positions(self) -> Iterator[tuple]:
        position, epoch, order = self._rank, -1, []
        while True:
            e = position // self._size
            if e != epoch:
                epoch, order = e, self._order(e)
            yield position, order[position % self._size]
            position += self._world

    def __iter__(self):
        buckets: List[List[tuple]] = [[], []]
        batch = 0
        for item in self._positions():
            bucket = buckets[self._bucket[item[1]]]
            bucket.append(item)
            if len(bucket) == self._batch_size:
                out = bucket[:]
                del bucket[:]
                if batch >= self.start_batch:
                    yield out
                batch += 1

    def __len__(self):  # an infinite stream; DataLoader only needs this for len()
        raise TypeError("ResumableBatchSampler is infinite")


class _MappedPositions(torchdata.Dataset):
    """``dataset[index]`` through the mapper, with RNGs seeded by ``(seed, position)``.

    An image the mapper cannot read is skipped with a logged warning (detectron2's
    ``MapDataset`` convention) and replaced by the next images of the dataset, deterministically.
    """

    def __init__(self, dataset, mapper: Callable, sampler: ResumableBatchSampler, attempts=10):
        self._dataset, self._mapper, self._sampler = dataset, mapper, sampler
        self._attempts = attempts

    def __len__(self):
        return len(self._dataset)

    def _map_one(self, position: int, index: int):
        n = len(self._dataset)
        for attempt in range(min(self._attempts, n)):
            cur = (index + attempt) % n
            with seeded_rng(derive_seed(self._sampler.seed, position, attempt)):
                try:
                    out = self._mapper(copy.deepcopy(self._dataset[cur]))
                except (OSError, ValueError, SyntaxError) as e:  # unreadable / corrupt image
                    logger.warning(
                        "Skipping image %s (dataset index %d): %s: %s",
                        self._dataset[cur].get("file_name"),
                        cur,
                        type(e).__name__,
                        e,
                    )
                    continue
            if out is not None:
                return out
        raise RuntimeError(
            f"The mapper failed on {min(self._attempts, n)} images in a row, from dataset index "
            f"{index} on; see the warnings above."
        )

    def __getitem__(self, batch: List[tuple]):
        return [self._map_one(position, index) for position, index in batch]


def _collate_batch(batch):
    return batch[0]  # the dataset returns the whole batch as one item


def build_resumable_train_loader(cfg, mapper: Callable, dataset=None):
    """The training loader: validated dicts, a :class:`ResumableBatchSampler`, the mapper.

    ``cfg.SEED`` seeds the stream; with ``SEED < 0`` a seed shared by all processes is drawn
    (the trainer saves it in checkpoints, so such runs resume exactly as well).

    Returns:
        (DataLoader, ResumableBatchSampler): the loader yields lists of mapped dicts
        (``SOLVER.IMS_PER_BATCH / world_size`` per process).
    """
    if dataset is None:
        dataset = load_and_validate_dataset_dicts(
            cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
        )
    world = comm.get_world_size()
    total = cfg.SOLVER.IMS_PER_BATCH
    if total % world != 0:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH ({total}) must be divisible by the number of processes ({world})"
        )
    seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
    sampler = ResumableBatchSampler(
        dataset,
        total // world,
        seed=seed,
        aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
    )
    workers = cfg.DATALOADER.NUM_WORKERS
    loader = torchdata.DataLoader(
        _MappedPositions(dataset, mapper, sampler),
        sampler=sampler,  # yields whole batches: one dataset item per batch
        batch_size=1,
        collate_fn=_collate_batch,
        num_workers=workers,
        persistent_workers=False,
        # Its own generator: creating the iterator draws a seed from it, never from the global
        # RNG that the training step uses (the step's draws then do not depend on a restart).
        generator=torch.Generator().manual_seed(seed),
        prefetch_factor=2 if workers > 0 else None,
    )
    logger.info(
        "Resumable training loader: %d images, %d per process, seed %d",
        len(dataset),
        total // world,
        seed,
    )
    return loader, sampler
