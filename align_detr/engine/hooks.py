# Copyright (c) align-detr contributors.
"""Training hooks for exact resume and for the EMA of the weights."""

import contextlib
import json
import logging
import os
from typing import Dict, Optional

import torch
from detectron2.engine import HookBase
from detectron2.utils import comm
from torch import nn

from ..data import ResumableBatchSampler
from ..utils.seed import derive_seed, seed_all_rngs
from .d2_compat import history_state, restore_history

__all__ = ["EMAHook", "ModelEMA", "ResumeStateHook", "build_ema", "unwrap_model"]

logger = logging.getLogger(__name__)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a (Distributed)DataParallel wrapper, or the model itself."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class ModelEMA:
    """Exponential moving average of a model's weights.

    After every optimizer step, ``ema = decay * ema + (1 - decay) * weight`` for each floating
    point parameter and buffer; other buffers (e.g. integer counters) are copied. The average
    lives in fp32 on the model's device.

    Args:
        model (nn.Module): the model (a DDP wrapper is unwrapped).
        decay (float): in [0, 1).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9997):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ModelEMA: decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.loaded = False  # set by load_state_dict
        self.reset(model)

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Starts the average from the model's current weights."""
        self.state = {
            k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
            for k, v in unwrap_model(model).state_dict().items()
        }
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in unwrap_model(model).state_dict().items():
            avg = self.state[k]
            if v.is_floating_point():
                avg.mul_(self.decay).add_(v.detach().float(), alpha=1.0 - self.decay)
            else:
                avg.copy_(v)
        self.updates += 1

    @contextlib.contextmanager
    def applied_to(self, model: nn.Module):
        """Runs the block with the EMA weights in ``model``, then puts the model's own back."""
        module = unwrap_model(model)
        own = {k: v.detach().clone() for k, v in module.state_dict().items()}
        self.copy_to(module)
        try:
            yield module
        finally:
            module.load_state_dict(own)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Writes the EMA weights into ``model``."""
        module = unwrap_model(model)
        module.load_state_dict(
            {k: v.to(module.state_dict()[k].dtype) for k, v in self.state.items()}
        )

    def state_dict(self) -> Dict:
        return {"decay": self.decay, "updates": self.updates, "state": self.state}

    def load_state_dict(self, state: Dict) -> None:
        missing = set(self.state) - set(state["state"])
        if missing:
            raise KeyError(
                f"EMA state lacks {len(missing)} weights of the model, e.g. {sorted(missing)[:3]}"
            )
        for k, v in state["state"].items():
            if k in self.state:
                self.state[k].copy_(v)
        self.updates = int(state.get("updates", 0))
        self.loaded = True


def build_ema(cfg, model: nn.Module) -> Optional[ModelEMA]:
    """A :class:`ModelEMA` of ``model`` when ``MODEL.ALIGN_DETR.EMA.ENABLED``, else None."""
    if not cfg.MODEL.ALIGN_DETR.EMA.ENABLED:
        return None
    return ModelEMA(model, cfg.MODEL.ALIGN_DETR.EMA.DECAY)


class EMAHook(HookBase):
    """Updates a :class:`ModelEMA` after every training step (placed before checkpointing and
    evaluation, so both see the average of the step that just ended)."""

    def __init__(self, ema: ModelEMA, model: nn.Module):
        self.ema, self._model = ema, model

    def after_step(self):
        self.ema.update(self._model)


class ResumeStateHook(HookBase):
    """What detectron2's checkpoint lacks for an exact resume.

    * Before each step, the torch, numpy and Python RNGs are seeded from
      ``(seed, iteration, rank)``, so the random draws of a step (denoising noise, dropout) do
      not depend on what ran before it, in any process. ``seed`` is the loader's seed
      (``cfg.SEED``, or a shared random one) and is saved in the checkpoint.
    * The recent history of the event storage is saved, and restored on resume, so smoothed
      values in ``metrics.json`` and the console continue exactly.
    * On resume (``trainer.resume_requested``), ``metrics.json`` lines of iterations from the
      start iteration on (written by the killed run) are removed before the resumed run writes.
    """

    def __init__(self, sampler: ResumableBatchSampler, output_dir: str, history: int = 200):
        self._sampler, self._output_dir, self._history = sampler, output_dir, history
        self._restored_storage: Optional[Dict] = None

    def before_train(self):
        start = self.trainer.start_iter
        if self._restored_storage:
            for name, state in self._restored_storage.items():
                restore_history(self.trainer.storage, name, state)
            self._restored_storage = None
        if getattr(self.trainer, "resume_requested", False) and comm.is_main_process():
            _truncate_metrics(os.path.join(self._output_dir, "metrics.json"), start)

    def before_step(self):
        seed_all_rngs(derive_seed(self._sampler.seed, self.trainer.iter, comm.get_rank()))

    def state_dict(self):
        storage = getattr(self.trainer, "storage", None)
        history = {}
        if storage is not None:
            for name, h in storage.histories().items():
                history[name] = history_state(h, self._history)
        return {"seed": self._sampler.seed, "storage": history}

    def load_state_dict(self, state):
        self._sampler.seed = int(state["seed"])
        self._restored_storage = state.get("storage") or None


def _truncate_metrics(path: str, start_iter: int) -> None:
    """Keeps the lines of ``metrics.json`` with ``iteration < start_iter``, in place (the
    JSONWriter's append-mode handle then continues at the new end)."""
    if not os.path.isfile(path):
        return
    with open(path, "r+") as f:
        lines = f.readlines()
        kept = []
        for line in lines:
            try:
                if json.loads(line).get("iteration", -1) < start_iter:
                    kept.append(line)
            except ValueError:  # a line cut by the kill
                pass
        if len(kept) != len(lines):
            f.seek(0)
            f.writelines(kept)
            f.truncate()
            logger.info(
                "Removed %d metrics.json line(s) written after the checkpoint",
                len(lines) - len(kept),
            )
