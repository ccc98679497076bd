"""DETR matching: compiled matching cost, one-to-one and many-to-one assignment, matchers."""

from .assignment import assign, assign_flat, assign_scipy, effective_k
from .cost import matching_cost
from .matcher import HungarianMatcher, ManyToOneMatcher

__all__ = [
    "HungarianMatcher",
    "ManyToOneMatcher",
    "assign",
    "assign_flat",
    "assign_scipy",
    "effective_k",
    "matching_cost",
]
