"""Phase hooks of the mode-space optimizers: the interface the layers above (``modeopt.distributed.ddp``,
``modeopt.cmd_optimizer.federated``, ``modeopt.integrations.hf``) use to hear that the trainable parameters changed.

The set of trainable parameters changes at the switch, at re-clustering, export and loads;
wrappers that captured it (DistributedDataParallel) must hear about it, and every rank must
decompose with the same seed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["PhaseHooks"]


class PhaseHooks:
    """Mixin: :meth:`register_phase_hook` and :attr:`step_count`. The host sets ``self._phase_hooks = []``
    and ``self._step`` in its ``__init__`` and calls ``self._fire(event)`` at each change of phase."""

    _phase_hooks: list[Callable[[Any, str], None]]
    _step: int

    def register_phase_hook(self, fn: Callable[[Any, str], None]) -> Callable[[], None]:
        """Call ``fn(opt, event)`` at every change of phase; returns a function that removes it.

        Events: ``"pre_embed"`` (the switch is about to decompose with ``opt.seed + opt.cycle``: a
        hook may still set ``opt.seed``), ``"embedded"`` (mode space entered), ``"unembedded"``
        (re-clustering returned to full training), ``"exported"`` and ``"loaded"`` (after
        ``load_state_dict`` or ``load_mode_space``). All but ``"pre_embed"`` mean the trainable
        parameters changed. The FSDP2 optimizer fires ``"embedded"``, ``"exported"`` and ``"loaded"``.
        """
        self._phase_hooks.append(fn)
        return lambda: self._phase_hooks.remove(fn) if fn in self._phase_hooks else None

    def _fire(self, event: str) -> None:
        for fn in list(self._phase_hooks):
            fn(self, event)

    @property
    def step_count(self) -> int:
        """Steps counted so far, over all phases (a skipped step is not counted; read-only)."""
        return self._step
