# Copyright (c) align-detr contributors.
"""EMA of the weights: the update rule, evaluation on the EMA weights (during training, with
--eval-only and in the Predictor behind the demo), and the EMA in checkpoints. Restoring it on resume is in test_resume.py."""

import os

import pytest
import torch
import train_driver
from torch import nn

import train_net
from align_detr.config import load_config
from align_detr.engine import Predictor, Trainer
from align_detr.engine.hooks import ModelEMA


def test_ema_update_rule_and_swap():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.75)
    w0 = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(4.0)
    model[1].num_batches_tracked += 3
    ema.update(model)
    torch.testing.assert_close(ema.state["0.weight"], w0 + 1.0)  # 0.75 * w0 + 0.25 * (w0 + 4)
    assert ema.state["1.num_batches_tracked"].item() == 3  # integer buffers are copied
    own = model[0].weight.detach().clone()
    with ema.applied_to(model):
        torch.testing.assert_close(model[0].weight, w0 + 1.0)
    assert torch.equal(model[0].weight, own)  # the model's own weights are back

    restored = ModelEMA(model, decay=0.75)
    restored.load_state_dict(ema.state_dict())
    assert restored.loaded and restored.updates == 1
    torch.testing.assert_close(restored.state["0.weight"], w0 + 1.0)
    with pytest.raises(ValueError, match="decay"):
        ModelEMA(model, decay=1.0)


def test_training_evaluates_and_saves_the_ema(tmp_path, monkeypatch):
    data_dir = str(tmp_path / "data")
    name = train_driver.register(data_dir)
    seen = []

    def fake_test(cls, cfg, model, evaluators=None):
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return {}

    monkeypatch.setattr(Trainer, "test", classmethod(fake_test))
    out = str(tmp_path / "out")
    opts = ["MODEL.ALIGN_DETR.EMA.ENABLED", "True", "MODEL.ALIGN_DETR.EMA.DECAY", "0.5",
            "DATASETS.TEST", f"('{name}',)", "SOLVER.MAX_ITER", "3", "SOLVER.STEPS", "(2,)", "TEST.EVAL_PERIOD", "3"]  # fmt: skip
    train_driver.worker(train_driver.train_args(out, opts), data_dir, writer_period=20, threads=1)

    ckpt = torch.load(os.path.join(out, "model_final.pth"), weights_only=False)
    ema, weights = ckpt["ema"]["state"], ckpt["model"]
    assert ckpt["ema"]["updates"] == 3
    assert len(seen) == 1  # the final evaluation, on the EMA weights
    differs = [k for k in weights if not torch.equal(ema[k], weights[k].float())]
    assert differs  # the average lags the weights
    for k in weights:
        torch.testing.assert_close(seen[0][k].float(), ema[k])

    args = train_driver.train_args(
        out, opts + ["MODEL.WEIGHTS", os.path.join(out, "model_final.pth")]
    )
    args.eval_only = True
    seen.clear()
    train_net.main(args)
    for k in weights:
        torch.testing.assert_close(seen[0][k].float(), ema[k])

    predictor = Predictor(load_config(args.config_file, args.opts))  # the demo's weights too
    state = predictor.model.state_dict()
    for k in weights:
        torch.testing.assert_close(state[k].float(), ema[k])
