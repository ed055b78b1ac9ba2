"""Trainer - online CMD: :class:`OnlineCMD`, a shadow model kept exact from Welford moments during ordinary
training (like EMA/SWA), and :class:`OnlineCMDOptimizer` (the eval/train swap, gradual embedding); their
checkpoint checks and the FSDP2 twin (:mod:`.sharded`, returned by ``OnlineCMD(...)`` for a sharded model)."""

from .optimizer import OnlineCMDOptimizer
from .shadow import OnlineCMD

__all__ = ["OnlineCMD", "OnlineCMDOptimizer"]
