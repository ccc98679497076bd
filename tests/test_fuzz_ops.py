# Copyright (c) align-detr contributors.
"""Op fuzzing: ms_deform_attn and matching_cost (+ assign) on random shapes and values,
including NaN / inf, huge coordinates and malformed inputs, either compute or raise; never crash.
The cases run in a subprocess, so a segfault fails this test instead of killing pytest."""

import os
import subprocess
import sys

import pytest
from helpers import ROOT


@pytest.mark.parametrize("seed", [0])
def test_ops_compute_or_raise_never_crash(seed):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, os.path.join(ROOT, "tests", "fuzz_ops.py"), "--seed", str(seed)]
    res = subprocess.run(
        cmd + ["--cases", "300"], env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, f"rc={res.returncode}\n{res.stdout}\n{res.stderr[-3000:]}"
    counts = {}
    for line in res.stdout.splitlines():
        op, what, n = line.split()
        counts.setdefault(op, {})[what] = int(n)
    for op in ("ms_deform_attn", "matching_cost"):
        assert sum(counts[op].values()) == 300
        assert counts[op].get("computed", 0) > 25  # the well-formed cases do compute
        assert sum(v for k, v in counts[op].items() if k != "computed") > 25  # and bad ones raise
