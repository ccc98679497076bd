# Copyright (c) align-detr contributors.
"""A ``DetectionCheckpointer`` that writes atomically and fails clearly on a bad file."""

import logging
import os
import pickle
import warnings
import zipfile
from typing import Dict, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer

from ..formats import FORMATS, to_ours
from .d2_compat import clear_parsed_url

__all__ = [
    "AtomicCheckpointer",
    "CheckpointLoadError",
    "atomic_write",
    "check_weights_file",
    "load_checkpoint",
]


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


# Keys that only a detection checkpoint (not an ImageNet backbone file) holds, in our names.
_DETECTION_PREFIXES = ("neck.", "transformer.", "heads.")
# Weights whose shape depends on the number of classes.
_CLASS_COUNT_PREFIXES = ("heads.class_heads.", "transformer.denoising.label_embed.")


class AtomicCheckpointer(DetectionCheckpointer):
    """The checkpointer of every weights file this project reads or writes.

    ``save`` and ``last_checkpoint`` writes are atomic: a process killed during a save leaves
    the previous checkpoint and ``last_checkpoint`` intact. Loading:

    - a checkpoint of another implementation (:mod:`align_detr.formats`: detrex DINO, the
      official Align-DETR) is converted to our names in memory, with one log line;
    - an ImageNet backbone file is an initialisation: whatever it lacks stays as built;
    - a detection checkpoint must load every weight of the model, except class heads and the
      denoising label embedding of another class count (left at their initialisation, with a
      warning: fine-tuning on other classes); anything else missing raises
      :class:`CheckpointLoadError` naming the first missing weights and the format;
    - with ``require_all`` (``--eval-only``, the demo) every weight must load;
    - a truncated or foreign file raises :class:`CheckpointLoadError` naming it.

    Args:
        require_all: refuse a checkpoint that leaves any weight of the model unloaded.
        Other arguments: as ``DetectionCheckpointer``.
    """

    def __init__(self, model, save_dir="", *, require_all: bool = False, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.require_all = require_all

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
        """Converts another implementation's checkpoint to our names, loads it, and enforces
        the loading rules (see the class docstring)."""
        source = getattr(self, "_loading_file", "?")
        state, fmt = to_ours(checkpoint["model"])
        checkpoint["model"] = state
        detection = fmt != "ours" or any(k.startswith(_DETECTION_PREFIXES) for k in state)
        model_keys = set(self.model.state_dict().keys()) - {"pixel_mean", "pixel_std"}
        incompatible = super()._load_model(checkpoint)  # pops checkpoint["model"]
        bad_shapes = {k for k, _, _ in incompatible.incorrect_shapes}
        unloaded = (set(incompatible.missing_keys) | bad_shapes) & model_keys
        if model_keys and len(unloaded) == len(model_keys):
            raise CheckpointLoadError(
                f"Checkpoint {source} holds no weight of this model (0 of {len(model_keys)} "
                "parameters match by name and shape): it is a checkpoint of another model, or of "
                "a different config."
            )
        class_count = {k for k in unloaded & bad_shapes if k.startswith(_CLASS_COUNT_PREFIXES)}
        other = sorted(unloaded - class_count)
        described = FORMATS[fmt][0] if fmt in FORMATS else "this project's names"
        if other and (detection or self.require_all):
            raise CheckpointLoadError(
                f"Checkpoint {source} (it looks like {described}) leaves {len(other)} "
                f"parameter(s) of this model unloaded, e.g. {other[:5]}. It is a detection "
                "checkpoint of another architecture or config (check MODEL.ALIGN_DETR.* against "
                "the checkpoint's: base, layers, d_model, queries, levels, SD-DETR options), or "
                "the file is incomplete."
                if detection
                else f"Checkpoint {source} leaves {len(other)} parameter(s) of this model "
                f"unloaded, e.g. {other[:5]}; evaluating needs every weight."
            )
        if class_count:
            message = (
                f"Checkpoint {source}: {len(class_count)} class-dependent weight(s) (class heads, "
                "denoising label embedding) are for another number of classes than "
                f"MODEL.ALIGN_DETR.NUM_CLASSES ({sorted(class_count)[0]}, ...)"
            )
            if self.require_all:
                raise CheckpointLoadError(message + "; evaluating needs every weight.")
            self.logger.warning(message + ": left at their initialisation (fine-tuning).")
        self.last_load_report = (
            f"{source}: {described}"
            + (", converted to this project's names in memory" if fmt != "ours" else "")
            + f"; {len(model_keys) - len(unloaded)} of {len(model_keys)} weights of the model "
            + ("loaded, nothing is missing." if not unloaded else "loaded.")
        )
        self.logger.info(self.last_load_report)
        return incompatible


def check_weights_file(cfg, path: str, require_all: bool) -> str:
    """Applies the loading rules of :class:`AtomicCheckpointer` to a weights file without
    building the model's weights (the model is built on the "meta" device: no memory, no
    compute), so a wrong file fails before anything heavy starts.

    Returns:
        one line saying what the file is and how much of the model it loads.

    Raises:
        CheckpointLoadError: as loading it for real would.
    """
    from detectron2.modeling import build_model

    meta_cfg = cfg.clone()
    meta_cfg.defrost()
    meta_cfg.MODEL.DEVICE = "meta"
    meta_cfg.MODEL.WEIGHTS = ""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "copying ... to a meta parameter is a no-op"
        with torch.device("meta"):
            model = build_model(meta_cfg)
        checkpointer = AtomicCheckpointer(model, require_all=require_all)
        checkpointer.load(path)
    return checkpointer.last_load_report


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


def load_for_inference(cfg, model: torch.nn.Module, resume: bool = False) -> None:
    """Loads the weights that ``--eval-only``, the demo and :class:`Predictor` run: OUTPUT_DIR's
    last checkpoint with ``resume``, else ``MODEL.WEIGHTS``; every parameter must be loaded.
    With ``MODEL.ALIGN_DETR.EMA.ENABLED`` the checkpoint's EMA weights, as training's
    evaluations use them (a warning and the plain weights when the file has none)."""
    from .hooks import build_ema  # hooks imports the data package; keep this module light

    checkpointer = AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR, require_all=True)
    ema = build_ema(cfg, model)
    if ema is not None:
        checkpointer.add_checkpointable("ema", ema)
    load_checkpoint(checkpointer, cfg.MODEL.WEIGHTS, resume, ema)
    if ema is None:
        return
    logger = logging.getLogger(__name__)
    if ema.loaded:
        ema.copy_to(model)
        logger.info("Using the EMA weights")
    else:
        logger.warning(
            "MODEL.ALIGN_DETR.EMA.ENABLED but the checkpoint has no EMA weights; "
            "using its plain weights."
        )
