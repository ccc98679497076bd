# Copyright (c) align-detr contributors.
"""Silences the third-party warnings a user of the command-line tools cannot act on.

``train_net.py``, ``demo/demo.py`` and the scripts in ``tools/`` call
:func:`quiet_third_party_warnings` first thing, before they import detectron2 (several of these
warnings are raised at import time). It is never called when the library is imported: a program
that imports ``align_detr`` keeps its own warning settings.

Only the warnings listed below are hidden, each matched by category, message and the module the
warning is attributed to (or, for log records, by logger and message); every other warning, ours
(``align_detr.*`` loggers, ``warnings.warn`` in this package) included, still shows. Running
Python with ``-W`` or ``PYTHONWARNINGS`` set, or with ``ALIGN_DETR_ALL_WARNINGS=1``, turns the
filtering off, to see everything.
"""

import logging
import os
import re
import sys
import warnings

__all__ = [
    "KNOWN_THIRD_PARTY_LOG_RECORDS",
    "KNOWN_THIRD_PARTY_WARNINGS",
    "quiet_third_party_warnings",
]

#: (category, message regex, module regex) of the ``warnings`` hidden. ``module`` is matched
#: against the module the warning is attributed to, which for these is torch's own code.
KNOWN_THIRD_PARTY_WARNINGS = (
    # fvcore and detectron2 decorate functions with torch.jit.script when they are imported;
    # torch 2.14 deprecates it. Nothing in this project calls torch.jit.script.
    (FutureWarning, r"`torch\.jit\.script` is deprecated", r"torch\.jit\._script"),
    # detectron2's anchor generator (Faster R-CNN, the quickstart's peer) calls torch.meshgrid
    # without indexing=; this project's calls pass it.
    (UserWarning, r"torch\.meshgrid: in an upcoming release", r"torch\.functional"),
)

#: (logger name, message regex) of the log records hidden: torch logs these at WARNING level.
KNOWN_THIRD_PARTY_LOG_RECORDS = (
    # detectron2's environment report (default_setup) imports torch.utils.cpp_extension, which
    # says this on every machine without a CUDA toolkit, i.e. every CPU-only one.
    ("torch.utils.cpp_extension", r"No CUDA runtime is found"),
    # detectron2's R-CNN code asks torch.fx whether it is being traced; torch now says the
    # question is ambiguous.
    ("torch.fx._symbolic_trace", r"is_fx_tracing will return true"),
    # tools/export_model.py: the ONNX optimiser says, once per Split node, that it leaves it
    # alone; the graph is correct either way (the export checks it against PyTorch).
    ("onnxscript.optimizer._constant_folding", r"Skipping constant folding for op \w+ with"),
)


class _DropMatching(logging.Filter):
    """Drops the records of one logger whose message matches a regex."""

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001  (a malformed record: let logging report it)
            return True
        return not self.pattern.search(message)


_installed = False


def quiet_third_party_warnings() -> bool:
    """Installs the filters (once per process). Returns False when filtering is turned off
    (``-W`` / ``PYTHONWARNINGS`` / ``ALIGN_DETR_ALL_WARNINGS=1``), True otherwise."""
    global _installed
    if sys.warnoptions or os.environ.get("ALIGN_DETR_ALL_WARNINGS", "") not in ("", "0"):
        return False
    if _installed:
        return True
    for category, message, module in KNOWN_THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, pattern in KNOWN_THIRD_PARTY_LOG_RECORDS:
        logging.getLogger(name).addFilter(_DropMatching(pattern))
    _installed = True
    return True
