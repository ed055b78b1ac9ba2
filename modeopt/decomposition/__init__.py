"""Layer 2 - Correlation Mode Decomposition of a trajectory: sample K weights (:mod:`.sampling`), cluster
them into M modes (:mod:`.clustering`), assign every weight to its most correlated reference and fit
``a_i, b_i`` (:mod:`.decompose`)."""

from .algorithm import Decomposition, decompose

__all__ = ["Decomposition", "decompose"]
