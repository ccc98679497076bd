# Copyright (c) align-detr contributors.
"""The DETR optimizer and schedule, the YAML configs, and train_net.py's input checks."""

import glob
import json
import os

import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.engine import default_argument_parser
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_backbone
from helpers import ROOT, register_coco, repo_cfg, unregister
from torch import nn

import train_net
from align_detr.config import resolve_match_k
from align_detr.engine import Trainer
from align_detr.modeling import BASE_REGISTRY

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def _cfg(config="Base-AlignDETR.yaml"):
    return repo_cfg(config)


def _match_k(cfg):
    """MATCH_K resolved to one k per matched output of the config's base."""
    base = BASE_REGISTRY.get(cfg.MODEL.ALIGN_DETR.BASE)
    return resolve_match_k(cfg.MODEL.ALIGN_DETR.LOSS.MATCH_K, base.num_matched_outputs(cfg))


class ToyDetr(nn.Module):
    """The parameter kinds the optimizer treats differently, with DETR-like names."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), FrozenBatchNorm2d(4), nn.Conv2d(4, 4, 1)
        )
        self.backbone[3].requires_grad_(False)  # frozen stage: not optimised at all
        self.neck_norm = nn.GroupNorm(2, 4)
        self.level_embed = nn.Parameter(torch.zeros(4, 4))
        self.tgt_embed = nn.Embedding(5, 4)
        self.class_embed = nn.Linear(4, 3)  # a head: weight decay despite its name
        self.norm = nn.LayerNorm(4)


def _hyperparams(optimizer):
    return {
        id(p): (group["lr"], group["weight_decay"])
        for group in optimizer.param_groups
        for p in group["params"]
    }


def test_embeddings_are_decayed_by_default_as_in_the_released_recipe():
    cfg, model = _cfg(), ToyDetr()
    hp = _hyperparams(Trainer.build_optimizer(cfg, model))
    for p in (model.level_embed, model.tgt_embed.weight, model.class_embed.weight):
        assert hp[id(p)] == pytest.approx((1e-4, 1e-4))
    assert hp[id(model.norm.bias)] == pytest.approx((1e-4, 0.0))


def test_optimizer_param_groups():
    cfg, model = _cfg(), ToyDetr()
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    optimizer = Trainer.build_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.AdamW)
    hp = _hyperparams(optimizer)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(hp)  # no duplicates

    lr, wd = 1e-4, 1e-4
    expected = {
        model.backbone[0].weight: (lr * 0.1, wd),
        model.backbone[0].bias: (lr * 0.1, wd),
        model.backbone[1].weight: (lr * 0.1, 0.0),
        model.backbone[1].bias: (lr * 0.1, 0.0),
        model.neck_norm.weight: (lr, 0.0),
        model.norm.bias: (lr, 0.0),
        model.level_embed: (lr, 0.0),
        model.tgt_embed.weight: (lr, 0.0),
        model.class_embed.weight: (lr, wd),
        model.class_embed.bias: (lr, wd),
    }
    for p, (p_lr, p_wd) in expected.items():
        assert hp[id(p)] == pytest.approx((p_lr, p_wd))
    for p in model.backbone[3].parameters():
        assert id(p) not in hp
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(hp) == trainable


def test_full_model_gradient_clipping():
    cfg, model = _cfg(), ToyDetr()
    optimizer = Trainer.build_optimizer(cfg, model)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.full_like(p, 10.0)
    optimizer.step()
    # clip_grad_norm_ scales the gradients in place: their joint L2 norm is now CLIP_VALUE.
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    assert total.item() == pytest.approx(0.1, rel=1e-4)

    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = False
    assert type(Trainer.build_optimizer(cfg, model)) is torch.optim.AdamW

    # Per-parameter clipping stays detectron2's.
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "value"
    optimizer = Trainer.build_optimizer(cfg, model)
    for p in params:
        p.grad = torch.full_like(p, 10.0)
    optimizer.step()
    assert all(p.grad.abs().max().item() == pytest.approx(0.1) for p in params)


def test_optimizer_choice():
    cfg, model = _cfg(), ToyDetr()
    cfg.SOLVER.OPTIMIZER = "SGD"
    assert isinstance(Trainer.build_optimizer(cfg, model), torch.optim.SGD)
    cfg.SOLVER.OPTIMIZER = "LAMB"
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER 'LAMB'"):
        Trainer.build_optimizer(cfg, model)


def test_lr_schedule_no_warmup_multistep():
    cfg, model = _cfg(), ToyDetr()
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS = 10, (8,)
    optimizer = Trainer.build_optimizer(cfg, model)
    scheduler = Trainer.build_lr_scheduler(cfg, optimizer)
    lrs = []
    for _ in range(10):
        lrs.append(sorted({g["lr"] for g in optimizer.param_groups}))
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx([1e-5, 1e-4])  # full lr from the first iteration
    assert lrs[7] == pytest.approx([1e-5, 1e-4]) and lrs[8] == pytest.approx([1e-6, 1e-5])


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_configs_merge(path):
    # load_config raises on any key add_align_detr_config does not define, and validates.
    cfg = _cfg(os.path.basename(path))
    a = cfg.MODEL.ALIGN_DETR
    assert cfg.MODEL.META_ARCHITECTURE == "AlignDETR"
    # DINO, H-Deformable-DETR: the encoder proposals + every decoder layer; Conditional DETR:
    # every decoder layer (+ the mini-detector with SD-DETR's task-aware queries)
    two_stage = a.BASE in ("DINO", "HDeformableDETR")
    extra = 1 if two_stage or a.DECODER.TASK_AWARE_QUERIES else 0
    assert len(_match_k(cfg)) == a.DECODER.NUM_LAYERS + extra
    assert cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE == "full_model" and cfg.SOLVER.WARMUP_ITERS == 0


def test_dino_r50_recipe():
    cfg = _cfg("dino_r50.yaml")
    assert (cfg.DATASETS.TRAIN, cfg.DATASETS.TEST) == (("coco_2017_train",), ("coco_2017_val",))
    s = cfg.SOLVER
    assert (s.IMS_PER_BATCH, s.MAX_ITER, s.STEPS, s.CHECKPOINT_PERIOD) == (
        16,
        90000,
        (82500,),
        10000,
    )
    assert (s.BASE_LR, s.WEIGHT_DECAY, s.BACKBONE_MULTIPLIER, s.OPTIMIZER) == (
        1e-4,
        1e-4,
        0.1,
        "ADAMW",
    )
    assert cfg.TEST.EVAL_PERIOD == 5000 and cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
    assert cfg.MODEL.WEIGHTS == "detectron2://ImageNetPretrained/torchvision/R-50.pkl"
    assert cfg.INPUT.MIN_SIZE_TRAIN == tuple(range(480, 801, 32)) and cfg.INPUT.FORMAT == "RGB"
    assert cfg.MODEL.ALIGN_DETR.LOSS.TYPE == "focal" and _match_k(cfg) == [1] * 7


def test_tiny_config_builds_its_backbone():
    cfg = _cfg("tiny_test.yaml")
    assert cfg.MODEL.DEVICE == "cpu" and cfg.MODEL.WEIGHTS == ""
    assert cfg.DATASETS.TRAIN == () and cfg.DATALOADER.NUM_WORKERS == 0
    shapes = build_backbone(cfg).output_shape()
    assert [(k, v.stride) for k, v in sorted(shapes.items())] == [
        ("res3", 8), ("res4", 16), ("res5", 32)
    ]  # fmt: skip


def test_train_net_setup(tmp_path):
    args = default_argument_parser().parse_args(
        ["--config-file", os.path.join(ROOT, "configs", "tiny_test.yaml"),
         "OUTPUT_DIR", str(tmp_path), "SOLVER.MAX_ITER", "2"]
    )  # fmt: skip
    cfg = train_net.setup(args)
    assert cfg.is_frozen() and cfg.SOLVER.MAX_ITER == 2 and cfg.MODEL.ALIGN_DETR.D_MODEL == 32
    assert os.path.isfile(tmp_path / "config.yaml")


@pytest.fixture
def registered(tmp_path):
    """Registers a COCO-format dataset whose files exist, and one whose files do not."""
    json_file, image_root = tmp_path / "ok.json", tmp_path / "images"
    json_file.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    image_root.mkdir()
    names = {"ok": "_test_ok", "missing": "_test_missing"}
    register_coco(names["ok"], str(json_file), str(image_root))
    register_coco(names["missing"], str(tmp_path / "nope.json"), str(tmp_path / "no_images"))
    yield names
    for name in names.values():
        unregister(name)


def _check_cfg(train=(), test=(), weights=""):
    cfg = _cfg("tiny_test.yaml")
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST, cfg.MODEL.WEIGHTS = train, test, weights
    return cfg


def test_check_inputs_passes(registered, tmp_path):
    check = train_net.check_inputs
    check(_check_cfg(train=(registered["ok"],), test=(registered["ok"],)))
    # URLs are the checkpointer's business; only the training set can be missing at eval time.
    check(_check_cfg(test=(registered["ok"],), weights="detectron2://x/R-50.pkl"))
    check(_check_cfg(train=(registered["missing"],)), eval_only=True)
    # --resume with a checkpoint in OUTPUT_DIR ignores MODEL.WEIGHTS.
    cfg = _check_cfg(weights=str(tmp_path / "absent.pth"))
    cfg.OUTPUT_DIR = str(tmp_path)
    (tmp_path / "last_checkpoint").write_text("model_final.pth")
    check(cfg, resume=True)


def test_check_inputs_messages(registered, tmp_path):
    check = train_net.check_inputs
    with pytest.raises(FileNotFoundError) as e:
        check(_check_cfg(train=("no_such_set",), test=(registered["missing"],)))
    msg = str(e.value)
    assert "'no_such_set' (DATASETS.TRAIN) is not registered" in msg
    assert f"annotation file not found: {tmp_path / 'nope.json'}" in msg
    assert f"image folder not found: {tmp_path / 'no_images'}" in msg
    assert "DATASETS.TRAIN_JSON" in msg and "DETECTRON2_DATASETS" in msg

    weights = tmp_path / "model.pth"
    with pytest.raises(FileNotFoundError, match=f"MODEL.WEIGHTS file not found: {weights}"):
        check(_check_cfg(weights=str(weights)))

    if not torch.cuda.is_available():
        cfg = _check_cfg()
        cfg.MODEL.DEVICE = "cuda"
        with pytest.raises(FileNotFoundError, match="MODEL.DEVICE cpu"):
            check(cfg)


def test_check_inputs_builtin_coco():
    val_json = MetadataCatalog.get("coco_2017_val").json_file
    if os.path.exists(val_json):
        pytest.skip("COCO is present on this machine")
    with pytest.raises(FileNotFoundError) as e:
        train_net.check_inputs(_cfg("dino_r50.yaml"), eval_only=True)
    assert "'coco_2017_val' (DATASETS.TEST): annotation file not found: " in str(e.value)
    assert os.path.abspath(val_json) in str(e.value) and "cocodataset.org" in str(e.value)


def test_amp_on_cpu_trains_in_bfloat16_with_fp32_weights_and_losses(tmp_path):
    import train_driver

    data_dir = str(tmp_path / "data")
    train_driver.register(data_dir)
    args = train_driver.train_args(
        str(tmp_path / "out"), ["SOLVER.AMP.ENABLED", "True", "SOLVER.MAX_ITER", "2"]
    )
    cfg = train_net.setup(args)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    seen = {}
    model = trainer.model

    def record_ffn(module, inputs, output):
        seen.setdefault("ffn", output.dtype)

    model.transformer.decoder.layers[0].cross.ffn.linear1.register_forward_hook(record_ffn)
    forward = model.criterion.forward

    def criterion(outputs, targets):
        seen.setdefault("logits", outputs["layers"][-1]["pred_logits"].dtype)
        return forward(outputs, targets)

    model.criterion.forward = criterion
    trainer.train()
    assert seen == {"ffn": torch.bfloat16, "logits": torch.float32}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))
