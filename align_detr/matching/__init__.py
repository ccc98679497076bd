"""DETR matching: compiled matching cost, one-to-one and many-to-one assignment, the matcher."""

from .assignment import assign, assign_flat, assign_scipy, effective_k
from .cost import matching_cost
from .cost_reference import matching_cost_reference
from .matcher import HungarianMatcher

__all__ = [
    "HungarianMatcher",
    "assign",
    "assign_flat",
    "assign_scipy",
    "effective_k",
    "matching_cost",
    "matching_cost_reference",
]
