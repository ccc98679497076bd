# Copyright (c) align-detr contributors.
"""The detectron2 trainer of align-detr: DETR data pipeline, COCO evaluation, AdamW recipe.

Only what differs from ``DefaultTrainer`` is overridden. The learning-rate schedule is
detectron2's (``SOLVER.LR_SCHEDULER_NAME`` "WarmupMultiStepLR" with ``SOLVER.STEPS``; the
configs set ``WARMUP_ITERS`` 0, as the DINO / Align-DETR recipe has no warm-up).
"""

import itertools
import logging
import os
import weakref
from typing import Any, Dict, List, Type

import torch
from detectron2.data import build_detection_test_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import COCOEvaluator
from detectron2.layers.batch_norm import LayerNorm as D2LayerNorm
from detectron2.solver.build import maybe_add_gradient_clipping, reduce_param_groups
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..data import DetrDatasetMapper
from .checkpoint import AtomicCheckpointer
from .data import build_resumable_train_loader
from .hooks import EMAHook, ModelEMA, ResumeStateHook

__all__ = [
    "Trainer",
    "check_finite_losses",
    "build_detr_optimizer",
    "get_detr_optimizer_params",
    "maybe_add_full_model_gradient_clipping",
]

# Normalisation layers get SOLVER.WEIGHT_DECAY_NORM (detectron2's list, plus its channels-first
# LayerNorm). FrozenBatchNorm2d has buffers only, so it never shows up.
_NORM_MODULE_TYPES = (
    torch.nn.modules.batchnorm._BatchNorm,  # BatchNorm1d/2d/3d, SyncBatchNorm, NaiveSyncBatchNorm
    torch.nn.GroupNorm,
    torch.nn.modules.instancenorm._InstanceNorm,
    torch.nn.LayerNorm,
    torch.nn.LocalResponseNorm,
    D2LayerNorm,
)


def _is_embedding(module: torch.nn.Module, param_name: str) -> bool:
    # nn.Embedding tables (content queries, DN label embedding) and bare parameters whose own
    # name says they are an embedding (e.g. "level_embed"). Only the parameter's own name is
    # checked, so heads such as "class_embed.weight" (nn.Linear) keep their weight decay.
    return isinstance(module, torch.nn.Embedding) or "embed" in param_name


def get_detr_optimizer_params(
    model: torch.nn.Module,
    base_lr: float,
    weight_decay: float,
    weight_decay_norm: float = 0.0,
    weight_decay_embed: float = 0.0,
    backbone_multiplier: float = 0.1,
) -> List[Dict[str, Any]]:
    """Parameter groups of the DETR recipe.

    Like detectron2's ``get_default_optimizer_params(weight_decay_norm=...)``, plus what this
    detectron2 version lacks: no weight decay on embeddings, and a learning-rate multiplier for
    every parameter whose full name contains "backbone". Frozen parameters are left out.

    Args:
        model (nn.Module): the model.
        base_lr (float): learning rate of every non-backbone parameter.
        weight_decay (float): weight decay of every parameter that is neither a norm nor an
            embedding.
        weight_decay_norm (float): weight decay of the parameters of normalisation layers.
        weight_decay_embed (float): weight decay of nn.Embedding weights and of parameters whose
            own name contains "embed".
        backbone_multiplier (float): learning-rate factor of the backbone.

    Returns:
        list[dict]: parameter groups (``params``, ``lr``, ``weight_decay``), merged so that
        parameters with equal hyper-parameters share a group.
    """
    params: List[Dict[str, Any]] = []
    memo = set()
    for module_name, module in model.named_modules():
        for param_name, value in module.named_parameters(recurse=False):
            if not value.requires_grad or value in memo:
                continue
            memo.add(value)
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            lr, wd = base_lr, weight_decay
            if isinstance(module, _NORM_MODULE_TYPES):
                wd = weight_decay_norm
            elif _is_embedding(module, param_name):
                wd = weight_decay_embed
            if "backbone" in full_name:
                lr = base_lr * backbone_multiplier
            params.append({"params": [value], "lr": lr, "weight_decay": wd})
    return reduce_param_groups(params)


def maybe_add_full_model_gradient_clipping(
    cfg, optimizer_type: Type[torch.optim.Optimizer]
) -> Type[torch.optim.Optimizer]:
    """Adds gradient clipping to an optimizer class, as ``SOLVER.CLIP_GRADIENTS`` asks.

    ``CLIP_TYPE`` "full_model" clips the L2 norm (``NORM_TYPE``) of all gradients together at
    ``CLIP_VALUE``, as DETR does; detectron2 itself only clips per parameter, so "value" and
    "norm" are handed to its ``maybe_add_gradient_clipping``.

    Clipping happens inside ``step()``, so under AMP it sees the gradients that ``GradScaler``
    has already unscaled.

    Args:
        cfg (CfgNode): the config.
        optimizer_type (type): a ``torch.optim.Optimizer`` subclass.

    Returns:
        type: ``optimizer_type`` itself when clipping is off, else a subclass of it.
    """
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not clip.ENABLED:
        return optimizer_type
    if clip.CLIP_TYPE != "full_model":
        return maybe_add_gradient_clipping(cfg, optimizer_type)
    max_norm, norm_type = clip.CLIP_VALUE, clip.NORM_TYPE

    def step(self, closure=None):
        all_params = itertools.chain(*[g["params"] for g in self.param_groups])
        torch.nn.utils.clip_grad_norm_(all_params, max_norm, norm_type)
        return super(clipped_type, self).step(closure)

    clipped_type = type(
        optimizer_type.__name__ + "WithFullModelGradientClip", (optimizer_type,), {"step": step}
    )
    return clipped_type


def build_detr_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Builds the optimizer named by ``SOLVER.OPTIMIZER`` ("ADAMW" or "SGD").

    Args:
        cfg (CfgNode): the config; reads ``SOLVER.{OPTIMIZER, BASE_LR, WEIGHT_DECAY,
            WEIGHT_DECAY_NORM, WEIGHT_DECAY_EMBED, BACKBONE_MULTIPLIER, MOMENTUM, NESTEROV,
            CLIP_GRADIENTS}``.
        model (nn.Module): the model.

    Returns:
        torch.optim.Optimizer

    Raises:
        ValueError: for an unknown ``SOLVER.OPTIMIZER``.
    """
    params = get_detr_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        weight_decay_embed=cfg.SOLVER.WEIGHT_DECAY_EMBED,
        backbone_multiplier=cfg.SOLVER.BACKBONE_MULTIPLIER,
    )
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name == "ADAMW":
        optimizer_type, kwargs = torch.optim.AdamW, {}
    elif name == "SGD":
        optimizer_type = torch.optim.SGD
        kwargs = {"momentum": cfg.SOLVER.MOMENTUM, "nesterov": cfg.SOLVER.NESTEROV}
    else:
        raise ValueError(
            f"Unknown SOLVER.OPTIMIZER {cfg.SOLVER.OPTIMIZER!r}; expected 'ADAMW' or 'SGD'."
        )
    optimizer_type = maybe_add_full_model_gradient_clipping(cfg, optimizer_type)
    return optimizer_type(
        params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY, **kwargs
    )


def check_finite_losses(loss_dict: Dict[str, torch.Tensor], iteration: int) -> None:
    """Raises ``FloatingPointError`` naming the iteration and every non-finite loss term."""
    values = {k: float(v.detach().float().sum()) for k, v in loss_dict.items()}
    bad = [k for k, v in values.items() if not torch.isfinite(torch.tensor(v))]
    if bad:
        raise FloatingPointError(
            f"Loss became infinite or NaN at iteration={iteration}: non-finite loss term(s) "
            f"{', '.join(bad)} (rank {comm.get_rank()}).\nloss_dict = {values}\nThe optimizer "
            "step of this iteration was skipped. Lower SOLVER.BASE_LR, keep "
            "SOLVER.CLIP_GRADIENTS enabled, or check the data of this iteration."
        )


class _FiniteLossMixin:
    """Checks every process's losses at every iteration, before the optimizer step, and names
    the term that is not finite (detectron2 checks only their sum, on the main process)."""

    def _write_metrics(self, loss_dict, data_time, prefix="", iter=None):
        check_finite_losses(loss_dict, self.iter if iter is None else iter)
        super()._write_metrics(loss_dict, data_time, prefix=prefix, iter=iter)


class _CheckedSimpleTrainer(_FiniteLossMixin, SimpleTrainer):
    pass


class _CheckedAMPTrainer(_FiniteLossMixin, AMPTrainer):
    pass


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` with the DETR data pipeline, COCO evaluation and the DETR optimizer,
    plus what exact resume and CPU multi-process training need.

    * The training loader is :func:`build_resumable_train_loader` (annotations validated before
      training; data order and augmentation a function of ``(seed, iteration)``), resumed at
      the checkpoint's iteration.
    * :class:`ResumeStateHook` reseeds the RNGs per step and carries the seed and the metric
      history through checkpoints; checkpoints are written atomically (:class:`AtomicCheckpointer`).
    * With ``MODEL.ALIGN_DETR.EMA.ENABLED`` an EMA of the weights is updated after every step,
      saved in checkpoints (key ``"ema"``) and used for evaluation.
    * DDP also works on CPU (gloo): ``device_ids`` is only passed for CUDA models.
    * Every process checks its losses for NaN / inf at every iteration, naming the term.
    """

    #: Iterations between two writes of the metrics (console, metrics.json, TensorBoard).
    writer_period = 20

    def __init__(self, cfg):
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())

        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        # Exact resume needs the resumable loader; a subclass may return any detectron2 loader.
        self.train_sampler = getattr(data_loader, "resumable_sampler", None)

        device = next(model.parameters()).device
        self.ema = ModelEMA(model, cfg.MODEL.ALIGN_DETR.EMA.DECAY) if _ema_enabled(cfg) else None
        model = create_ddp_model(
            model,
            broadcast_buffers=False,
            find_unused_parameters=_may_leave_parameters_unused(cfg),
            **({} if device.type == "cuda" else {"device_ids": None}),
        )
        trainer_type = _CheckedAMPTrainer if cfg.SOLVER.AMP.ENABLED else _CheckedSimpleTrainer
        self._trainer = trainer_type(model, data_loader, optimizer)

        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = AtomicCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        if self.ema is not None:
            self.checkpointer.add_checkpointable("ema", self.ema)
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def resume_or_load(self, resume=True):
        self.resume_requested = resume
        if self.ema is not None:
            self.ema.loaded = False
        checkpoint = self.checkpointer.resume_or_load(self.cfg.MODEL.WEIGHTS, resume=resume)
        resumed = resume and self.checkpointer.has_checkpoint()
        if resumed:
            self.start_iter = self.iter + 1
        if self.ema is not None and not (resumed and self.ema.loaded):
            if resumed:
                logging.getLogger(__name__).warning(
                    "The checkpoint has no EMA weights; the EMA starts from the loaded model."
                )
            self.ema.reset(self.model)  # start the average from the loaded weights
        if self.train_sampler is not None:
            self.train_sampler.set_start(self.start_iter)
        return checkpoint

    def build_hooks(self):
        """detectron2's hooks, plus :class:`ResumeStateHook` and :class:`EMAHook`; evaluation
        uses the EMA weights when enabled, and the checkpointer runs last in each iteration, so
        a checkpoint of iteration ``i`` comes after everything iteration ``i`` writes."""
        ret = [h for h in super().build_hooks() if h is not None]
        checkpointers = [h for h in ret if isinstance(h, hooks.PeriodicCheckpointer)]
        ret = [h for h in ret if not isinstance(h, hooks.PeriodicCheckpointer)]
        extra = []
        if self.train_sampler is not None:
            extra.append(ResumeStateHook(self.train_sampler, self.cfg.OUTPUT_DIR))
        for h in ret:
            if isinstance(h, hooks.PeriodicWriter):
                h._period = self.writer_period
        if self.ema is not None:
            extra.append(EMAHook(self.ema, self.model))
            for h in ret:
                if isinstance(h, hooks.EvalHook):
                    h._func = self._ema_eval(h._func)
        # After the LR scheduler (index 1), before PreciseBN, evaluation and the writers.
        return ret[:2] + extra + ret[2:] + checkpointers

    def _ema_eval(self, func):
        def eval_with_ema():
            with self.ema.applied_to(self.model):
                return func()

        return eval_with_ema

    @classmethod
    def build_train_loader(cls, cfg):
        """The loader of :func:`build_resumable_train_loader` (its sampler is the loader's
        ``resumable_sampler`` attribute). Images without (non-crowd) boxes are dropped by
        ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``."""
        loader, sampler = build_resumable_train_loader(
            cfg, mapper=DetrDatasetMapper(cfg, is_train=True)
        )
        loader.resumable_sampler = sampler
        return loader

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(
            cfg, dataset_name, mapper=DetrDatasetMapper(cfg, is_train=False)
        )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        # The model predicts boxes only. use_fast_impl=False: pycocotools' official COCOeval,
        # the numbers papers report (detectron2's fast C++ evaluator is "unofficial").
        return COCOEvaluator(
            dataset_name, tasks=("bbox",), output_dir=output_folder, use_fast_impl=False
        )

    @classmethod
    def build_optimizer(cls, cfg, model):
        optimizer = build_detr_optimizer(cfg, model)
        logging.getLogger(__name__).info(
            "Optimizer %s: %d parameter groups",
            type(optimizer).__name__,
            len(optimizer.param_groups),
        )
        return optimizer


def _ema_enabled(cfg) -> bool:
    return bool(cfg.MODEL.ALIGN_DETR.EMA.ENABLED)


def _may_leave_parameters_unused(cfg) -> bool:
    # The DN label embedding gets no gradient without DN, or in a batch without any box (kept
    # when FILTER_EMPTY_ANNOTATIONS is off); DDP must then look for unused parameters.
    return not cfg.MODEL.ALIGN_DETR.DN.ENABLED or not cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
