"""Trainer - :class:`CMDOptimizer`: warm-up recording, the switch, training in mode space,
re-clustering and export; its checkpoints; its FSDP2 twin (:mod:`.sharded`, returned by
``CMDOptimizer(...)`` for a ``fully_shard`` model); federated averaging in mode space (:mod:`.federated`)."""

from .optimizer import CMDOptimizer

__all__ = ["CMDOptimizer"]
