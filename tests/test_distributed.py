# Copyright (c) align-detr contributors.
"""Multi-process training through detectron2's ``launch`` on CPU (gloo): two processes with one
image each end with identical weights on both ranks, equal to one process with both images."""

import os
import subprocess
import sys

import torch
import train_driver
from helpers import ROOT

# DN off: its noise is drawn per process, so it differs between 1 and 2 processes by design.
# Plain SGD without clipping: unlike AdamW, its step scales with the loss, so a wrong loss
# normaliser across processes would show. One training size, so no image is padded differently in a batch of 2 than alone.
OPTS = [
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "3", "SOLVER.STEPS", "(2,)",
    "MODEL.ALIGN_DETR.DN.ENABLED", "False", "INPUT.MIN_SIZE_TRAIN", "(128,)",
    "SOLVER.OPTIMIZER", "SGD", "SOLVER.BASE_LR", "0.01", "SOLVER.CLIP_GRADIENTS.ENABLED", "False",
]  # fmt: skip


def test_two_processes_match_one(tmp_path):
    data_dir = str(tmp_path / "data")
    train_driver.register(data_dir)
    two, one = str(tmp_path / "two"), str(tmp_path / "one")

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on CPU even where a GPU exists
    cmd = [sys.executable, os.path.join(ROOT, "tests", "train_driver.py"), "--num-gpus", "2", two]
    res = subprocess.run(cmd + OPTS, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]

    args = train_driver.train_args(one, OPTS)
    train_driver.worker(args, data_dir, writer_period=1, threads=1)

    r0 = torch.load(os.path.join(two, "params_rank0.pth"))
    r1 = torch.load(os.path.join(two, "params_rank1.pth"))
    single = torch.load(os.path.join(one, "params_rank0.pth"))
    init = torch.load(os.path.join(one, "params_init.pth"))
    assert r0.keys() == single.keys()
    moved = 0.0
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"{k} differs between the ranks"
        # Equal to one process up to float reduction order: within 2% of the tensor's update.
        update = (single[k].float() - init[k].float()).abs().max().item()
        diff = (r0[k].float() - single[k].float()).abs().max().item()
        assert diff <= 0.02 * update + 1e-7, (k, diff, update)
        moved = max(moved, update)
    assert moved > 1e-3  # training did move the weights
