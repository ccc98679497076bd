# Copyright (c) align-detr contributors.
"""Config keys of align-detr, and the one way every entry point loads and checks a config.

Every model option lives under ``MODEL.ALIGN_DETR``; the defaults are those of the DINO-4scale
R50 + Align-DETR recipe. ``configs/*.yaml`` override what differs (the data recipe, which uses
detectron2's own ``INPUT`` keys, is set in ``configs/Base-AlignDETR.yaml`` only).

Entry points (``train_net.py``, ``demo/demo.py``, tools, benchmarks, tests) call
:func:`load_config`; :func:`validate_config` checks every value before anything heavy starts
and raises :class:`ConfigError` naming the key.
"""

import os
from typing import List, Sequence

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

__all__ = [
    "ConfigError",
    "add_align_detr_config",
    "load_config",
    "resolve_match_k",
    "validate_config",
]

#: Upper bound of DN.NUM_QUERIES (DINO uses 100 with 900 matching queries): the DN + matching
#: self-attention mask grows with its square.
MAX_DN_QUERIES = 2000


class ConfigError(ValueError):
    """A config with an unknown key or a value the model cannot run with."""


def add_align_detr_config(cfg):
    """Adds the align-detr keys (with their defaults) to a detectron2 config, in place."""
    cfg.MODEL.ALIGN_DETR = CN()
    c = cfg.MODEL.ALIGN_DETR
    # The base detector (a name in align_detr.modeling.BASE_REGISTRY): "DINO" is DINO-style
    # deformable DETR (4 scales, two-stage, mixed queries, CDN, box refinement);
    # "HDeformableDETR" is H-Deformable-DETR (two-stage, box refinement, mixed queries,
    # look-forward-twice, the hybrid one-to-many branch of HYBRID, no denoising);
    # "ConditionalDETR" is single-scale Conditional DETR (SD-DETR's base; see CONDITIONAL).
    c.BASE = "DINO"
    # Number of foreground classes (80 for COCO); no background class (sigmoid scores).
    c.NUM_CLASSES = 80
    # Transformer width, heads, and feature levels (backbone stages + extra stride-2 levels).
    c.D_MODEL = 256
    c.NHEADS = 8
    c.NUM_FEATURE_LEVELS = 4
    # Backbone feature maps fed to the neck, finest first (ResNet: res3..res5).
    c.IN_FEATURES = ["res3", "res4", "res5"]
    # Matching queries selected from the encoder (two-stage) and kept for the decoder.
    c.NUM_QUERIES = 900
    # Detections kept per image at inference: top-k over (query x class) sigmoid scores.
    c.NUM_SELECT = 300
    # Two-stage selection: "all" picks the top-K over every encoder token, as the released DINO /
    # Align-DETR code (a padding or off-image token, if picked, gets the reference box (1,1,1,1));
    # "valid" never picks those tokens while K others exist.
    c.TWO_STAGE_SELECTION = "all"
    # Mask the padding of batched images at inference. The released code does not (its outputs
    # for an image then depend on the other images of the batch); at batch size 1 both agree.
    c.TEST_PADDING_MASK = True

    c.ENCODER = CN()
    c.ENCODER.NUM_LAYERS = 6
    c.ENCODER.N_POINTS = 4
    c.ENCODER.DIM_FEEDFORWARD = 2048
    c.ENCODER.DROPOUT = 0.0

    c.DECODER = CN()
    c.DECODER.NUM_LAYERS = 6
    c.DECODER.N_POINTS = 4
    c.DECODER.DIM_FEEDFORWARD = 2048
    c.DECODER.DROPOUT = 0.0
    # SD-DETR: separate classification / localisation cross-attention + FFN per layer.
    c.DECODER.DECOUPLED = False
    # SD-DETR: content queries sampled inside each proposal instead of learnt embeddings.
    c.DECODER.TASK_AWARE_QUERIES = False
    # SD-DETR task-aware query generation: points sampled per proposal and stream.
    c.DECODER.TASK_AWARE_POINTS = 8
    # SD-DETR point predictor: "roi" is the paper's Eq. 5, MLP(ConvNet(RoIAlign 7x7)); "token"
    # an MLP on the selected encoder token alone.
    c.DECODER.TASK_AWARE_POINT_PREDICTOR = "token"
    # SD-DETR: each stream positioned at its own task-aware points (its own positional query and
    # reference; the paper's Fig. 3), instead of both at the proposal box.
    c.DECODER.STREAM_POSITIONS = False
    # SD-DETR: a learnt vector per stream added to its content queries.
    c.DECODER.STREAM_EMBED = False
    # SD-DETR Table 3's control: split the whole decoder layer (a self-attention per stream).
    c.DECODER.SPLIT_SELF_ATTN = False

    # Conditional DETR (BASE "ConditionalDETR"); its other settings are the keys above.
    c.CONDITIONAL = CN()
    # Mask the padding in the decoder's cross-attention (the original Conditional DETR). detrex's
    # implementation does not (in training its decoder attends padded memory): False reproduces
    # its training losses.
    c.CONDITIONAL.DECODER_PADDING_MASK = True

    # Contrastive denoising (DINO CDN).
    c.DN = CN()
    c.DN.ENABLED = True
    # Total DN queries per image (positive + negative, over all groups).
    c.DN.NUM_QUERIES = 100
    c.DN.LABEL_NOISE_RATIO = 0.5
    c.DN.BOX_NOISE_SCALE = 1.0

    # H-Deformable-DETR's hybrid branch (BASE "HDeformableDETR" only): a second query group,
    # kept apart from the NUM_QUERIES one-to-one queries in self-attention, trained one-to-many
    # and dropped at inference.
    c.HYBRID = CN()
    c.HYBRID.NUM_QUERIES = 1500
    # Queries per GT in that branch (H-DETR repeats every GT K times for its Hungarian matcher).
    c.HYBRID.K = 6
    # Weight of the one-to-many loss terms (H-DETR's lambda_one2many).
    c.HYBRID.WEIGHT = 1.0
    # Rank weights exp(-rank / LOSS.TAU) among each GT's K one-to-many positives, on the target
    # and the box terms (Align-DETR on H-DETR); H-DETR itself weighs them all 1.
    c.HYBRID.RANK_WEIGHTS = False

    # Matching costs (focal class cost, L1, GIoU), shared by every matched output.
    c.MATCHER = CN()
    c.MATCHER.COST_CLASS = 2.0
    c.MATCHER.COST_BBOX = 5.0
    c.MATCHER.COST_GIOU = 2.0

    c.LOSS = CN()
    # Classification loss: "focal" (DINO), "align" (Align-DETR) or "tal" (SD-DETR).
    c.LOSS.TYPE = "focal"
    # Focal loss alpha (the "focal" loss and the matcher's focal class cost).
    c.LOSS.FOCAL_ALPHA = 0.25
    # Quality-target exponent of the Align loss: t = s^ALPHA * IoU^(1 - ALPHA).
    c.LOSS.ALPHA = 0.25
    # Focusing exponent of every loss type and of the matcher's class cost.
    c.LOSS.GAMMA = 2.0
    # Rank-based down-weighting temperature (Align-DETR).
    c.LOSS.TAU = 1.5
    # Queries matched per GT, per matched output ([encoder, decoder layer 1, ..., last layer] on
    # DINO). One entry [k] is short for k on every output but the last, which stays one-to-one:
    # [1] is the DINO baseline, [2] Align-DETR. A full list gives each output its own k.
    c.LOSS.MATCH_K = [1]
    c.LOSS.CLASS_WEIGHT = 1.0
    c.LOSS.BBOX_WEIGHT = 5.0
    c.LOSS.GIOU_WEIGHT = 2.0

    # EMA of the weights, used for evaluation when enabled.
    c.EMA = CN()
    c.EMA.ENABLED = False
    c.EMA.DECAY = 0.9997

    # MobileNetV2 backbone (quickstart): ImageNet weights from the installed package.
    cfg.MODEL.MOBILENET_V2 = CN()
    cfg.MODEL.MOBILENET_V2.OUT_FEATURES = ["s8", "s16", "s32"]
    # Stages frozen from the stem: 0 trains everything.
    cfg.MODEL.MOBILENET_V2.FREEZE_AT = 1
    cfg.MODEL.MOBILENET_V2.PRETRAINED = True

    # Optimiser extras (detectron2's SOLVER has the rest).
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    # Learning-rate factor of the deformable attentions' sampling-offset projections (Deformable
    # / H-Deformable DETR's lr_linear_proj_mult: 0.1; DINO / Align-DETR: 1).
    cfg.SOLVER.LINEAR_PROJ_MULTIPLIER = 1.0
    # Weight decay of embeddings (nn.Embedding, *embed* parameters); norms use WEIGHT_DECAY_NORM.
    # The released DINO / Align-DETR recipe decays everything but norms: 1e-4, as WEIGHT_DECAY.
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 1e-4

    # DETR data pipeline: short sides of the resize before the random crop, in the crop branch
    # (detectron2's INPUT.CROP.* keys configure the crop itself).
    cfg.INPUT.CROP_PRE_RESIZE = (400, 500, 600)
    # Top-down imagery (aerial, satellite): rotate training images by a random multiple of 90
    # degrees (with RANDOM_FLIP "horizontal", all eight symmetries of the square).
    cfg.INPUT.RANDOM_ROTATE_90 = False


def load_config(config_file: str, opts: Sequence[str] = (), freeze: bool = True):
    """The config of a YAML file plus command-line overrides, with the align-detr keys, checked.

    Args:
        config_file: a YAML config (``_BASE_`` chains are followed).
        opts: ``KEY VALUE`` overrides, as on the command line.
        freeze: return a frozen config.

    Raises:
        FileNotFoundError: the config file does not exist.
        ConfigError: an unknown key (a typo, or a key of another project) or a value the model
            cannot run with, naming the key.
    """
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"config file not found: {os.path.abspath(config_file)}")
    cfg = get_cfg()
    add_align_detr_config(cfg)
    try:
        cfg.merge_from_file(config_file)
        cfg.merge_from_list(list(opts))
    except (KeyError, AssertionError, ValueError) as e:
        # yacs: KeyError "Non-existent config key" (files), AssertionError (command line), and
        # ValueError for an odd number of overrides.
        message = e.args[0] if e.args else str(e)
        raise ConfigError(
            f"Invalid config ({config_file} + command line): {message}. Every key must exist in "
            "detectron2's defaults or in align_detr/config.py (check the spelling)."
        ) from e
    validate_config(cfg)
    if freeze:
        cfg.freeze()
    return cfg


def resolve_match_k(match_k: Sequence[int], num_outputs: int) -> List[int]:
    """The per-output k of ``LOSS.MATCH_K``: a full list as is, one entry [k] expanded to
    ``[k] * (num_outputs - 1) + [1]`` (the last output, used at inference, stays one-to-one).

    Raises:
        ConfigError: a list of another length, or an entry that is not an integer >= 1.
    """
    values = list(match_k)
    if any(int(k) != k or k < 1 for k in values):
        raise ConfigError(
            f"MODEL.ALIGN_DETR.LOSS.MATCH_K entries must be integers >= 1, got {values}"
        )
    if len(values) == 1:
        return [int(values[0])] * (num_outputs - 1) + [1]
    if len(values) != num_outputs:
        raise ConfigError(
            f"MODEL.ALIGN_DETR.LOSS.MATCH_K has {len(values)} entries but this model has "
            f"{num_outputs} matched outputs (on DINO: the encoder, then each decoder layer); give "
            "one entry per output, or a single [k] for k on every output but the last"
        )
    return [int(k) for k in values]


def validate_config(cfg) -> None:
    """Checks every align-detr value the model and data pipeline need, before anything is built.

    Raises:
        ConfigError: listing every problem found, each naming its key.
    """
    c = cfg.MODEL.ALIGN_DETR
    problems = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    need(c.NUM_CLASSES >= 1, f"NUM_CLASSES must be >= 1, got {c.NUM_CLASSES}")
    need(c.NHEADS >= 1, f"NHEADS must be >= 1, got {c.NHEADS}")
    need(
        c.NHEADS >= 1 and c.D_MODEL % c.NHEADS == 0,
        f"D_MODEL ({c.D_MODEL}) must be divisible by NHEADS ({c.NHEADS})",
    )
    need(c.D_MODEL % 2 == 0, f"D_MODEL must be even (sine position encoding), got {c.D_MODEL}")
    need(c.NUM_QUERIES >= 1 and c.NUM_SELECT >= 1, "NUM_QUERIES and NUM_SELECT must be >= 1")
    need(
        c.TWO_STAGE_SELECTION in ("all", "valid"),
        f'TWO_STAGE_SELECTION must be "all" or "valid", got {c.TWO_STAGE_SELECTION!r}',
    )
    need(len(c.IN_FEATURES) >= 1, "IN_FEATURES must name at least one backbone feature")
    need(
        c.NUM_FEATURE_LEVELS >= len(c.IN_FEATURES),
        f"NUM_FEATURE_LEVELS ({c.NUM_FEATURE_LEVELS}) is below the {len(c.IN_FEATURES)} "
        "IN_FEATURES",
    )
    backbone_features = _backbone_out_features(cfg)
    if backbone_features is not None:
        missing = [f for f in c.IN_FEATURES if f not in backbone_features]
        need(
            not missing,
            f"IN_FEATURES {missing} are not among the backbone's outputs {list(backbone_features)} "
            f"(MODEL.BACKBONE.NAME {cfg.MODEL.BACKBONE.NAME})",
        )
    for part in ("ENCODER", "DECODER"):
        need(c[part].NUM_LAYERS >= 1, f"{part}.NUM_LAYERS must be >= 1, got {c[part].NUM_LAYERS}")
        need(c[part].N_POINTS >= 1, f"{part}.N_POINTS must be >= 1, got {c[part].N_POINTS}")
        need(0.0 <= c[part].DROPOUT < 1.0, f"{part}.DROPOUT must be in [0, 1)")
    need(
        not c.DECODER.TASK_AWARE_QUERIES or c.DECODER.DECOUPLED,
        "DECODER.TASK_AWARE_QUERIES needs DECODER.DECOUPLED: True (it generates one content "
        "query per stream)",
    )
    need(c.DECODER.TASK_AWARE_POINTS >= 1, "DECODER.TASK_AWARE_POINTS must be >= 1")
    need(
        c.DECODER.TASK_AWARE_POINT_PREDICTOR in ("token", "roi"),
        'DECODER.TASK_AWARE_POINT_PREDICTOR must be "token" or "roi", got '
        f"{c.DECODER.TASK_AWARE_POINT_PREDICTOR!r}",
    )
    for key in ("STREAM_POSITIONS", "STREAM_EMBED", "SPLIT_SELF_ATTN"):
        need(
            not c.DECODER[key] or c.DECODER.DECOUPLED,
            f"DECODER.{key} needs DECODER.DECOUPLED: True (it acts on the two streams)",
        )
    need(c.LOSS.TAU > 0, f"LOSS.TAU must be > 0, got {c.LOSS.TAU}")
    if c.DN.ENABLED:
        need(c.DN.NUM_QUERIES >= 1, f"DN.NUM_QUERIES must be >= 1, got {c.DN.NUM_QUERIES}")
        need(
            c.DN.NUM_QUERIES <= MAX_DN_QUERIES,
            f"DN.NUM_QUERIES must be <= {MAX_DN_QUERIES} (the DN + matching self-attention mask "
            f"grows with its square), got {c.DN.NUM_QUERIES}",
        )
    need(
        0.0 <= c.DN.LABEL_NOISE_RATIO <= 1.0,
        f"DN.LABEL_NOISE_RATIO must be in [0, 1], got {c.DN.LABEL_NOISE_RATIO}",
    )
    need(c.DN.BOX_NOISE_SCALE >= 0, f"DN.BOX_NOISE_SCALE must be >= 0, got {c.DN.BOX_NOISE_SCALE}")
    from .losses import CLASS_LOSSES  # the registered loss names (the losses load no model)

    need(
        c.LOSS.TYPE in CLASS_LOSSES,
        f"LOSS.TYPE must be one of {', '.join(CLASS_LOSSES)}, got {c.LOSS.TYPE!r}",
    )
    need(0.0 <= c.LOSS.ALPHA <= 1.0, f"LOSS.ALPHA must be in [0, 1], got {c.LOSS.ALPHA}")
    need(
        0.0 <= c.LOSS.FOCAL_ALPHA <= 1.0,
        f"LOSS.FOCAL_ALPHA must be in [0, 1], got {c.LOSS.FOCAL_ALPHA}",
    )
    need(c.LOSS.GAMMA >= 0, f"LOSS.GAMMA must be >= 0, got {c.LOSS.GAMMA}")
    for key in ("CLASS_WEIGHT", "BBOX_WEIGHT", "GIOU_WEIGHT"):
        need(c.LOSS[key] >= 0, f"LOSS.{key} must be >= 0, got {c.LOSS[key]}")
    for key in ("COST_CLASS", "COST_BBOX", "COST_GIOU"):
        need(c.MATCHER[key] >= 0, f"MATCHER.{key} must be >= 0, got {c.MATCHER[key]}")
    need(0.0 <= c.EMA.DECAY < 1.0, f"EMA.DECAY must be in [0, 1), got {c.EMA.DECAY}")

    base = _base_class(c.BASE)
    if base is None:
        from .modeling.bases import BASE_REGISTRY

        names = sorted(name for name, _ in BASE_REGISTRY)
        problems.append(f"BASE must be one of {names}, got {c.BASE!r}")
    else:
        try:
            resolve_match_k(c.LOSS.MATCH_K, base.num_matched_outputs(cfg))
        except ConfigError as e:
            problems.append(str(e).replace("MODEL.ALIGN_DETR.", ""))
        problems += base.check_config(cfg)
    if problems:
        raise ConfigError("invalid MODEL.ALIGN_DETR config: " + "; ".join(problems))


def _base_class(name: str):
    # The base registry lives with the model; imported here, not at module level, so that
    # loading the config keys never imports the model.
    from .modeling.bases import BASE_REGISTRY

    return BASE_REGISTRY.get(name) if name in BASE_REGISTRY else None


def _backbone_out_features(cfg):
    """Feature names the configured backbone gives, when this project knows its config keys."""
    name = cfg.MODEL.BACKBONE.NAME
    if name == "build_resnet_backbone":
        return list(cfg.MODEL.RESNETS.OUT_FEATURES)
    if name == "build_mobilenet_v2_backbone":
        return list(cfg.MODEL.MOBILENET_V2.OUT_FEATURES)
    return None  # another backbone: checked when the model is built
