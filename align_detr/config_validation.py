# Copyright (c) align-detr contributors.
"""Checks of a merged align-detr config: :func:`validate_config` (every value the model and the
data pipeline need, before anything heavy starts), :func:`resolve_match_k` and
:class:`ConfigError`. :mod:`align_detr.config` re-exports them; import them from there.
"""

from typing import List, Sequence

__all__ = ["ConfigError", "MAX_DN_QUERIES", "resolve_match_k", "validate_config"]

#: Upper bound of DN.NUM_QUERIES (DINO uses 100 with 900 matching queries): the DN + matching
#: self-attention mask grows with its square.
MAX_DN_QUERIES = 2000


class ConfigError(ValueError):
    """A config with an unknown key or a value the model cannot run with."""


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
    _validate_test_aug(cfg)
    c = cfg.MODEL.ALIGN_DETR
    problems = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    need(c.NUM_CLASSES >= 1, f"NUM_CLASSES must be >= 1, got {c.NUM_CLASSES}")
    need(
        not c.CLASS_NAMES or len(c.CLASS_NAMES) == c.NUM_CLASSES,
        f"CLASS_NAMES has {len(c.CLASS_NAMES)} names but NUM_CLASSES is {c.NUM_CLASSES}",
    )
    need(
        c.KERNELS in ("auto", "compiled", "reference"),
        f'KERNELS must be "auto", "compiled" or "reference", got {c.KERNELS!r}',
    )
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


def _validate_test_aug(cfg) -> None:
    # imported here, as the losses above: loading the config keys never imports the model
    from .modeling.test_time_augmentation import tta_setting_problems

    problems = tta_setting_problems(cfg.TEST.AUG.VIEWS, cfg.TEST.AUG.FUSION_IOU_THRESH)
    if problems:
        raise ConfigError("invalid TEST.AUG config: " + "; ".join(problems))


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
