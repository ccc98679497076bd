# Copyright (c) align-detr contributors.
"""Exact resume: a run SIGKILLed after a checkpoint and restarted with --resume ends with the
same weights, EMA and metrics.json loss curve as an uninterrupted run; checkpoints are atomic and
bad checkpoint files give clear errors."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import train_driver
from helpers import ROOT, tiny_cfg

OPTS = [
    "SOLVER.MAX_ITER", "8", "SOLVER.STEPS", "(5,)", "SOLVER.CHECKPOINT_PERIOD", "3",
    "MODEL.ALIGN_DETR.EMA.ENABLED", "True", "MODEL.ALIGN_DETR.EMA.DECAY", "0.9",
]  # fmt: skip


def _curve(out_dir):
    """{iteration: {loss / lr key: value}} from metrics.json (each iteration at most once)."""
    curve = {}
    with open(os.path.join(out_dir, "metrics.json")) as f:
        for line in f:
            row = json.loads(line)
            it = row["iteration"]
            assert it not in curve, f"iteration {it} written twice"
            curve[it] = {k: v for k, v in row.items() if "loss" in k or k == "lr"}
    return curve


def _train(out_dir, data_dir, resume=False):
    args = train_driver.train_args(out_dir, OPTS, resume=resume)
    train_driver.worker(args, data_dir, writer_period=1, threads=1)


def test_sigkill_then_resume_is_exact(tmp_path):
    data_dir = str(tmp_path / "data")
    train_driver.register(data_dir)
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    _train(full, data_dir)

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, os.path.join(ROOT, "tests", "train_driver.py"), killed] + OPTS
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = os.path.join(killed, "model_0000002.pth")
    deadline = time.time() + 120
    while not os.path.exists(first) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert not os.path.exists(os.path.join(killed, "model_final.pth"))  # it died mid-run
    # The kill may come between writing model_0000002.pth and tagging it in last_checkpoint;
    # the resumed run then starts over, which must give the same result too.

    _train(killed, data_dir, resume=True)

    a = torch.load(os.path.join(full, "params_rank0.pth"))
    b = torch.load(os.path.join(killed, "params_rank0.pth"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ema_a = torch.load(os.path.join(full, "model_final.pth"))["ema"]["state"]
    ema_b = torch.load(os.path.join(killed, "model_final.pth"))["ema"]["state"]
    for k in ema_a:
        assert torch.equal(ema_a[k], ema_b[k]), k
    assert any(not torch.equal(ema_a[k], a[k]) for k in a)  # the EMA is not the weights

    curve_a, curve_b = _curve(full), _curve(killed)
    assert sorted(curve_a) == list(range(8))
    assert curve_a == curve_b


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    from align_detr.engine.checkpoint import AtomicCheckpointer

    model = torch.nn.Linear(2, 2)
    ckpt = AtomicCheckpointer(model, str(tmp_path))
    ckpt.save("model_0000001")
    before = (tmp_path / "model_0000001.pth").read_bytes()

    def dies_mid_write(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise KeyboardInterrupt  # stands in for a kill during the write

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save("model_0000001")
    monkeypatch.undo()
    assert (tmp_path / "model_0000001.pth").read_bytes() == before
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]


def test_bad_checkpoint_files_give_clear_errors(tmp_path):
    from align_detr.engine.checkpoint import AtomicCheckpointer, CheckpointLoadError

    model = torch.nn.Linear(2, 2)
    ckpt = AtomicCheckpointer(model, str(tmp_path))
    ckpt.save("good")
    data = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointLoadError, match="truncated.pth: it is truncated, corrupt"):
        ckpt.load(str(tmp_path / "truncated.pth"))
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointLoadError, match="text.pth"):
        ckpt.load(str(tmp_path / "text.pth"))
    torch.save({"model": {"other.weight": torch.zeros(3)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointLoadError, match="holds no weight of this model"):
        ckpt.load(str(tmp_path / "other.pth"))
    ckpt.load(str(tmp_path / "good.pth"))  # the good one still loads


def test_train_net_rejects_truncated_weights(tmp_path):
    data_dir = str(tmp_path / "data")
    train_driver.register(data_dir)
    bad = tmp_path / "model.pth"
    bad.write_bytes(b"PK\x03\x04 truncated zip")
    args = train_driver.train_args(str(tmp_path / "out"), ["MODEL.WEIGHTS", str(bad)])
    import train_net

    with pytest.raises(RuntimeError, match="Cannot read checkpoint .*model.pth"):
        train_net.main(args)


def _toy_mapper(d):
    # Random draws of all three kinds, as augmentations make them.
    import random

    import numpy as np

    return {"id": d["image_id"], "np": float(np.random.rand()), "py": random.random(),
            "torch": float(torch.rand(1))}  # fmt: skip


def _batches(loader, n):
    it = iter(loader)
    return [[(x["id"], x["np"], x["py"], x["torch"]) for x in next(it)] for _ in range(n)]


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_stream_is_a_function_of_position(workers):
    from align_detr.data import build_resumable_train_loader

    # Two aspect-ratio buckets (wide / tall), so the batches are not just consecutive images.
    dataset = [{"file_name": f"{i}.png", "image_id": i, "height": 20, "width": 10 + 20 * (i % 3 == 0)}
               for i in range(7)]  # fmt: skip
    cfg = tiny_cfg("SEED", "3", "DATALOADER.NUM_WORKERS", "0")
    loader, sampler = build_resumable_train_loader(cfg, _toy_mapper, dataset=dataset)
    state = torch.get_rng_state()
    full = _batches(loader, 10)
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG is untouched
    assert all(len({x[0] for x in b}) == 2 for b in full)
    assert {x[0] for b in full for x in b} == set(range(7))  # epochs go on over the whole set

    cfg = tiny_cfg("SEED", "3", "DATALOADER.NUM_WORKERS", str(workers))
    loader, sampler = build_resumable_train_loader(cfg, _toy_mapper, dataset=dataset)
    sampler.set_start(4)
    assert _batches(loader, 6) == full[4:]  # same images, same augmentation draws
