"""The command-line entry points print no third-party warning a user cannot act on
(align_detr/utils/quiet.py), while our own warnings, and everything with the filtering turned
off, still show. Each script runs in a fresh Python, as a user runs it."""

import os
import re
import subprocess
import sys

import pytest
from helpers import ROOT, config_path, write_labelme_export

#: A Python warning as ``warnings`` prints it ("path:line: SomeWarning: message"), or a torch
#: log record at WARNING level ("W1207 15:30:01.005000 4604 path:line] message").
_WARNING_LINE = re.compile(
    r"^(?P<path>\S+?):\d+: \w*Warning: |^W\d{4} [\d:.]+ +\d+ (?P<tpath>\S+?):"
)


def third_party_warnings(stderr: str):
    """The lines of ``stderr`` that are warnings raised outside this repository's own code."""
    found = []
    for line in stderr.splitlines():
        m = _WARNING_LINE.match(line)
        if m:
            path = m.group("path") or m.group("tpath")
            ours = (
                os.path.abspath(os.path.join(ROOT, path)).startswith(
                    os.path.join(ROOT, "align_detr")
                )
                and "site-packages" not in path
            )
            if not ours:
                found.append(line)
    return found


def _run(argv, env=None, timeout=300):
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1", **(env or {}))
    for key in ("PYTHONWARNINGS", "ALIGN_DETR_ALL_WARNINGS"):
        if key not in (env or {}):
            env.pop(key, None)
    return subprocess.run(
        [sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


_PROBE = """
import warnings
from align_detr.utils.quiet import quiet_third_party_warnings
quiet_third_party_warnings()
import torch
import detectron2.engine  # fvcore / detectron2 call torch.jit.script on import
torch.meshgrid(torch.arange(2), torch.arange(2))  # no indexing=: torch warns
from align_detr.data import coco_json
warnings.warn_explicit("our own warning", UserWarning, coco_json.__file__, 1, module=coco_json.__name__)
import logging
logging.getLogger("align_detr").warning("our own log warning")
"""


def test_known_warnings_hidden_ours_shown_and_all_with_the_switch():
    quiet = _run(["-c", _PROBE])
    assert quiet.returncode == 0, quiet.stderr
    assert "our own warning" in quiet.stderr and "our own log warning" in quiet.stderr
    assert third_party_warnings(quiet.stderr) == []
    # The same program with the filtering switched off shows the warnings: they exist, and the
    # filters are what hides them.
    loud = _run(["-c", _PROBE], env={"ALIGN_DETR_ALL_WARNINGS": "1"})
    assert "`torch.jit.script` is deprecated" in loud.stderr
    assert "torch.meshgrid: in an upcoming release" in loud.stderr
    assert len(third_party_warnings(loud.stderr)) >= 2
    # Python's own switch wins too.
    assert "`torch.jit.script`" in _run(["-W", "default", "-c", _PROBE]).stderr


def test_train_net_and_demo_print_no_third_party_warning(tmp_path):
    """A tiny training run with its evaluation, then the demo on its saved config."""
    json_file = write_labelme_export(str(tmp_path / "data"))
    out = str(tmp_path / "out")
    train = _run(
        ["train_net.py", "--config-file", config_path("tiny_test.yaml")]
        + ["DATASETS.TRAIN_JSON", json_file, "DATASETS.TEST_JSON", json_file]
        + ["SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "(1,)", "OUTPUT_DIR", out]
    )
    assert train.returncode == 0, train.stderr[-3000:]
    assert third_party_warnings(train.stderr) == [], train.stderr
    assert "Average Precision" in train.stdout  # it did train and evaluate

    image = os.path.join(os.path.dirname(json_file), "JPEGImages", "img0.png")
    demo = _run(
        ["demo/demo.py", "--config-file", os.path.join(out, "config.yaml"), "--input", image]
        + ["--output", str(tmp_path / "drawn.png"), "--confidence-threshold", "0.0"]
        + ["--opts", "MODEL.WEIGHTS", os.path.join(out, "model_final.pth")]
    )
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert third_party_warnings(demo.stderr) == [], demo.stderr
    assert os.path.isfile(tmp_path / "drawn.png")


@pytest.mark.parametrize(
    "script",
    [
        "tools/train_baseline.py",
        "tools/quickstart_report.py",
        "tools/check_equivalence.py",
        "tools/convert_checkpoint.py",
    ],
)
def test_tools_import_quietly(script):
    """The tools that import detectron2 (the import is where most warnings come from)."""
    proc = _run([script, "--help"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert third_party_warnings(proc.stderr) == [], proc.stderr
