"""The package's shape: thin imports, the detectron2 private APIs the engine relies on, and the
config short forms."""

import subprocess
import sys

import detectron2
import pytest
from detectron2.engine import AMPTrainer, SimpleTrainer, hooks
from detectron2.utils.events import EventStorage
from fvcore.common.history_buffer import HistoryBuffer
from helpers import ROOT, tiny_cfg

from align_detr.config import ConfigError, resolve_match_k
from align_detr.engine import AtomicCheckpointer, d2_compat


def test_kernels_and_matching_load_neither_the_engine_nor_the_model():
    code = (
        "import sys, align_detr.layers, align_detr.matching\n"
        "print(sorted(m for m in sys.modules "
        "if m.startswith(('detectron2.engine', 'align_detr.modeling', 'align_detr.data'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_detectron2_private_apis_are_where_the_engine_expects_them():
    # d2_compat is written against this release; an upgrade must re-check every helper.
    assert detectron2.__version__ == d2_compat.TESTED_DETECTRON2_VERSION
    writer = hooks.PeriodicWriter([], period=20)
    d2_compat.set_writer_period(writer, 3)
    assert writer._period == 3
    calls = []
    ev = hooks.EvalHook(5, lambda: calls.append("f"))
    d2_compat.wrap_eval_function(ev, lambda f: lambda: (calls.append("wrapped"), f())[1])
    ev._func()
    assert calls == ["wrapped", "f"]
    buf = HistoryBuffer()
    for i in range(5):
        buf.update(float(i), i)
    state = d2_compat.history_state(buf, keep=3)
    with EventStorage() as storage:
        d2_compat.restore_history(storage, "loss", state)
        restored = storage.history("loss")
    assert restored.values() == buf.values()[-3:] and restored.global_avg() == buf.global_avg()
    for trainer in (SimpleTrainer, AMPTrainer):
        assert callable(getattr(trainer, "_write_metrics"))
    assert "_parsed_url_during_load" in vars(AtomicCheckpointer(tiny_model()))


def tiny_model():
    from detectron2.modeling import build_model

    return build_model(tiny_cfg())


def test_match_k_short_form():
    assert resolve_match_k([2], 7) == [2, 2, 2, 2, 2, 2, 1]
    assert resolve_match_k([1], 3) == [1, 1, 1]
    assert resolve_match_k([3, 2, 1], 3) == [3, 2, 1]
    with pytest.raises(ConfigError, match="has 2 entries but this model has 3"):
        resolve_match_k([2, 1], 3)
    with pytest.raises(ConfigError, match="integers >= 1"):
        resolve_match_k([0], 3)
    # the tiny config's 2-layer decoder takes the same short form as the 6-layer recipes
    assert tiny_cfg("MODEL.ALIGN_DETR.LOSS.MATCH_K", "[2]").MODEL.ALIGN_DETR.DECODER.NUM_LAYERS == 2


def test_config_checks_what_only_the_model_build_used_to():
    with pytest.raises(ConfigError, match="IN_FEATURES .* not among the backbone's outputs"):
        tiny_cfg("MODEL.ALIGN_DETR.IN_FEATURES", "['res2', 'res9']")
    with pytest.raises(ConfigError, match="TASK_AWARE_QUERIES needs DECODER.DECOUPLED"):
        tiny_cfg("MODEL.ALIGN_DETR.DECODER.TASK_AWARE_QUERIES", "True")
    with pytest.raises(ConfigError, match="BASE must be one of"):
        tiny_cfg("MODEL.ALIGN_DETR.BASE", "'NoSuchBase'")
