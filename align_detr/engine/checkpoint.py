# Copyright (c) align-detr contributors.
"""A ``DetectionCheckpointer`` that writes atomically and fails clearly on a bad file."""

import os
import pickle
import zipfile
from typing import Dict, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer

from .d2_compat import clear_parsed_url

__all__ = ["AtomicCheckpointer", "CheckpointLoadError", "atomic_write", "load_checkpoint"]


class CheckpointLoadError(RuntimeError):
    """A checkpoint file that cannot be read, or that holds no weights of the model."""


def atomic_write(path: str, write, mode: str = "wb") -> None:
    """Writes ``path`` through ``write(file)`` into a temporary file in the same folder, flushed
    to disk, then renamed over ``path``: readers see the old file or the new one, never a part."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    try:  # make the rename itself durable
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


class AtomicCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` whose ``save`` and ``last_checkpoint`` writes are atomic.

    A process killed during a save leaves the previous checkpoint and ``last_checkpoint``
    intact. Loading a truncated or foreign file raises :class:`CheckpointLoadError` naming it.
    """

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        if "://" in self.save_dir:  # a remote PathManager backend: no rename; plain write
            with self.path_manager.open(save_file, "wb") as f:
                torch.save(data, f)
        else:
            atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        save_file = os.path.join(self.save_dir, "last_checkpoint")
        if "://" in self.save_dir:
            return super().tag_last_checkpoint(last_filename_basename)
        atomic_write(save_file, lambda f: f.write(last_filename_basename), mode="w")

    def load(self, path, *args, **kwargs):
        try:
            return super().load(path, *args, **kwargs)
        finally:
            clear_parsed_url(self)

    def _load_file(self, filename):
        try:
            loaded = super()._load_file(filename)
        except (
            RuntimeError,
            EOFError,
            pickle.UnpicklingError,
            zipfile.BadZipFile,
            UnicodeDecodeError,
            AttributeError,
            ImportError,
            ValueError,
        ) as e:
            raise CheckpointLoadError(
                f"Cannot read checkpoint {filename}: it is truncated, corrupt or not a PyTorch / "
                f"detectron2 checkpoint ({type(e).__name__}: {e}). Point MODEL.WEIGHTS (or "
                "OUTPUT_DIR/last_checkpoint when resuming) to a complete checkpoint."
            ) from e
        if not isinstance(loaded, dict) or not isinstance(loaded.get("model"), dict):
            raise CheckpointLoadError(
                f"Checkpoint {filename} holds a {type(loaded.get('model', loaded)).__name__}, "
                "not a state dict of weights."
            )
        self._loading_file = filename
        return loaded

    def _load_model(self, checkpoint):
        model_keys = set(self.model.state_dict().keys())
        incompatible = super()._load_model(checkpoint)  # pops checkpoint["model"]
        bad_shapes = {k for k, _, _ in incompatible.incorrect_shapes}
        loaded = model_keys - set(incompatible.missing_keys) - bad_shapes
        loaded -= {"pixel_mean", "pixel_std"}  # detectron2 drops these from missing_keys
        if model_keys and not loaded:
            raise CheckpointLoadError(
                f"Checkpoint {getattr(self, '_loading_file', '?')} holds no weight of this model "
                f"(0 of {len(model_keys)} parameters match by name and shape): it is a checkpoint "
                "of another model, or of a different config."
            )
        return incompatible


def load_checkpoint(
    checkpointer: DetectionCheckpointer, weights: str, resume: bool, ema=None
) -> Tuple[Dict, bool]:
    """The one way weights are loaded for training and for ``--eval-only``.

    With ``resume`` and a checkpoint in the checkpointer's folder, that checkpoint is loaded with
    everything registered on the checkpointer (optimizer, scheduler, EMA, ...); otherwise
    ``weights`` (``MODEL.WEIGHTS``) is loaded into the model, and ``ema`` (a ``ModelEMA``,
    optional) takes the file's EMA weights when it has them.

    Returns:
        (the checkpoint's remaining entries, whether a checkpoint was resumed)
    """
    if ema is not None:
        ema.loaded = False
    checkpoint = checkpointer.resume_or_load(weights, resume=resume)
    resumed = resume and checkpointer.has_checkpoint()
    if ema is not None and not ema.loaded and "ema" in checkpoint:
        ema.load_state_dict(checkpoint["ema"])  # MODEL.WEIGHTS: checkpointables are not read
    return checkpoint, resumed
