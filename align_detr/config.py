"""Config keys of align-detr. Every model option lives under ``MODEL.ALIGN_DETR``.

Defaults are those of the papers' recipes (DINO-4scale R50 + Align-DETR, see
shared reference notes); ``configs/*.yaml`` only override what differs.
"""

from detectron2.config import CfgNode as CN


def add_align_detr_config(cfg):
    """Adds the align-detr keys (with their defaults) to a detectron2 config, in place."""
    cfg.MODEL.ALIGN_DETR = CN()
    c = cfg.MODEL.ALIGN_DETR
    # Number of foreground classes (80 for COCO); no background class (sigmoid scores).
    c.NUM_CLASSES = 80
    # Transformer width, heads, and feature levels (3 backbone stages + 1 extra stride-2 level).
    c.D_MODEL = 256
    c.NHEADS = 8
    c.NUM_FEATURE_LEVELS = 4
    # Backbone feature maps fed to the neck, finest first (ResNet: res3..res5).
    c.IN_FEATURES = ["res3", "res4", "res5"]
    # Matching queries selected from the encoder (two-stage) and kept for the decoder.
    c.NUM_QUERIES = 900
    # Detections kept per image at inference: top-k over (query x class) sigmoid scores.
    c.NUM_SELECT = 300

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

    # Contrastive denoising (DINO CDN).
    c.DN = CN()
    c.DN.ENABLED = True
    # Total DN queries per image (positive + negative, over all groups).
    c.DN.NUM_QUERIES = 100
    c.DN.LABEL_NOISE_RATIO = 0.5
    c.DN.BOX_NOISE_SCALE = 1.0

    # Matching costs (focal class cost, L1, GIoU), shared by every matched output.
    c.MATCHER = CN()
    c.MATCHER.COST_CLASS = 2.0
    c.MATCHER.COST_BBOX = 5.0
    c.MATCHER.COST_GIOU = 2.0

    c.LOSS = CN()
    # Classification loss: "focal" (DINO), "align" (Align-DETR) or "tal" (SD-DETR).
    c.LOSS.TYPE = "focal"
    # Focal loss alpha/gamma ("focal") ; ALPHA is the quality-target exponent for "align".
    c.LOSS.FOCAL_ALPHA = 0.25
    c.LOSS.ALPHA = 0.25
    c.LOSS.GAMMA = 2.0
    # Rank-based down-weighting temperature (Align-DETR).
    c.LOSS.TAU = 1.5
    # Queries matched per GT, per output: [encoder, decoder layer 1, ..., decoder layer N].
    # One-to-one everywhere is the DINO baseline; Align-DETR uses [2, 2, 2, 2, 2, 2, 1].
    c.LOSS.MATCH_K = [1, 1, 1, 1, 1, 1, 1]
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
    # Weight decay of embeddings (nn.Embedding, *embed* parameters); norms use WEIGHT_DECAY_NORM.
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0

    # DETR data pipeline: short sides for training, and the crop branch of the DETR recipe.
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE = "absolute_range"
    cfg.INPUT.CROP.SIZE = (384, 600)
    # Short sides of the resize before the crop, in the crop branch.
    cfg.INPUT.CROP_PRE_RESIZE = (400, 500, 600)
