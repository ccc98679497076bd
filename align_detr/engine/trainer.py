# Copyright (c) align-detr contributors.
"""The detectron2 trainer of align-detr: DETR data pipeline, COCO evaluation, AdamW recipe.

Only what differs from ``DefaultTrainer`` is overridden. The learning-rate schedule is
detectron2's (``SOLVER.LR_SCHEDULER_NAME`` "WarmupMultiStepLR" with ``SOLVER.STEPS``; the
configs set ``WARMUP_ITERS`` 0, as the DINO / Align-DETR recipe has no warm-up).
"""

import logging
import os
import weakref
from collections import OrderedDict
from typing import Dict

import torch
from detectron2.data import build_detection_test_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..data import DetrDatasetMapper, build_resumable_train_loader
from ..modeling.test_time_augmentation import build_tta_model
from .checkpoint import AtomicCheckpointer, load_checkpoint, load_for_inference
from .d2_compat import FiniteLossCheckMixin, set_writer_period, wrap_eval_function
from .hooks import EMAHook, ResumeStateHook, build_ema, unwrap_model
from .solver import build_detr_optimizer

__all__ = ["Trainer", "check_finite_losses", "test_with_tta"]

logger = logging.getLogger(__name__)


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


def test_with_tta(trainer_cls, cfg, model) -> "OrderedDict[str, dict]":
    """Scores ``model`` on ``cfg.DATASETS.TEST`` with test-time augmentation (``cfg.TEST.AUG``:
    dihedral views fused by weighted box fusion) through ``trainer_cls.test`` and the
    evaluators of ``trainer_cls``. Each key of the plain results gets "_TTA" appended, as in
    detectron2's ``test_with_TTA`` (``"bbox_TTA"`` with one test dataset; ``"<dataset>_TTA"``
    with several); the evaluators write to ``OUTPUT_DIR/inference_TTA``."""
    logger.info(f"Evaluating with test-time augmentation: {cfg.TEST.AUG.VIEWS} dihedral views")
    folder = os.path.join(cfg.OUTPUT_DIR, "inference_TTA")
    evaluators = [trainer_cls.build_evaluator(cfg, name, folder) for name in cfg.DATASETS.TEST]
    results = trainer_cls.test(cfg, build_tta_model(cfg, unwrap_model(model)), evaluators)
    return OrderedDict((f"{key}_TTA", metrics) for key, metrics in results.items())


class _CheckedSimpleTrainer(FiniteLossCheckMixin, SimpleTrainer):
    check_losses = staticmethod(check_finite_losses)


class _CheckedAMPTrainer(FiniteLossCheckMixin, AMPTrainer):
    check_losses = staticmethod(check_finite_losses)


class _CheckedCPUAutocastTrainer(FiniteLossCheckMixin, SimpleTrainer):
    """``SOLVER.AMP.ENABLED`` on the CPU: the step runs under bfloat16 autocast (matrix products
    and convolutions in bf16, AMX where the CPU has it), with fp32 master weights and
    optimizer state; bfloat16 has fp32's range, so no gradient scaling is needed. (detectron2's
    AMPTrainer is CUDA-only.)"""

    check_losses = staticmethod(check_finite_losses)

    def run_step(self):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            super().run_step()


def _trainer_type(cfg, device: torch.device):
    if not cfg.SOLVER.AMP.ENABLED:
        return _CheckedSimpleTrainer
    return _CheckedAMPTrainer if device.type == "cuda" else _CheckedCPUAutocastTrainer


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
    * With ``TEST.AUG.ENABLED`` the final model is also scored with test-time augmentation
      (:meth:`test_with_TTA`, results under ``"bbox_TTA"``).
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
        self.ema = build_ema(cfg, model)
        model = create_ddp_model(
            model,
            broadcast_buffers=False,
            find_unused_parameters=_may_leave_parameters_unused(cfg),
            **({} if device.type == "cuda" else {"device_ids": None}),
        )
        self._trainer = _trainer_type(cfg, device)(model, data_loader, optimizer)

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
        checkpoint, resumed = load_checkpoint(
            self.checkpointer, self.cfg.MODEL.WEIGHTS, resume, self.ema
        )
        if resumed:
            self.start_iter = self.iter + 1
        if self.ema is not None and not (resumed and self.ema.loaded):
            if resumed:
                logger.warning(
                    "The checkpoint has no EMA weights; the EMA starts from the loaded model."
                )
            self.ema.reset(self.model)  # start the average from the loaded weights
        if self.train_sampler is not None:
            self.train_sampler.set_start(self.start_iter)
        return checkpoint

    @classmethod
    def load_for_evaluation(cls, cfg, model, resume: bool = False) -> None:
        """Loads the weights ``--eval-only`` evaluates into ``model``
        (:func:`~align_detr.engine.checkpoint.load_for_inference`: the EMA weights when
        ``MODEL.ALIGN_DETR.EMA.ENABLED``)."""
        load_for_inference(cfg, model, resume)

    @classmethod
    def test_with_TTA(cls, cfg, model):
        """COCO scores of ``model`` with test-time augmentation, keyed ``"bbox_TTA"``
        (:func:`test_with_tta`)."""
        return test_with_tta(cls, cfg, model)

    def build_hooks(self):
        """detectron2's hooks, plus :class:`ResumeStateHook` and :class:`EMAHook`; evaluation
        uses the EMA weights when enabled, and the checkpointer runs last in each iteration, so
        a checkpoint of iteration ``i`` comes after everything iteration ``i`` writes."""
        ret = [h for h in super().build_hooks() if h is not None]
        checkpointers = [h for h in ret if isinstance(h, hooks.PeriodicCheckpointer)]
        ret = [h for h in ret if not isinstance(h, hooks.PeriodicCheckpointer)]
        extra = []
        if self.cfg.TEST.AUG.ENABLED:  # after training only, next to the last plain evaluation
            last_eval = max(i for i, h in enumerate(ret) if isinstance(h, hooks.EvalHook))
            tta_eval = hooks.EvalHook(0, lambda: self.test_with_TTA(self.cfg, self.model))
            ret.insert(last_eval + 1, tta_eval)
        if self.train_sampler is not None:
            extra.append(ResumeStateHook(self.train_sampler, self.cfg.OUTPUT_DIR))
        for h in ret:
            if isinstance(h, hooks.PeriodicWriter):
                set_writer_period(h, self.writer_period)
        if self.ema is not None:
            extra.append(EMAHook(self.ema, self.model))
            for h in ret:
                if isinstance(h, hooks.EvalHook):
                    wrap_eval_function(h, self._ema_eval)
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
        logger.info(
            "Optimizer %s: %d parameter groups",
            type(optimizer).__name__,
            len(optimizer.param_groups),
        )
        return optimizer


def _may_leave_parameters_unused(cfg) -> bool:
    # The DN label embedding gets no gradient without DN, or in a batch without any box (kept
    # when FILTER_EMPTY_ANNOTATIONS is off); DDP must then look for unused parameters.
    return not cfg.MODEL.ALIGN_DETR.DN.ENABLED or not cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
