# Copyright (c) align-detr contributors.
"""The resumable training loader.

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

import copy
import logging
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.utils.data as torchdata
from detectron2.utils import comm

from ..utils.seed import derive_seed, seeded_rng
from .validation import load_and_validate_dataset_dicts

__all__ = ["ResumableBatchSampler", "build_resumable_train_loader"]

logger = logging.getLogger(__name__)


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
