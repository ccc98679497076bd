# Copyright (c) align-detr contributors.
"""Op fuzzing: ms_deform_attn and matching_cost (+ assign) on random shapes and values,
including NaN / inf, huge coordinates and malformed inputs, either compute or raise; never crash.
The cases run in a subprocess, so a segfault fails this test instead of killing pytest. The CUDA
variant (skipped without a GPU) also mixes host / device level tables, deterministic backward
passes and the matcher's deferred error path."""

import os
import subprocess
import sys

import pytest
import torch
from helpers import ROOT

from align_detr import _ext

HAS_CUDA = torch.cuda.is_available() and _ext.has_cuda_kernels()


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(
                not HAS_CUDA, reason="needs a CUDA GPU and align_detr._C built with CUDA"
            ),
        ),
    ],
)
@pytest.mark.parametrize("seed", [0])
def test_ops_compute_or_raise_never_crash(seed, device):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, os.path.join(ROOT, "tests", "fuzz_ops.py"), "--seed", str(seed)]
    res = subprocess.run(
        cmd + ["--cases", "300", "--device", device],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
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
