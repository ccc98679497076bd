#!/usr/bin/env python
# Copyright (c) align-detr contributors.
r"""Runs official detrex-based DETR models on the CPU and saves small golden fixtures.

The official code is never copied into this project: it is imported at run time from the
checkouts given on the command line (FelixCaae/AlignDETR for ``projects/aligndetr`` and the
``aligndetr`` criterion package; IDEA-Research/detrex for ``detrex`` and its ``projects/``). The
tool builds the model from its own lazy config, shrunk to a small size, with random weights:

- ``--model aligndetr``: Align-DETR, ``projects/aligndetr/configs/aligndetr_k=2_r50_4scale_12ep.py``
  (DINO-4scale with the Align loss and many-to-one matching);
- ``--model dino``: detrex ``projects/dino/configs/dino-resnet/dino_r50_4scale_12ep.py`` (the same
  network, focal loss);
- ``--model h_deformable_detr``: detrex ``projects/h_deformable_detr/configs/
  h_deformable_detr_r50_two_stage_12ep.py`` (two-stage Deformable DETR with box refinement, mixed
  query selection and the hybrid one-to-many branch; 300 + 1500 queries scaled to 30 + 150);
- ``--model conditional_detr``: detrex ``projects/conditional_detr/configs/
  conditional_detr_r50_50ep.py`` (single-scale res5, conditional cross-attention).

It runs the model on two real tree-crown images of different sizes and saves, in one
``torch.save`` file (plain dicts, lists and tensors; ``torch.load(weights_only=True)`` reads it):

- ``checkpoint``: ``{"model": state_dict}`` with their parameter names, as their checkpoints have
  them (including duplicate aliases such as ``transformer.decoder.class_embed`` / ``bbox_embed``);
- ``arch``: a plain dict of the architecture (see ``arch_for``) to build the same model from our
  yacs config;
- ``inputs``: the ``batched_inputs`` (uint8 CHW RGB images, height/width, GT instances as
  tensors) and (Align-DETR only; every model preprocesses alike) the normalised per-image tensors
  their model computes from them;
- ``inference``: their top-k scores / labels / boxes (before and after ``detector_postprocess``)
  for each image alone (batch 1) and for both images batched, and per-query logits / boxes of
  every decoder layer;
- ``train``: their training loss dict (denoising off, dropout 0) on the two-image batch, weighted
  as their model returns it and unweighted as their criterion computes it, the total, and the
  criterion's inputs;
- ``selection`` / ``checks`` (two-stage models): how many of the two-stage picks are invalid
  tokens (padding or proposals outside (0.01, 0.99)) and the margins that keep comparisons stable.

The weights are perturbed so that the fixture discriminates: every transformer / head parameter
gets noise (per-layer heads, which start as identical copies, become different; zero-initialised
box-head outputs, sampling offsets and attention weights become non-zero), the FrozenBN statistics
are random, and for the two-stage models the encoder's class head is shifted along the feature
that invalid tokens all share (their memory is zeroed, so ``enc_output_norm(enc_output(0))``) so
that their unmasked two-stage top-k picks some invalid tokens next to valid ones. Seeds are drawn
until the encoder scores around every selected rank are separated by at least ``--min-enc-gap``
(logits), the kept final scores by at least ``--min-score-gap`` (probabilities), the loss does not
change when the matching costs get 1e-5 noise and, for Align-DETR, the quality t of two positives
of a GT (which sets their rank weights) differs by at least ``--min-quality-gap`` unless both sit
at its 0.01 floor (IoU 0; such ties go to the lower query index, see ``quality_ties``).

Running their code on a CPU needs a few run-time patches (their files are not edited):

- ``detrex._C`` (the compiled CUDA op) is replaced by an empty module when it is not built, so
  that detrex keeps ``MultiScaleDeformableAttention`` and takes its pure-PyTorch path
  (``multi_scale_deformable_attn_pytorch``) on CPU tensors;
- ``detrex.config.get_config`` reads ``<detrex-src>/configs`` (an installed detrex links it as
  ``detrex/config/configs``);
- ``Tensor.to("cuda")`` / ``Tensor.cuda()`` are redirected to the CPU while their model runs (the
  DINO / Align-DETR criteria build their zero denoising terms with ``.to("cuda")``);
- sine embeddings of boxes / points with a hard-coded 128 features per coordinate (DINO's and
  Conditional DETR's ``get_sine_pos_embed`` calls, H-DETR's ``get_proposal_pos_embed``) only fit
  d_model 256; for a smaller d_model the tool passes d_model / 2 (a no-op at 256).

Environment: their code imports timm, fairscale, einops and wandb at import time; install them in
a separate virtual environment that also sees this project's torch and detectron2, e.g.::

    python3.11 -m venv /work/official-venv
    echo "$PWD/.venv/lib/python3.11/site-packages" \
        > /work/official-venv/lib/python3.11/site-packages/main_venv.pth
    /work/official-venv/bin/pip install timm fairscale einops wandb

Regenerate the committed fixtures (deterministic: one CPU thread, fixed seeds; up to a minute or
two each; the seed search stops at the first seed that passes the checks)::

    git --git-dir=<mirror of FelixCaae/AlignDETR> archive --prefix=AlignDETR/ \
        4b125f7fe2ff8c3468cd71763fcf971d09ee38db | tar x -C /work/official
    git --git-dir=<mirror of IDEA-Research/detrex> archive --prefix=detrex/ \
        e244e6c3da3e84566728c52c21fb061d23ce0e2f | tar x -C /work/official
    for m in aligndetr dino h_deformable_detr conditional_detr; do
        /work/official-venv/bin/python tools/make_equivalence_fixture.py --model $m \
            --official-src /work/official/AlignDETR --detrex-src /work/official/detrex \
            --official-commit 4b125f7fe2ff8c3468cd71763fcf971d09ee38db \
            --detrex-commit e244e6c3da3e84566728c52c21fb061d23ce0e2f \
            --out tests/data/golden_$m.pt --debug-out /work/golden_debug/${m}_debug.pt
    done

Full size, once (``--full-size``, Align-DETR only; about 1 minute on one CPU thread, 208 MB, not
committed): the full R50 configuration of ``configs/align_r50.yaml`` (``FULL_SIZE``: d_model 256,
8 heads, 6 + 6 layers, FFN 2048, 900 queries, 80 classes, top-300, ``match_num [2,2,2,2,2,2,1]``,
standard detectron2 R50) on two larger windows (``IMAGES_FULL_SIZE``: 900 queries need 900
encoder tokens per image), perturbed as above. With 900 encoder picks and 900 x 80 final scores
no seed keeps the margins, so only the first seed is built and its margins are recorded in
``checks`` (``margins_enforced`` False), not enforced; the encoder-head shift is still chosen by
balance, then the largest gap. ``--checkpoint-out`` also writes their state dict alone as a
zoo-style ``{"model": state_dict}`` file::

    /work/official-venv/bin/python tools/make_equivalence_fixture.py --model aligndetr \
        --full-size --official-src /work/official/AlignDETR --detrex-src /work/official/detrex \
        --official-commit 4b125f7fe2ff8c3468cd71763fcf971d09ee38db \
        --detrex-commit e244e6c3da3e84566728c52c21fb061d23ce0e2f \
        --out /work/golden_debug/full_aligndetr.pt \
        --checkpoint-out /work/golden_debug/aligndetr_r50_random_official.pth
    python tools/check_equivalence.py /work/golden_debug/full_aligndetr.pt

(``--official-commit`` / ``--detrex-commit`` are only recorded in the fixture; with git work trees
they are read from them. ``--official-src`` is only needed for ``aligndetr``.) The images come from
the DeepForest sample data (``pip install --no-deps deepforest==2.1.0``; see
``tools/prepare_trees.py``); the fixtures hold them, so the tests need neither deepforest nor the
official code. ``--debug-out`` (optional, several MB) saves intermediate tensors for each run:
backbone and neck features, level masks and position embeddings, encoder memory, proposals
(``output_memory`` / ``output_proposals``), the selected tokens, per-decoder-layer query_pos /
reference inputs / outputs / logits / boxes, the criterion's inputs, matcher indices, IA-BCE rank
weights, every loss term, and their optimizer's per-parameter lr / weight decay.
"""

import argparse
import contextlib
import copy
import functools
import hashlib
import importlib.util
import io
import os
import subprocess
import sys
import types
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch

TOOLS_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TOOLS_DIR)

from prepare_trees import clip_box, find_deepforest_data, read_voc  # noqa: E402

FORMAT_VERSION = 1

#: The official models the tool builds: the checkout holding their lazy config (``src``), the
#: config, the family (how the network is put together), the criterion kind, the module whose
#: ``get_sine_pos_embed`` is called with 128 features per coordinate, the first seed tried and
#: the growth of the box heads' w / h outputs (see randomize_).
MODELS = {
    "aligndetr": {
        "src": "official",
        "repo": "FelixCaae/AlignDETR",
        "config": "projects/aligndetr/configs/aligndetr_k=2_r50_4scale_12ep.py",
        "family": "dino",
        "criterion": "align",
        "sine_module": "projects.aligndetr.modeling.transformer",
        "seed": 0,
        # the normalised input tensors (0.55 MB) are stored once, here: every model preprocesses
        # the same way ((image - pixel_mean) / pixel_std, zero padding)
        "store_normalized_inputs": True,
    },
    "dino": {
        "src": "detrex",
        "repo": "IDEA-Research/detrex",
        "config": "projects/dino/configs/dino-resnet/dino_r50_4scale_12ep.py",
        "family": "dino",
        "criterion": "focal",
        "sine_module": "projects.dino.modeling.dino_transformer",
        # the seed search starts elsewhere than Align-DETR's: same network, other weights
        "seed": 100,
    },
    "h_deformable_detr": {
        "src": "detrex",
        "repo": "IDEA-Research/detrex",
        "config": "projects/h_deformable_detr/configs/h_deformable_detr_r50_two_stage_12ep.py",
        "family": "hdetr",
        "criterion": "hybrid",
        "sine_module": None,  # its proposal embedding is a method, patched on the instance
        "seed": 200,
    },
    "conditional_detr": {
        "src": "detrex",
        "repo": "IDEA-Research/detrex",
        "config": "projects/conditional_detr/configs/conditional_detr_r50_50ep.py",
        "family": "conditional",
        "criterion": "focal",
        "sine_module": "projects.conditional_detr.modeling.conditional_transformer",
        "seed": 300,
    },
}

#: Families whose transformer selects its queries from the encoder (two-stage).
TWO_STAGE = ("dino", "hdetr")

#: The small architecture shared by the models (keys follow our yacs config where one exists);
#: arch_for() adds what is specific to one model.
ARCH = {
    "d_model": 32,
    "nheads": 2,
    "num_feature_levels": 4,
    "enc_layers": 2,
    "dec_layers": 2,
    # fixed to 4 inside their deformable encoder / decoder classes (not a config option)
    "enc_n_points": 4,
    "dec_n_points": 4,
    "enc_ffn_dim": 64,
    "dec_ffn_dim": 64,
    "dropout": 0.0,
    "num_queries": 30,
    "num_classes": 4,
    # their select_box_nums_for_evaluation (official 300 with 900 / 300 queries x 80 classes)
    "num_select": 100,
    "in_features": ["res3", "res4", "res5"],
    "resnet": {
        "depth": 50,
        # stem != res2 channels so that res2.0 has a shortcut conv, as in R50
        "stem_out_channels": 8,
        "res2_out_channels": 16,
        "num_groups": 1,
        "width_per_group": 4,
        "stride_in_1x1": False,
        "res5_dilation": 1,
        "norm": "FrozenBN",
        "freeze_at": 1,
        "out_features": ["res3", "res4", "res5"],
    },
    "pixel_mean": [123.675, 116.280, 103.530],
    "pixel_std": [58.395, 57.120, 57.375],
    "input_format": "RGB",
    # added to the w / h outputs of every box head (inverse-sigmoid space) by randomize_, so that
    # matched predictions overlap their GT
    "box_logit_growth": 2.0,
}


#: ``--full-size`` (Align-DETR only): the full R50 configuration of configs/align_r50.yaml and
#: of their 12-epoch config, replacing the small values of ARCH: d_model 256, 8 heads, 6 + 6
#: layers, FFN 2048, 900 queries, 80 classes, top-300 at inference, standard detectron2 R50
#: (stem 64, res2 256, width 64).
FULL_SIZE = {
    "d_model": 256,
    "nheads": 8,
    "enc_layers": 6,
    "dec_layers": 6,
    "enc_ffn_dim": 2048,
    "dec_ffn_dim": 2048,
    "num_queries": 900,
    "num_classes": 80,
    "num_select": 300,
    "resnet": {"stem_out_channels": 64, "res2_out_channels": 256, "width_per_group": 64},
}


def arch_for(model: str, full_size: bool = False) -> Dict:
    """The small architecture of ``model`` (a fresh dict); ``full_size``: the full R50 one."""
    arch = copy.deepcopy(ARCH)
    if full_size:
        if MODELS[model]["criterion"] != "align":
            raise ValueError("--full-size is only implemented for --model aligndetr")
        full = copy.deepcopy(FULL_SIZE)
        arch["resnet"].update(full.pop("resnet"))
        arch.update(full)
        arch["full_size"] = True
    arch["model"] = model
    family = MODELS[model]["family"]
    if family == "hdetr":
        # official 300 one-to-one + 1500 one-to-many queries (x6 repeated GT), scaled down
        arch.update(
            {
                "num_queries_one2one": arch["num_queries"],
                "num_queries_one2many": 5 * arch["num_queries"],
                "k_one2many": 6,
                "lambda_one2many": 1.0,
                "mixed_selection": True,
                "with_box_refine": True,
                "as_two_stage": True,
            }
        )
    elif family == "conditional":
        arch.update(
            {
                "num_feature_levels": 1,
                "in_features": ["res5"],
                "enc_n_points": None,
                "dec_n_points": None,
                # their config asks the backbone for res2..res5 and uses res5 only
                "resnet": dict(arch["resnet"], out_features=["res2", "res3", "res4", "res5"]),
                # boxes are sigmoid(MLP) around a point reference: already ~0.5 wide at init
                "box_logit_growth": 0.0,
            }
        )
    return arch


#: DeepForest sample images and the windows (x0, y0, x1, y1) cut from them; an optional resize
#: (w, h) plays the part of the test-time resize, so height/width differ from the input size.
IMAGES = (
    {
        "stem": "2019_YELL_2_541000_4977000_image_crop",
        "window": (480, 820, 1000, 920),
        "resize": (416, 80),
    },
    {"stem": "OSBS_029", "window": (104, 0, 232, 96), "resize": None},
)

#: ``--full-size``: larger windows, since 900 queries need at least 900 encoder tokens per image
#: (their two-stage top-k); image 0 is resized to 432 px wide (level 0 is 54 tokens wide, so its
#: first and last columns are invalid tokens, as in IMAGES), image 1 has no invalid token alone.
#: Tokens over the 4 levels: 2246 (image 0, 248 x 432) and 1700 (image 1, 256 x 320).
IMAGES_FULL_SIZE = (
    {
        "stem": "2019_YELL_2_541000_4977000_image_crop",
        "window": (480, 720, 1000, 1020),
        "resize": (432, 248),
    },
    {"stem": "OSBS_029", "window": (40, 40, 360, 296), "resize": None},
)


# ---- importing their code -------------------------------------------------------------------


def setup_official_imports(official_src: Optional[str], detrex_src: Optional[str]) -> Dict:
    """Puts the official checkouts on sys.path and applies the import-time stand-ins.

    Returns:
        dict describing what was patched (saved in the fixture).
    """
    patches = {}
    for path in (detrex_src, official_src):  # official first on sys.path
        if path:
            sys.path.insert(0, os.path.abspath(path))
    warnings.filterwarnings("ignore")
    # Checked without importing detrex: importing it without _C swaps in the dummy class.
    spec = importlib.util.find_spec("detrex")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("detrex is not importable: pass --detrex-src")
    pkg_dir = list(spec.submodule_search_locations)[0]
    if any(f.startswith("_C") for f in os.listdir(pkg_dir)):
        patches["detrex._C"] = "compiled op found (not used on CPU tensors)"
    else:
        sys.modules["detrex._C"] = types.ModuleType("detrex._C")
        patches["detrex._C"] = "empty stand-in module (pure-PyTorch deformable attention)"
    import detrex
    import detrex.config
    from detectron2.config import LazyConfig
    from detrex.layers import MultiScaleDeformableAttention

    if "_Dummy" in MultiScaleDeformableAttention.__name__:
        raise RuntimeError("detrex replaced MultiScaleDeformableAttention by its dummy class")
    root = detrex_src or os.path.dirname(os.path.dirname(detrex.__file__))
    configs = os.path.join(root, "configs")
    installed = os.path.join(os.path.dirname(detrex.config.__file__), "configs")
    if not os.path.isdir(installed):
        if not os.path.isdir(configs):
            raise FileNotFoundError(f"detrex configs not found at {installed} or {configs}")
        detrex.config.get_config = lambda path: LazyConfig.load(os.path.join(configs, path))
        patches["detrex.config.get_config"] = "reads <detrex-src>/configs"
    return patches


@contextlib.contextmanager
def cuda_to_cpu():
    """Redirects ``Tensor.to("cuda")`` / ``Tensor.cuda()`` to the CPU (their DN-off loss terms)."""
    orig_to, orig_cuda = torch.Tensor.to, torch.Tensor.cuda

    def is_cuda(x):
        return (isinstance(x, str) and x.startswith("cuda")) or (
            isinstance(x, torch.device) and x.type == "cuda"
        )

    def to(self, *args, **kwargs):
        args = tuple("cpu" if is_cuda(a) else a for a in args)
        if is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return orig_to(self, *args, **kwargs)

    def cuda(self, *args, **kwargs):
        return self

    torch.Tensor.to, torch.Tensor.cuda = to, cuda
    try:
        yield
    finally:
        torch.Tensor.to, torch.Tensor.cuda = orig_to, orig_cuda


def git_commit(path: Optional[str]) -> Optional[str]:
    """The checkout's commit, when it is a git work tree."""
    if not path:
        return None
    try:
        out = subprocess.run(
            ["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


# ---- model ----------------------------------------------------------------------------------


def build_resnet(arch: Dict):
    """detectron2's ResNet (the class detrex's R50 config instantiates) with small channels."""
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone import build_resnet_backbone

    r = arch["resnet"]
    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = r["depth"]
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = r["stem_out_channels"]
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = r["res2_out_channels"]
    cfg.MODEL.RESNETS.NUM_GROUPS = r["num_groups"]
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = r["width_per_group"]
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = r["stride_in_1x1"]
    cfg.MODEL.RESNETS.RES5_DILATION = r["res5_dilation"]
    cfg.MODEL.RESNETS.NORM = r["norm"]
    cfg.MODEL.RESNETS.OUT_FEATURES = list(r["out_features"])
    cfg.MODEL.BACKBONE.FREEZE_AT = r["freeze_at"]
    return build_resnet_backbone(cfg, ShapeSpec(channels=3))


def _patch_sine(module_name: Optional[str], d: int, info: Dict) -> None:
    """Their box / point sine embeddings hard-code 128 features per coordinate (= d_model / 2
    at 256): for a smaller d_model the module's ``get_sine_pos_embed`` gets d_model / 2."""
    if module_name is None or d == 256:
        return
    import importlib

    mod = importlib.import_module(module_name)
    fn = mod.get_sine_pos_embed
    fn = fn.func if isinstance(fn, functools.partial) else fn
    mod.get_sine_pos_embed = functools.partial(fn, num_pos_feats=d // 2)
    info["patched_get_sine_pos_embed_num_pos_feats"] = d // 2


def _shrink_layers(part, arch: Dict, n_layers: int, ffn: int) -> None:
    part.embed_dim = arch["d_model"]
    part.num_heads = arch["nheads"]
    part.feedforward_dim = ffn
    part.attn_dropout = arch["dropout"]
    part.ffn_dropout = arch["dropout"]
    part.num_layers = n_layers


def build_model(spec: Dict, root: str, arch: Dict, seed: int):
    """Their model from their config, shrunk to ``arch``, on the CPU.

    Returns:
        (model, info) with info holding the official settings read from their config.
    """
    from detectron2.config import LazyConfig, instantiate
    from detectron2.layers import ShapeSpec

    family = spec["family"]
    cfg = LazyConfig.load(os.path.join(root, spec["config"]))
    m = cfg.model
    d = arch["d_model"]
    info = {
        "config": spec["config"],
        "official_num_queries": m.get("num_queries", None),
        "official_d_model": m.embed_dim,
        "official_optimizer": {
            "type": "AdamW",
            "lr": cfg.optimizer.lr,
            "betas": list(cfg.optimizer.betas),
            "weight_decay": cfg.optimizer.weight_decay,
            "weight_decay_norm": cfg.optimizer.params.weight_decay_norm,
            "backbone_lr_factor": cfg.optimizer.params.lr_factor_func("backbone.x"),
        },
        "official_clip_grad": dict(cfg.train.clip_grad.params),
        "official_max_iter": cfg.train.max_iter,
        "official_select_box_nums_for_evaluation": m.get("select_box_nums_for_evaluation", 300),
    }
    torch.manual_seed(seed)
    backbone = build_resnet(arch)
    shapes = backbone.output_shape()
    m.device = "cpu"
    m.backbone = backbone
    m.position_embedding.num_pos_feats = d // 2
    m.embed_dim = d
    m.num_classes = arch["num_classes"]
    m.select_box_nums_for_evaluation = arch["num_select"]
    m.criterion.num_classes = arch["num_classes"]  # a literal 80 in some of their configs
    t = m.transformer
    _shrink_layers(t.encoder, arch, arch["enc_layers"], arch["enc_ffn_dim"])
    _shrink_layers(t.decoder, arch, arch["dec_layers"], arch["dec_ffn_dim"])
    if family in TWO_STAGE:
        m.neck.input_shapes = {
            f: ShapeSpec(channels=shapes[f].channels) for f in arch["in_features"]
        }
        m.neck.in_features = list(arch["in_features"])
        m.neck.out_channels = d
        m.neck.norm_layer.num_channels = d
        t.num_feature_levels = arch["num_feature_levels"]
        info["neck"] = {
            "kernel_size": m.neck.kernel_size,
            "num_outs": m.neck.num_outs,
            "group_norm_groups": m.neck.norm_layer.num_groups,
        }
    if family == "dino":
        info["official_dn_number"] = m.dn_number
        info["official_label_noise_ratio"] = m.label_noise_ratio
        info["official_box_noise_scale"] = m.box_noise_scale
        m.num_queries = arch["num_queries"]
        m.dn_number = 0  # denoising off in the fixture (official: dn_number above)
        info["prior_init"] = m.get("prior_init", 0.01)  # DINO hard-codes 0.01
    elif family == "hdetr":
        info["official_num_queries"] = [m.num_queries_one2one, m.num_queries_one2many]
        info["official_two_stage_num_proposals"] = t.two_stage_num_proposals
        info["official_k_one2many"] = m.k_one2many
        m.num_queries_one2one = arch["num_queries_one2one"]
        m.num_queries_one2many = arch["num_queries_one2many"]
        t.two_stage_num_proposals = arch["num_queries_one2one"] + arch["num_queries_one2many"]
        for key in ("k_one2many", "lambda_one2many", "mixed_selection"):
            assert m[key] == arch[key], (key, m[key])
        assert m.with_box_refine and m.as_two_stage
        info["prior_init"] = 0.01
    elif family == "conditional":
        m.in_features = list(arch["in_features"])
        m.in_channels = shapes[arch["in_features"][-1]].channels
        m.num_queries = arch["num_queries"]
        assert list(m.backbone.output_shape()) == arch["resnet"]["out_features"]
        info["prior_init"] = 0.01
    if spec["criterion"] == "align":
        official_k = list(m.criterion.match_num)
        info["official_match_num"] = official_k
        middle = set(official_k[1:-1])
        assert len(middle) == 1, official_k
        m.criterion.match_num = [official_k[0]] + [middle.pop()] * (arch["dec_layers"] - 1)
        m.criterion.match_num.append(official_k[-1])
        info["match_num"] = list(m.criterion.match_num)
        info["tau"] = m.criterion.tau
    else:
        info["loss_class_type"] = m.criterion.loss_class_type
    info["alpha"] = m.criterion.alpha
    info["gamma"] = m.criterion.gamma
    info["matcher"] = {
        k: m.criterion.matcher[k]
        for k in ("cost_class", "cost_bbox", "cost_giou", "cost_class_type", "alpha", "gamma")
    }
    info["pos_embed"] = {
        "temperature": m.position_embedding.temperature,
        "normalize": m.position_embedding.normalize,
        "offset": m.position_embedding.get("offset", 0.0),
        "num_pos_feats": d // 2,
    }
    _patch_sine(spec["sine_module"], d, info)
    model = instantiate(cfg.model)
    model.to("cpu")
    if family == "hdetr" and d != 256:
        # their proposal embedding: 128 features per coordinate into pos_trans (2 d_model wide)
        fn = model.transformer.get_proposal_pos_embed
        model.transformer.get_proposal_pos_embed = functools.partial(fn, num_pos_feats=d // 2)
        info["patched_get_proposal_pos_embed_num_pos_feats"] = d // 2
    weight_dict = dict(model.criterion.weight_dict)
    if family == "hdetr":  # as their forward extends it
        weight_dict.update({k + "_one2many": v for k, v in list(weight_dict.items())})
    info["weight_dict"] = weight_dict
    return model, info


def _heads(x) -> List:
    """A model's class / box heads as a list (a ModuleList, or one module)."""
    return list(x) if isinstance(x, torch.nn.ModuleList) else [x]


@torch.no_grad()
def randomize_(model, seed: int, box_logit_growth: float) -> None:
    """Perturbs every weight so the fixture discriminates (see the module docstring)."""
    from detectron2.layers import FrozenBatchNorm2d

    gen = torch.Generator().manual_seed(seed + 1000)
    for mod in model.backbone.modules():
        if isinstance(mod, FrozenBatchNorm2d):
            n = mod.num_features
            mod.weight.copy_(0.4 + 0.4 * torch.rand(n, generator=gen))
            mod.bias.copy_(0.1 * torch.randn(n, generator=gen))
            mod.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
            mod.running_var.copy_(0.5 + torch.rand(n, generator=gen))
    class_heads = list({id(h): h for h in _heads(model.class_embed)}.values())
    box_heads = list({id(h): h for h in _heads(model.bbox_embed)}.values())
    heads = {id(p) for h in class_heads + box_heads for p in h.parameters()}
    for name, p in model.named_parameters():
        if name.startswith("backbone.") or id(p) in heads:
            continue
        floor = 0.1 if "sampling_offsets" in name or "attention_weights" in name else 0.05
        _noise_(p, gen, 0.3, floor)
    for head in class_heads:
        head.weight.mul_(3.0)
        head.bias.copy_(-1.0 + 0.5 * torch.randn(head.bias.shape, generator=gen))
        _noise_(head.weight, gen, 0.5, 0.05)
    for head in box_heads:
        for i, layer in enumerate(head.layers):
            last = i == len(head.layers) - 1
            _noise_(layer.weight, gen, 0.3, 0.15 if last else 0.05)
            _noise_(layer.bias, gen, 0.3, 0.2 if last else 0.05)
        # larger boxes: matched predictions overlap their GT, so that the quality t (and the
        # rank of the positives of a GT) is not decided by the 0.01 floor of an IoU of 0
        head.layers[-1].bias[2:].add_(box_logit_growth)


def _noise_(p: torch.Tensor, gen: torch.Generator, rel: float, floor: float):
    """Adds N(0, sigma) noise, sigma = rel * std(p) or floor for constant tensors."""
    std = p.float().std().item() if p.numel() > 1 else 0.0
    sigma = rel * std if std > 1e-6 else floor
    p.add_(torch.randn(p.shape, generator=gen) * sigma)


@torch.no_grad()
def spread_conditional_queries_(model, single_recs: List[Dict], seed: int) -> None:
    """Conditional DETR at random init: the decoder content starts at zero and the first
    self-attention averages identical values, so all queries come out nearly the same (their
    scores differ by ~0.01 logit). The decoder's attention projections are scaled x3 (sharper,
    position-dependent attention) by the caller before the first pass; here the class head and
    the w / h rows of the box head's last layer are scaled x10 and re-centred on the final layer's
    states of the two images (``single_recs``: one eval record per image), so that scores spread
    over (0, 1) and box sizes differ between queries."""
    gen = torch.Generator().manual_seed(seed + 2000)
    h = torch.cat([r["inter_states"][-1].flatten(0, 1) for r in single_recs])
    head = model.class_embed
    head.weight.mul_(10.0)
    head.bias.copy_(
        -(h @ head.weight.T).mean(0) + 0.5 * torch.randn(head.bias.shape, generator=gen)
    )
    hidden = h
    for layer in model.bbox_embed.layers[:-1]:
        hidden = torch.relu(layer(hidden))
    last = model.bbox_embed.layers[-1]
    last.weight[2:].mul_(10.0)
    wh = hidden @ last.weight[2:].T
    last.bias[2:].copy_(-wh.mean(0) - 1.0 + 0.3 * torch.randn(2, generator=gen))


@torch.no_grad()
def sharpen_conditional_attention_(model) -> None:
    """Scales the content / position projections of the decoder's attentions x3 (see
    spread_conditional_queries_)."""
    for name, p in model.transformer.decoder.named_parameters():
        if "attentions" in name and name.endswith("weight"):
            if "pos" in name or "content_proj" in name:
                p.mul_(3.0)


@torch.no_grad()
def invalid_token_feature(model) -> torch.Tensor:
    """The encoder feature every invalid token gets: enc_output_norm(enc_output(0))."""
    t = model.transformer
    return t.enc_output_norm(t.enc_output(torch.zeros(1, t.embed_dim)))[0]


@torch.no_grad()
def shift_encoder_head_(model, delta: float) -> None:
    """Adds ``delta`` to every class logit of the invalid-token feature (rank-one update of the
    encoder class head along that feature); valid tokens move by delta * <x, v> / |v|^2."""
    v = invalid_token_feature(model)
    head = model.transformer.decoder.class_embed[model.transformer.decoder.num_layers]
    head.weight.add_(delta * v[None, :] / v.dot(v))


# ---- data -----------------------------------------------------------------------------------


def load_inputs(data_dir: str, num_classes: int, images: Sequence[Dict] = IMAGES) -> List[Dict]:
    """The two images as detectron2 ``batched_inputs`` (tensors only: no Instances objects).

    GT boxes are the DeepForest crowns clipped to the window (kept with >= 50% of their area and
    >= 4 px sides, as tools/prepare_trees.py does), scaled by the resize. The data has one class;
    labels are assigned as ``index % num_classes`` so that several classes occur.
    """
    from PIL import Image

    inputs = []
    for spec in images:
        _, _, objects = read_voc(os.path.join(data_dir, spec["stem"] + ".xml"))
        win = spec["window"]
        img = Image.open(os.path.join(data_dir, spec["stem"] + ".png")).convert("RGB")
        crop = img.crop(win)
        boxes = [clip_box(b, win, 0.5, 4.0) for _, b in objects]
        boxes = torch.tensor([b for b in boxes if b is not None], dtype=torch.float32)
        if spec["resize"]:
            w, h = spec["resize"]
            scale = torch.tensor([w / crop.width, h / crop.height] * 2)
            boxes = boxes * scale
            crop_size = (crop.height, crop.width)
            crop = crop.resize((w, h), Image.BILINEAR)
        else:
            crop_size = (crop.height, crop.width)
        image = torch.frombuffer(bytearray(crop.tobytes()), dtype=torch.uint8)
        image = image.view(crop.height, crop.width, 3).permute(2, 0, 1).contiguous()
        labels = torch.arange(len(boxes), dtype=torch.int64) % num_classes
        inputs.append(
            {
                "file_name": f"{spec['stem']}.png",
                "window": list(win),
                "image": image,
                "height": crop_size[0],
                "width": crop_size[1],
                "instances": {
                    "image_size": [crop.height, crop.width],
                    "gt_boxes": boxes,
                    "gt_classes": labels,
                },
            }
        )
    return inputs


def to_detectron2(inputs: List[Dict]) -> List[Dict]:
    """Plain-tensor inputs -> what a detectron2 model receives (Instances with Boxes)."""
    from detectron2.structures import Boxes, Instances

    out = []
    for x in inputs:
        inst = Instances(tuple(x["instances"]["image_size"]))
        inst.gt_boxes = Boxes(x["instances"]["gt_boxes"].clone())
        inst.gt_classes = x["instances"]["gt_classes"].clone()
        out.append(
            {
                "file_name": x["file_name"],
                "image": x["image"].clone(),
                "height": x["height"],
                "width": x["width"],
                "instances": inst,
            }
        )
    return out


# ---- running their model with recorders -----------------------------------------------------

#: Names of what each family's transformer returns.
TRANSFORMER_OUTPUTS = {
    "dino": ("inter_states", "init_reference", "inter_references", "enc_state", "enc_reference"),
    "hdetr": (
        "inter_states",
        "init_reference",
        "inter_references",
        "enc_outputs_class",
        "enc_outputs_coord_unact",
    ),
    "conditional": ("inter_states", "reference"),
}


class Recorder:
    """Wraps methods of their model to record intermediate tensors of one forward pass."""

    def __init__(self, model, family: str):
        self.model = model
        self.family = family
        self.rec: Dict = {}
        self._undo = []
        self._hooks = []

    def _wrap(self, obj, name, fn):
        orig = getattr(obj, name)
        self._undo.append((obj, name, orig, name in vars(obj)))
        setattr(obj, name, fn(orig))

    def __enter__(self):
        m, t, rec, family = self.model, self.model.transformer, self.rec, self.family

        def wrap_preprocess(orig):
            def f(batched_inputs):
                images = orig(batched_inputs)
                rec["images_tensor"] = images.tensor.detach().clone()
                rec["image_sizes"] = [list(s) for s in images.image_sizes]
                return images

            return f

        def wrap_proposals(orig):
            def f(memory, mask, shapes):
                out_mem, out_prop = orig(memory, mask, shapes)
                rec["memory"] = memory.detach().clone()
                rec["memory_padding_mask"] = mask.detach().clone()
                rec["spatial_shapes"] = shapes.detach().clone()
                rec["output_memory"] = out_mem.detach().clone()
                rec["output_proposals"] = out_prop.detach().clone()
                return out_mem, out_prop

            return f

        def wrap_transformer_forward(orig):
            def f(*args, **kw):
                if family in TWO_STAGE:
                    rec["level_masks"] = [x.detach().clone() for x in args[1]]
                    rec["level_pos_embeds"] = [x.detach().clone() for x in args[2]]
                else:  # features, mask, query_embed, pos_embed
                    rec["input_proj_features"] = args[0].detach().clone()
                    rec["mask"] = args[1].detach().clone()
                    rec["pos_embed"] = args[3].detach().clone()
                out = orig(*args, **kw)
                for k, v in zip(TRANSFORMER_OUTPUTS[family], out, strict=True):
                    rec[k] = v.detach().clone()
                return out

            return f

        def wrap_set_aux(orig):
            def f(outputs_class, outputs_coord):
                # H-DETR calls it twice: one-to-one queries first, then one-to-many
                suffix = "_one2many" if "layer_logits" in rec else ""
                rec["layer_logits" + suffix] = outputs_class.detach().clone()
                rec["layer_boxes" + suffix] = outputs_coord.detach().clone()
                return orig(outputs_class, outputs_coord)

            return f

        def wrap_inference(orig):
            def f(box_cls, box_pred, image_sizes):
                results = orig(box_cls, box_pred, image_sizes)
                rec["topk"] = [
                    {
                        "scores": r.scores.detach().clone(),
                        "labels": r.pred_classes.detach().clone(),
                        "boxes": r.pred_boxes.tensor.detach().clone(),
                    }
                    for r in results
                ]
                return results

            return f

        self._wrap(m, "preprocess_image", wrap_preprocess)
        if hasattr(t, "gen_encoder_output_proposals"):
            self._wrap(t, "gen_encoder_output_proposals", wrap_proposals)
        self._wrap(t, "forward", wrap_transformer_forward)
        self._wrap(m, "_set_aux_loss", wrap_set_aux)
        self._wrap(m, "inference", wrap_inference)

        def keep(name):
            def hook(_mod, _inp, out):
                rec[name] = _detach_tree(out)

            return hook

        self._hooks.append(m.backbone.register_forward_hook(keep("backbone_features")))
        if hasattr(m, "neck"):
            self._hooks.append(m.neck.register_forward_hook(keep("neck_features")))
        self._hooks.append(t.encoder.register_forward_hook(keep("encoder_memory")))
        rec["decoder_layers"] = []

        def dec_hook(_mod, _args, kwargs, out):
            rec["decoder_layers"].append(
                {
                    k: _detach_tree(kwargs[k])
                    for k in ("query_pos", "reference_points", "query_sine_embed")
                    if kwargs.get(k) is not None
                }
                | {"output_unnormed": out.detach().clone()}
            )

        for layer in t.decoder.layers:
            self._hooks.append(layer.register_forward_hook(dec_hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for obj, name, orig, was_instance_attr in reversed(self._undo):
            if was_instance_attr:
                setattr(obj, name, orig)
            else:
                delattr(obj, name)
        for h in self._hooks:
            h.remove()
        return False


def record_criterion(model, rec: Dict, spec: Dict):
    """Wraps their criterion (instance attributes only) to record the unweighted loss dict and its
    inputs, every matcher call, and for Align-DETR every get_loss call and the IA-BCE rank
    weights. Returns an undo function."""
    crit = model.criterion
    rec["criterion_calls"] = []
    rec["matcher"] = []
    orig_forward = crit.forward
    orig_match = crit.matcher.forward

    def forward(outputs, targets, *args):
        call = {
            "targets": [{k: v.clone() for k, v in t.items()} for t in targets],
            "outputs": _detach_tree(outputs),
        }
        losses = orig_forward(outputs, targets, *args)
        call["losses"] = {k: v.detach().clone() for k, v in losses.items()}
        rec["criterion_calls"].append(call)
        return losses

    def match(outputs, targets, *a, **kw):
        indices = orig_match(outputs, targets, *a, **kw)
        rec["matcher"].append([[s.clone(), t.clone()] for s, t in indices])
        return indices

    crit.forward = forward
    crit.matcher.forward = match
    undo_more = _record_align_losses(crit, rec) if spec["criterion"] == "align" else None
    undo_hybrid = None
    if spec["criterion"] == "hybrid":  # one-to-one + one-to-many (repeated GT) losses, merged
        orig_hybrid = model.train_hybrid

        def train_hybrid(outputs, targets, *a, **kw):
            losses = orig_hybrid(outputs, targets, *a, **kw)
            rec["hybrid_losses"] = {k: v.detach().clone() for k, v in losses.items()}
            return losses

        model.train_hybrid = train_hybrid

        def undo_hybrid():
            del model.train_hybrid

    def undo():
        del crit.forward
        del crit.matcher.forward
        if undo_more:
            undo_more()
        if undo_hybrid:
            undo_hybrid()

    return undo


def _finish_criterion_record(rec: Dict, spec: Dict) -> None:
    """The criterion's first call holds the inputs; the unweighted loss dict is the criterion's
    output (for H-DETR, train_hybrid's merge of both calls)."""
    first = rec["criterion_calls"][0]
    rec["targets"] = first["targets"]
    rec["criterion_outputs"] = first["outputs"]
    if spec["criterion"] == "hybrid":
        rec["loss_dict_unweighted"] = rec["hybrid_losses"]
    else:
        rec["loss_dict_unweighted"] = first["losses"]


def _record_align_losses(crit, rec: Dict):
    import aligndetr.criterions.many_to_one_criterion as m2o
    from detrex.layers import box_cxcywh_to_xyxy, box_iou

    rec["get_loss"] = []
    rec["ia_bce"] = []
    orig_get_loss = crit.get_loss
    orig_ia_bce = m2o.IA_BCE_loss

    def get_loss(outputs, targets, num_boxes, layer_spec, specify_indices=None):
        losses, indices = orig_get_loss(outputs, targets, num_boxes, layer_spec, specify_indices)
        rec["get_loss"].append(
            {
                "layer_spec": layer_spec,
                "match_k": crit.match_number[layer_spec],
                "num_boxes": float(num_boxes),
                "indices": [[s.clone(), t.clone()] for s, t in indices],
                "losses": {k: v.detach().clone() for k, v in losses.items()},
            }
        )
        return losses, indices

    def ia_bce(src_logits, pos_idx_c, src_boxes, target_boxes, indices, avg_factor, *a, **kw):
        loss, rank_weight = orig_ia_bce(
            src_logits, pos_idx_c, src_boxes, target_boxes, indices, avg_factor, *a, **kw
        )
        rw = rank_weight if isinstance(rank_weight, torch.Tensor) else torch.tensor(rank_weight)
        # their quality t (IA_BCE_loss ranks the positives of each GT by it): recomputed to
        # check that no two positives of a GT tie
        alpha = a[0] if a else kw["alpha"]
        with torch.no_grad():
            iou = torch.diag(
                box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(target_boxes))[0]
            )
            t = (src_logits.sigmoid()[pos_idx_c] ** alpha * iou ** (1 - alpha)).clamp(min=0.01)
        offsets, group = 0, []
        for _, tgt in indices:
            group.append(tgt + offsets)
            offsets += int(tgt.max()) + 1 if len(tgt) else 0
        rec["ia_bce"].append(
            {
                "loss": loss.detach().clone(),
                "rank_weight": rw.detach().clone(),
                "quality": t.clone(),
                "iou": iou.clone(),
                "group": torch.cat(group) if group else torch.zeros(0, dtype=torch.long),
                # each positive's prediction (box, logits of every class)
                "pred": torch.cat([src_boxes, src_logits[pos_idx_c[:2]]], -1).detach().clone(),
                "query": pos_idx_c[1].clone(),
            }
        )
        return loss, rank_weight

    crit.get_loss = get_loss
    m2o.IA_BCE_loss = ia_bce

    def undo():
        del crit.get_loss
        m2o.IA_BCE_loss = orig_ia_bce

    return undo


def _detach_tree(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _detach_tree(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_detach_tree(v) for v in x]
    return x


def run_eval(model, inputs: List[Dict], spec: Dict) -> Tuple[Dict, List[Dict]]:
    """Inference on ``inputs`` (one batch). Returns (record, processed results as tensors)."""
    model.eval()
    with torch.no_grad(), cuda_to_cpu(), Recorder(model, spec["family"]) as r:
        results = model(to_detectron2(inputs))
    processed = [
        {
            "scores": x["instances"].scores.clone(),
            "labels": x["instances"].pred_classes.clone(),
            "boxes": x["instances"].pred_boxes.tensor.clone(),
            "image_size": list(x["instances"].image_size),
        }
        for x in results
    ]
    return r.rec, processed


def run_train(model, inputs: List[Dict], spec: Dict) -> Tuple[Dict, Dict]:
    """Training forward (denoising off, dropout 0). Returns (record, weighted loss dict)."""
    model.train()
    with torch.no_grad(), cuda_to_cpu(), Recorder(model, spec["family"]) as r:
        undo = record_criterion(model, r.rec, spec)
        try:
            loss_dict = model(to_detectron2(inputs))
        finally:
            undo()
    _finish_criterion_record(r.rec, spec)
    return r.rec, {k: v.detach().clone() for k, v in loss_dict.items()}


# ---- checks ---------------------------------------------------------------------------------


def enc_scores(
    model, rec: Dict, family: str, delta: float = 0.0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two-stage scores their transformer ranks (DINO: the max class logit per token; H-DETR:
    the logit of class 0), and the invalid token mask (memory zeroed, proposal +inf), for a
    recorded forward pass; ``delta`` adds the shift of shift_encoder_head_ to the current head."""
    t = model.transformer
    head = t.decoder.class_embed[t.decoder.num_layers]
    with torch.no_grad():
        x = rec["output_memory"]
        logits = head(x)
        if delta:
            v = invalid_token_feature(model)
            logits = logits + delta * (x @ v / v.dot(v))[..., None]
    invalid = torch.isinf(rec["output_proposals"]).any(-1)
    scores = logits.max(-1)[0] if family == "dino" else logits[..., 0]
    return scores, invalid


def selection_stats(scores: torch.Tensor, invalid: torch.Tensor, k: int) -> Dict:
    """For one image: how many of the top-k are invalid, the number of valid tokens ranked above
    the invalid ones, and the smallest gap between consecutive scores of the top-(k+1) that are
    not both invalid (identical invalid tokens may tie; anything else must be well separated,
    since the order sets which tgt_embed row each query gets)."""
    vals, idx = scores.topk(min(k + 1, scores.numel()))
    inv = invalid[idx]
    gaps = vals[:-1] - vals[1:]
    both_invalid = inv[:-1] & inv[1:]
    real = gaps[~both_invalid]
    return {
        "num_tokens": int(scores.numel()),
        "num_invalid_tokens": int(invalid.sum()),
        "num_invalid_selected": int(inv[:k].sum()),
        "topk_index": idx[:k].clone(),
        "min_gap": float(real.min()) if real.numel() else float("inf"),
        "boundary_gap": float(gaps[k - 1]) if len(gaps) >= k else float("inf"),
        "boundary_both_invalid": bool(both_invalid[k - 1]) if len(gaps) >= k else False,
    }


def score_gap(scores: torch.Tensor) -> float:
    """Smallest gap between consecutive sorted kept scores."""
    s = scores.sort(descending=True)[0]
    return float((s[:-1] - s[1:]).min()) if s.numel() > 1 else float("inf")


def final_score_gaps(model, rec: Dict) -> List[float]:
    """Per image: the smallest gap between consecutive values of the top-(num_select + 1)
    sigmoid scores of the last decoder layer (stable order and kept set)."""
    prob = rec["layer_logits"][-1].sigmoid().flatten(1)
    n = min(model.select_box_nums_for_evaluation + 1, prob.shape[1])
    return [score_gap(p.topk(n)[0]) for p in prob]


def quality_ties(rec: Dict) -> Dict:
    """Their quality t orders the positives of each GT for the rank weights exp(-rank / tau).

    Returns:
        dict: ``min_gap``, the smallest non-zero difference of t between two positives of a GT
        that predict different things (a near-tie would make the order flaky); ``exact_ties``,
        how many such pairs tie exactly (both at the 0.01 floor: IoU 0); ``ties_by_query``,
        whether every exact tie went to the lower query index (their sorts are stable on the
        CPU: the matcher lists a GT's queries in increasing order and the rank sort keeps it).
        Positives with identical predictions (two picks of identical invalid tokens) may tie
        harmlessly and are skipped.
    """
    min_gap, ties, by_query = float("inf"), 0, True
    for r in rec["ia_bce"]:
        t, g, pred, w, q = r["quality"], r["group"], r["pred"], r["rank_weight"], r["query"]
        if w.dim() == 0:
            continue
        for gt in g.unique():
            members = (g == gt).nonzero()[:, 0].tolist()
            for a, i in enumerate(members):
                for j in members[a + 1 :]:
                    if torch.equal(pred[i], pred[j]):
                        continue
                    gap = float((t[i] - t[j]).abs())
                    if gap == 0:
                        ties += 1
                        first, second = (i, j) if q[i] < q[j] else (j, i)
                        by_query &= bool(w[first] > w[second])
                    else:
                        min_gap = min(min_gap, gap)
    return {"min_gap": min_gap, "exact_ties": ties, "ties_by_query": by_query}


def run_criterion(model, outputs: Dict, targets: List[Dict], spec: Dict) -> Tuple[Dict, Dict]:
    """Their criterion alone (H-DETR: train_hybrid) on recorded outputs, as their training
    forward calls it. Returns (unweighted losses, record)."""
    rec = {}
    outputs, targets = copy.deepcopy(outputs), copy.deepcopy(targets)
    with torch.no_grad(), cuda_to_cpu():
        undo = record_criterion(model, rec, spec)
        try:
            if spec["criterion"] == "hybrid":
                model.train_hybrid(
                    outputs, targets, model.k_one2many, model.criterion, model.lambda_one2many
                )
            elif spec["family"] == "dino":
                model.criterion(outputs, targets, None)
            else:
                model.criterion(outputs, targets)
        finally:
            undo()
    _finish_criterion_record(rec, spec)
    return rec["loss_dict_unweighted"], rec


def matching_is_stable(
    model, rec: Dict, spec: Dict, weight_dict: Dict, noise: float = 1e-5, trials: int = 3
) -> float:
    """Re-runs their criterion on the recorded training outputs with the matching costs
    perturbed by ``noise``; returns the largest relative change of the total loss."""
    import importlib

    mm = importlib.import_module(
        "aligndetr.matchers.mixed_matcher"
        if spec["criterion"] == "align"
        else "detrex.modeling.matcher.matcher"
    )

    def total():
        losses, _ = run_criterion(model, rec["criterion_outputs"], rec["targets"], spec)
        return sum(float(v) * weight_dict.get(k, 1.0) for k, v in losses.items())

    ref = total()
    orig = mm.linear_sum_assignment
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    try:
        for _ in range(trials):

            def noisy(c):
                c = torch.as_tensor(c)
                return orig(c + noise * torch.randn(c.shape, generator=gen, dtype=c.dtype))

            mm.linear_sum_assignment = noisy
            worst = max(worst, abs(total() - ref) / abs(ref))
    finally:
        mm.linear_sum_assignment = orig
    return worst


def cap_case_targets(targets: List[Dict]) -> List[Dict]:
    """Synthetic targets on which their k cap and its carry-over act: image 0 gets 9 GTs (its
    5 plus 4 shifted copies), so int(Q * 0.5 / 9) = 1 < k, and image 1 keeps 3 GTs, whose own
    cap (int(Q * 0.5 / 3) = 5) is replaced by the 1 carried over from image 0."""
    t0, t1 = targets
    extra = t0["boxes"][:4].clone()
    extra[:, 0] = (extra[:, 0] + 0.1).clamp(max=0.95)
    extra[:, 1] = (extra[:, 1] + 0.05).clamp(max=0.95)
    return [
        {
            "labels": torch.cat([t0["labels"], t0["labels"][:4]]),
            "boxes": torch.cat([t0["boxes"], extra]),
        },
        {"labels": t1["labels"][:3].clone(), "boxes": t1["boxes"][:3].clone()},
    ]


def matched_per_gt(get_loss_records: List[Dict]) -> List[Dict]:
    """Per get_loss call: the layer, the requested k and the queries per GT of each image."""
    out = []
    for r in get_loss_records:
        per_image = []
        for src, tgt in r["indices"]:
            n_gt = int(tgt.unique().numel())
            per_image.append(len(src) // n_gt if n_gt else 0)
        out.append({"layer_spec": r["layer_spec"], "match_k": r["match_k"], "k_used": per_image})
    return out


# ---- main -----------------------------------------------------------------------------------


def enc_outputs(model, rec: Dict, family: str) -> Dict[str, torch.Tensor]:
    """Their encoder outputs as their criterion sees them: DINO / Align-DETR the selected tokens
    (logits = class_embed[L](gathered output_memory), boxes = sigmoid of their coords), H-DETR
    every token (+inf coords of invalid tokens give boxes of 1)."""
    with torch.no_grad():
        if family == "dino":
            logits = model.transformer.decoder.class_embed[-1](rec["enc_state"])
            return {"enc_logits": logits, "enc_boxes": rec["enc_reference"]}
        return {
            "enc_logits": rec["enc_outputs_class"],
            "enc_boxes": rec["enc_outputs_coord_unact"].sigmoid(),
        }


def choose_delta(
    model, recs: Dict[str, Dict], ks: Dict[str, int], family: str, min_gap: float
) -> Optional[float]:
    """Scans encoder-head shifts. Among those whose top-(k+1) encoder scores are separated by at
    least ``min_gap`` everywhere, keeps the one where every image with invalid tokens picks the
    most balanced mix (the largest min(#invalid, #valid) over images, at least 3), then the
    largest gap. Returns the shift or None."""
    best = None
    for delta in torch.linspace(0.0, 10.0, 2001).tolist():
        balance, worst_gap = min(ks.values()), float("inf")
        for name, rec in recs.items():
            k = ks[name]
            s, inv = enc_scores(model, rec, family, delta)
            for i in range(s.shape[0]):
                st = selection_stats(s[i], inv[i], k)
                worst_gap = min(worst_gap, st["min_gap"])
                if st["num_invalid_tokens"] >= 3:
                    n_inv = st["num_invalid_selected"]
                    balance = min(balance, n_inv, k - n_inv)
        if balance < 3 or worst_gap < min_gap:
            continue
        if best is None or (balance, worst_gap) > best[1:]:
            best = (delta, balance, worst_gap)
    return None if best is None else best[0]


def check_selection(model, recs: Dict[str, Dict], stats: Dict[str, List[Dict]]) -> None:
    """The recorded selection is what their transformer used: the initial references are the
    sigmoid of the gathered two-stage coordinates (+inf for invalid tokens -> 1)."""
    t = model.transformer
    head = t.decoder.bbox_embed[t.decoder.num_layers]
    for name, rec in recs.items():
        idx = torch.stack([st["topk_index"] for st in stats[name]])
        with torch.no_grad():
            coords = head(rec["output_memory"]) + rec["output_proposals"]
        gathered = torch.gather(coords, 1, idx[..., None].expand(-1, -1, 4)).sigmoid()
        assert torch.equal(gathered, rec["init_reference"][:, -idx.shape[1] :]), name


def make_fixture(args) -> Tuple[Dict, Dict]:
    """Builds, perturbs and runs their model; returns (fixture, debug)."""
    spec = MODELS[args.model]
    family, kind = spec["family"], spec["criterion"]
    root = args.official_src if spec["src"] == "official" else args.detrex_src
    full_size = getattr(args, "full_size", False)
    arch = arch_for(args.model, full_size)
    data_dir = args.data_dir or find_deepforest_data(install=False)
    inputs = load_inputs(data_dir, arch["num_classes"], IMAGES_FULL_SIZE if full_size else IMAGES)
    settings = {"single_0": [inputs[0]], "single_1": [inputs[1]], "batched": inputs}
    # queries selected by the two-stage top-k: H-DETR adds its one-to-many queries in training
    ks = {name: arch["num_queries"] for name in settings}
    ks["train"] = arch["num_queries"] + arch.get("num_queries_one2many", 0)
    two_stage = family in TWO_STAGE
    delta = None
    for attempt in range(args.max_tries):
        seed = args.seed + attempt
        model, info = build_model(spec, root, arch, seed)
        randomize_(model, seed, arch["box_logit_growth"])
        if family == "conditional":
            sharpen_conditional_attention_(model)
            singles = [run_eval(model, settings[n], spec)[0] for n in ("single_0", "single_1")]
            spread_conditional_queries_(model, singles, seed)
        if two_stage:
            # Place the shift on a first pass: the encoder does not depend on the heads.
            recs = {name: run_eval(model, x, spec)[0] for name, x in settings.items()}
            recs["train"] = run_train(model, inputs, spec)[0]
            # full size: no shift keeps 900 picks 1e-3 apart; take the best-separated one
            delta = choose_delta(model, recs, ks, family, 0.0 if full_size else args.min_enc_gap)
            if delta is None:
                print(f"seed {seed}: no encoder-head shift gives a mixed, well-separated selection")
                continue
            shift_encoder_head_(model, delta)
        out = {name: run_eval(model, x, spec) for name, x in settings.items()}
        train_rec, loss_dict = run_train(model, inputs, spec)
        recs = {name: o[0] for name, o in out.items()}
        recs["train"] = train_rec
        stats, enc_gap = {}, float("inf")
        if two_stage:
            for name, rec in recs.items():
                s, inv = enc_scores(model, rec, family)
                stats[name] = [selection_stats(s[i], inv[i], ks[name]) for i in range(len(s))]
            enc_gap = min(st["min_gap"] for per in stats.values() for st in per)
        score_gaps = {name: final_score_gaps(model, recs[name]) for name in settings}
        min_score_gap = min(g for gs in score_gaps.values() for g in gs)
        match_change = matching_is_stable(model, train_rec, spec, info["weight_dict"])
        ties = quality_ties(train_rec) if kind == "align" else None
        print(
            f"seed {seed}: "
            + (f"delta {delta:.2f}, encoder gap {enc_gap:.2e}, " if two_stage else "")
            + f"final score gap {min_score_gap:.2e}, "
            + f"loss change under cost noise {match_change:.1e}"
            + (
                f", quality gap {ties['min_gap']:.2e} ({ties['exact_ties']} ties at the floor)"
                if ties
                else ""
            )
        )
        if full_size:
            # the margins are recorded in the fixture's checks, not enforced: with 900 queries x
            # 80 classes no seed keeps them (see the module docstring)
            break
        if enc_gap < args.min_enc_gap or min_score_gap < args.min_score_gap:
            continue
        if ties and (ties["min_gap"] < args.min_quality_gap or not ties["ties_by_query"]):
            continue
        if match_change > 1e-6:
            continue
        break
    else:
        raise RuntimeError(f"no seed in {args.seed}..{args.seed + args.max_tries - 1} passed")

    if two_stage:
        check_selection(model, recs, stats)
    # the batched input tensor is the zero-padded stack of the single ones
    b = recs["batched"]["images_tensor"]
    for i, name in enumerate(("single_0", "single_1")):
        single = recs[name]["images_tensor"][0]
        assert torch.equal(b[i, :, : single.shape[1], : single.shape[2]], single)
    # their criterion alone, on the recorded inputs, reproduces the training forward's losses
    again, _ = run_criterion(model, train_rec["criterion_outputs"], train_rec["targets"], spec)
    for key, v in again.items():
        assert torch.equal(v, train_rec["loss_dict_unweighted"][key]), key
    if kind == "align":
        cap_targets = cap_case_targets(train_rec["targets"])
        cap_losses, cap_rec = run_criterion(
            model, train_rec["criterion_outputs"], cap_targets, spec
        )

    state_dict = {k: v.detach().clone() for k, v in model.state_dict().items()}
    _share_aliases(state_dict, model)
    arch_out = dict(arch)
    if kind == "align":
        arch_out.update(
            {
                "loss_type": "align",
                "match_k": info["match_num"],
                "tau": info["tau"],
                "align_alpha": info["alpha"],
                "align_gamma": info["gamma"],
            }
        )
    else:
        arch_out.update(
            {
                "loss_type": "focal",
                "match_k": [1] * (arch["dec_layers"] + (1 if two_stage else 0)),
                "focal_alpha": info["alpha"],
                "focal_gamma": info["gamma"],
            }
        )
    base_keys = ("loss_class", "loss_bbox", "loss_giou")
    arch_out.update(
        {
            "matcher": info["matcher"],
            "weight_dict_base": {k: info["weight_dict"][k] for k in base_keys},
            "prior_init": info["prior_init"],
            "pos_embed": info["pos_embed"],
            "size_divisibility": 0,
            "inverse_sigmoid_eps": 1e-3,
            "inference_mask": "all zeros (no padding mask at inference)",
        }
    )
    if family == "dino":
        arch_out.update(
            {
                "dn": {
                    "enabled": False,
                    "official_dn_number": info["official_dn_number"],
                    "official_label_noise_ratio": info["official_label_noise_ratio"],
                    "official_box_noise_scale": info["official_box_noise_scale"],
                    "label_enc_rows": arch["num_classes"],
                },
                "two_stage_select": arch["num_queries"],
                "two_stage_score": "max over classes",
                "look_forward_twice": True,
                "learnt_init_query": True,
                "neck": info["neck"],
            }
        )
    elif family == "hdetr":
        arch_out.update(
            {
                "two_stage_select": {"train": ks["train"], "eval": arch["num_queries"]},
                "two_stage_score": "logit of class 0",
                "look_forward_twice": True,
                "neck": info["neck"],
            }
        )
    fixture = {
        "format_version": FORMAT_VERSION,
        "model": args.model,
        "source": {
            "official_repo": "FelixCaae/AlignDETR" if spec["src"] == "official" else None,
            "official_commit": (
                args.official_commit or git_commit(args.official_src)
                if spec["src"] == "official"
                else None
            ),
            "detrex_repo": "IDEA-Research/detrex",
            "detrex_commit": args.detrex_commit or git_commit(args.detrex_src),
            "config": info["config"],
            "official_settings": {
                k: v for k, v in info.items() if k.startswith("official_") or k == "weight_dict"
            },
            "patches": args.patches | {k: v for k, v in info.items() if k.startswith("patched_")},
            "torch": str(torch.__version__),
            "seed": seed,
            "encoder_head_shift": delta,
        },
        "arch": arch_out,
        "checkpoint": {"model": state_dict},
        "inputs": {
            "batched_inputs": inputs,
            "images_normalized": (
                [recs[n]["images_tensor"][0] for n in ("single_0", "single_1")]
                if spec.get("store_normalized_inputs")
                else None  # same preprocessing as golden_aligndetr.pt, which stores them
            ),
            "data": "DeepForest 2.1.0 sample data (NEON imagery, DeepForest crown boxes)",
        },
        "inference": {},
        "train": {
            "loss_dict": loss_dict,
            "loss_dict_unweighted": train_rec["loss_dict_unweighted"],
            "total_loss": sum(loss_dict.values()),
            "weight_dict": info["weight_dict"],
            "num_boxes": sum(len(x["instances"]["gt_classes"]) for x in inputs),
            # what their model passes to its criterion: targets normalised cxcywh, outputs of
            # the last layer, aux_outputs (the other decoder layers), enc_outputs (two-stage)
            "targets": train_rec["targets"],
            "criterion_outputs": train_rec["criterion_outputs"],
            "matcher_indices": train_rec["matcher"],
        },
        "checks": {
            **({"margins_enforced": False} if full_size else {}),
            "min_final_score_gap": min_score_gap,
            "final_score_gaps": score_gaps,
            "loss_change_under_cost_noise_1e-5": match_change,
        },
    }
    for name in settings:
        per_image = []
        for i in range(len(settings[name])):
            entry = {
                # their inference(): top-k over (query, class), boxes xyxy in input pixels
                "topk": out[name][0]["topk"][i],
                # after detector_postprocess: scaled to height/width, clipped, empty removed
                "instances": out[name][1][i],
                # per query, for an order-robust comparison: every decoder layer's logits
                # (L, Q, C) and sigmoid cxcywh boxes (L, Q, 4)
                "layer_logits": recs[name]["layer_logits"][:, i],
                "layer_boxes": recs[name]["layer_boxes"][:, i],
            }
            if two_stage:
                entry.update({k: v[i] for k, v in enc_outputs(model, recs[name], family).items()})
            else:  # Conditional DETR: the reference points of the queries
                entry["reference"] = recs[name]["reference"][i]
            per_image.append(entry)
        fixture["inference"][name] = per_image
    if two_stage:
        fixture["selection"] = {
            name: [
                {
                    "topk_index": st["topk_index"],
                    "num_invalid_selected": st["num_invalid_selected"],
                    "num_invalid_tokens": st["num_invalid_tokens"],
                    "num_tokens": st["num_tokens"],
                }
                for st in per
            ]
            for name, per in stats.items()
        }
        fixture["checks"]["min_encoder_score_gap"] = enc_gap
        fixture["checks"]["encoder_boundary_gaps"] = {
            name: [st["boundary_gap"] for st in per] for name, per in stats.items()
        }
    if kind == "align":
        fixture["train"]["k_used"] = matched_per_gt(train_rec["get_loss"])
        fixture["train"]["cap_case"] = {
            "description": cap_case_targets.__doc__,
            "targets": cap_targets,
            "loss_dict_unweighted": cap_losses,
            "k_used": matched_per_gt(cap_rec["get_loss"]),
        }
        # positives of one GT: smallest non-zero quality gap, exact ties (IoU 0 for both: t at
        # its 0.01 floor), which their stable CPU sorts rank by increasing query index
        fixture["checks"]["quality_within_gt"] = ties
    debug = {
        "arch": arch_out,
        "info": info,
        "records": recs,
        "cap_case": cap_rec if kind == "align" else None,
        "selection_stats": stats,
        "optimizer_groups": optimizer_groups(model, os.path.join(root, spec["config"])),
    }
    return fixture, debug


def plain(x):
    """Converts a tree of (omegaconf) containers and scalars into plain Python / tensors."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, dict) or hasattr(x, "items"):
        return {str(k) if not isinstance(k, int) else k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)) or type(x).__name__ == "ListConfig":
        return [plain(v) for v in x]
    if isinstance(x, (bool, int, float, str)) or x is None:
        return x
    raise TypeError(f"cannot store {type(x)} in the fixture")


def _share_aliases(state_dict: Dict[str, torch.Tensor], model) -> None:
    """Makes aliased entries (same parameter under two names) share one tensor again, so that
    torch.save stores them once, as it does for their checkpoints."""
    by_ptr = {}
    for name, v in model.state_dict(keep_vars=True).items():
        key = (v.data_ptr(), tuple(v.shape), v.dtype)
        if key in by_ptr:
            state_dict[name] = state_dict[by_ptr[key]]
        else:
            by_ptr[key] = name


def optimizer_groups(model, config_path: str) -> Dict[str, Dict]:
    """Their optimizer's per-parameter lr / weight decay (get_default_optimizer_params with the
    12-epoch config), keyed by the name detectron2 sees first."""
    from detectron2.config import LazyConfig, instantiate

    cfg = LazyConfig.load(config_path)
    cfg.optimizer.params.model = model
    opt = instantiate(cfg.optimizer)
    names = {}
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            names.setdefault(id(p), f"{mod_name}.{p_name}")
    out = {}
    for g in opt.param_groups:
        for p in g["params"]:
            out[names[id(p)]] = {"lr": g["lr"], "weight_decay": g["weight_decay"]}
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    return {"groups": out, "frozen": frozen}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official-src", help="FelixCaae/AlignDETR checkout (--model aligndetr)")
    parser.add_argument("--detrex-src", help="IDEA-Research/detrex checkout")
    parser.add_argument("--model", default="aligndetr", choices=sorted(MODELS))
    parser.add_argument("--out", required=True, help="fixture file (tests/data/...)")
    parser.add_argument("--debug-out", help="optional file for intermediate tensors")
    parser.add_argument("--data-dir", help="DeepForest data folder (default: installed package)")
    parser.add_argument("--seed", type=int, help="first seed tried (default: per model)")
    parser.add_argument("--max-tries", type=int, default=60)
    parser.add_argument("--min-enc-gap", type=float, default=1e-3)
    parser.add_argument("--min-score-gap", type=float, default=5e-5)
    parser.add_argument("--min-quality-gap", type=float, default=1e-4)
    parser.add_argument(
        "--full-size",
        action="store_true",
        help="--model aligndetr at the full R50 size of configs/align_r50.yaml (~200 MB; write "
        "it outside the repository): one seed, margins recorded but not enforced",
    )
    parser.add_argument(
        "--checkpoint-out",
        help="also save their state dict alone as {'model': state_dict} (a zoo-style .pth)",
    )
    parser.add_argument("--official-commit", help="recorded when the source is not a git tree")
    parser.add_argument("--detrex-commit", help="recorded when the source is not a git tree")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if args.full_size and args.model != "aligndetr":
        parser.error("--full-size is only implemented for --model aligndetr")
    if args.model == "aligndetr" and not args.official_src:
        parser.error("--model aligndetr needs --official-src")
    if MODELS[args.model]["src"] == "detrex" and not args.detrex_src:
        parser.error(f"--model {args.model} needs --detrex-src (its configs and projects/)")
    if args.seed is None:
        args.seed = MODELS[args.model].get("seed", 0)
    args.patches = setup_official_imports(args.official_src, args.detrex_src)
    fixture, debug = make_fixture(args)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    state_dict = fixture.pop("checkpoint")
    if args.checkpoint_out:
        os.makedirs(os.path.dirname(os.path.abspath(args.checkpoint_out)), exist_ok=True)
        torch.save(state_dict, args.checkpoint_out)
        print(f"wrote {args.checkpoint_out}")
    fixture = plain(fixture)
    fixture["checkpoint"] = state_dict  # kept as is: its aliased tensors share storage
    buf = io.BytesIO()
    torch.save(fixture, buf)
    torch.load(io.BytesIO(buf.getvalue()), weights_only=True)  # only plain types inside
    with open(args.out, "wb") as f:
        f.write(buf.getvalue())
    digest = hashlib.sha256(buf.getvalue()).hexdigest()[:16]
    print(f"wrote {args.out} ({len(buf.getvalue()) / 1e6:.2f} MB, sha256 {digest})")
    if args.debug_out:
        os.makedirs(os.path.dirname(os.path.abspath(args.debug_out)), exist_ok=True)
        torch.save(debug, args.debug_out)
        print(f"wrote {args.debug_out}")


if __name__ == "__main__":
    main()
