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
from typing import Sequence

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from .config_validation import (  # noqa: F401  (re-exported)
    MAX_DN_QUERIES,
    ConfigError,
    resolve_match_k,
    validate_config,
)

__all__ = [
    "ConfigError",
    "add_align_detr_config",
    "load_config",
    "resolve_match_k",
    "validate_config",
]


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
    # Number of foreground classes (80 for COCO); no background class (sigmoid scores). 0: from
    # the data, i.e. the categories of DATASETS.TRAIN_JSON (else TEST_JSON), else
    # len(CLASS_NAMES), else 80. load_config treats a config that does not set this key as 0 and
    # writes the resolved number here, so a saved config.yaml has it; the default stays 80 for
    # code that builds a config without load_config (detectron2's get_cfg + this function).
    c.NUM_CLASSES = 80
    # Class names, in the order of the model's class indices (for the demo's drawings). []: from
    # DATASETS.TRAIN_JSON / TEST_JSON when set (their categories sorted by id), else from the
    # dataset's metadata. A set value must agree with the json.
    c.CLASS_NAMES = []
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
    # Class-wise NMS over the kept detections at this IoU; 0 turns it off (the DETR default: the
    # one-to-one last layer learns not to duplicate). The released DINO code has the same option
    # (nms_iou_threshold); it helps short schedules whose last layer still duplicates.
    c.TEST_NMS_THRESH = 0.0
    # What runs the multi-scale deformable attention and the matching: "auto" (our compiled ops
    # where align_detr._C has a kernel for the device, else the PyTorch reference paths after one
    # warning), "compiled" (always ours; a missing build raises) or "reference" (always PyTorch:
    # grid_sample, dense cost + SciPy assignment). See align_detr/kernels.py.
    c.KERNELS = "auto"

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

    # A COCO-format dataset named on the command line, no Python needed: the instances json and
    # the folder its images' file_name entries are relative to ("": the json's folder). When a
    # json is set it is checked, registered with detectron2 as "coco_json_train" /
    # "coco_json_test", and DATASETS.TRAIN / DATASETS.TEST become that name (see
    # align_detr/data/coco_json.py). Category ids may be any integers (mapped to 0..K-1).
    cfg.DATASETS.TRAIN_JSON = ""
    cfg.DATASETS.TRAIN_IMAGES = ""
    cfg.DATASETS.TEST_JSON = ""
    cfg.DATASETS.TEST_IMAGES = ""

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

    # Test-time augmentation (detectron2's TEST.AUG.ENABLED switches it on): the detector runs on
    # the first VIEWS of the eight symmetries of the square (1, 2, 4 or 8; see
    # modeling/test_time_augmentation.py) and their detections are fused by weighted box fusion
    # at IoU > FUSION_IOU_THRESH. Scored after training and by --eval-only as "bbox_TTA", and
    # used by the demo. detectron2's multi-scale keys (TEST.AUG.MIN_SIZES, MAX_SIZE, FLIP) are
    # for its R-CNN TTA and not read here.
    cfg.TEST.AUG.VIEWS = 8
    cfg.TEST.AUG.FUSION_IOU_THRESH = 0.55


def load_config(config_file: str, opts: Sequence[str] = (), freeze: bool = True):
    """The config of a YAML file plus command-line overrides, with the align-detr keys, checked.

    Args:
        config_file: a YAML config (``_BASE_`` chains are followed).
        opts: ``KEY VALUE`` overrides, as on the command line.
        freeze: return a frozen config.

    Raises:
        FileNotFoundError: the config file does not exist (or a COCO json's image folder, or a
            json the number of classes must come from).
        ConfigError: an unknown key (a typo, or a key of another project) or a value the model
            cannot run with, naming the key.
        DatasetValidationError: a COCO json named by ``DATASETS.*_JSON`` has bad entries.
    """
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"config file not found: {os.path.abspath(config_file)}")
    cfg = get_cfg()
    add_align_detr_config(cfg)
    # "Not set": a value no config can mean otherwise, so that a file or command line that leaves
    # NUM_CLASSES alone gets it from the data (apply_coco_json_config below), while one that sets
    # it, to 80 included, is checked against the data.
    cfg.MODEL.ALIGN_DETR.NUM_CLASSES = 0
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
    # The jsons named by DATASETS.*_JSON: checked, registered, and the source of NUM_CLASSES /
    # CLASS_NAMES when unset. Here, because every entry point and every process that launch()
    # starts loads its config with this function. Imported here: the data package needs
    # detectron2's data modules, which a config alone does not.
    from .data.coco_json import apply_coco_json_config

    apply_coco_json_config(cfg)
    validate_config(cfg)
    if freeze:
        cfg.freeze()
    return cfg
