# Copyright (c) align-detr contributors.
"""Every private detectron2 / fvcore API the engine relies on, in one place.

detectron2 exposes no public way to change a PeriodicWriter's period, wrap an EvalHook's function,
save and restore an EventStorage's history, or check each loss term before the optimizer step;
the engine does all of these through the functions here. ``tests/test_d2_compat.py`` pins them
to the detectron2 version the Makefile installs (``TESTED_DETECTRON2_VERSION``), so an upgrade
that renames one fails there, with its name, rather than deep inside a training run.
"""

from typing import Any, Callable, Dict

from detectron2.engine import hooks
from fvcore.common.history_buffer import HistoryBuffer

__all__ = [
    "TESTED_DETECTRON2_VERSION",
    "FiniteLossCheckMixin",
    "clear_parsed_url",
    "history_state",
    "restore_history",
    "set_writer_period",
    "wrap_eval_function",
]

#: The detectron2 release these helpers were written against (sal-detectron2 0.7.2 repackages
#: upstream main of 2024-04-17).
TESTED_DETECTRON2_VERSION = "0.7.2"


def set_writer_period(hook: hooks.PeriodicWriter, period: int) -> None:
    """Iterations between two writes of a ``PeriodicWriter`` (its constructor argument)."""
    hook._period = period


def wrap_eval_function(hook: hooks.EvalHook, wrapper: Callable[[Callable], Callable]) -> None:
    """Replaces an ``EvalHook``'s evaluation function ``f`` by ``wrapper(f)``."""
    hook._func = wrapper(hook._func)


def history_state(buffer: HistoryBuffer, keep: int) -> Dict[str, Any]:
    """The last ``keep`` values of a history buffer plus its running totals (picklable)."""
    return {
        "data": list(buffer._data[-keep:]),
        "count": buffer._count,
        "global_avg": buffer._global_avg,
    }


def restore_history(storage, name: str, state: Dict[str, Any]) -> None:
    """Puts a :func:`history_state` back into an ``EventStorage`` under ``name``."""
    buffer = HistoryBuffer(max_length=1000000)
    buffer._data = [tuple(x) for x in state["data"]]
    buffer._count, buffer._global_avg = state["count"], state["global_avg"]
    storage._history[name] = buffer


def clear_parsed_url(checkpointer) -> None:
    """detectron2's ``DetectionCheckpointer.load`` leaves this set when loading fails, which
    breaks the next load."""
    checkpointer._parsed_url_during_load = None


class FiniteLossCheckMixin:
    """Mixed into ``SimpleTrainer`` / ``AMPTrainer``: ``check_losses(loss_dict, iteration)``
    runs on every process at every iteration, before the losses are logged and the optimizer
    steps (detectron2 checks only their sum, on the main process)."""

    check_losses: Callable[[Dict, int], None]

    def _write_metrics(self, loss_dict, data_time, prefix="", iter=None):
        self.check_losses(loss_dict, self.iter if iter is None else iter)
        super()._write_metrics(loss_dict, data_time, prefix=prefix, iter=iter)
