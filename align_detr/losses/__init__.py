from .align import align_cls_loss, quality_target, rank_weights
from .criterion import SetCriterion
from .focal import sigmoid_focal_loss

__all__ = [k for k in globals().keys() if not k.startswith("_")]
