"""Hugging Face ``Trainer`` support.

``CMDOptimizer`` needs nothing special to run inside the ``Trainer``
(``Trainer(optimizers=(opt, None))``). This callback only makes its phase visible: the
``Trainer`` logs the number of trainable parameters once, at the start, and would never say
that it dropped to ``n_modes`` at the switch.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback

from ..distributed import attach
from ..optimizer import CMDOptimizer

__all__ = ["CMDCallback", "find_cmd_optimizer"]

logger = logging.getLogger("modeopt")


def find_cmd_optimizer(optimizer: Any) -> CMDOptimizer | None:
    """The ``CMDOptimizer`` inside an optimizer wrapper (``AcceleratedOptimizer``), if any."""
    seen = 0
    while optimizer is not None and seen < 8:
        if isinstance(optimizer, CMDOptimizer):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return None


class CMDCallback(TrainerCallback):
    """Records every change of the optimizer's phase in ``trainer.state.log_history`` (saved in
    ``trainer_state.json``) as ``{"step", "cmd_phase", "cmd_cycle", "cmd_trainable_params"}``,
    logs it to the ``modeopt`` logger, and forces the Trainer's usual log line at that step.

    Under data parallelism (``torchrun``/``accelerate launch``, more than one process) it also
    calls :func:`modeopt.distributed.attach` on the optimizer at the start of training, so the
    ranks agree on the modes and the Trainer's DDP wrapper all-reduces the M mode scalars after the
    switch (see docs/scaling-out.md).

    Usage: ``Trainer(..., optimizers=(cmd_opt, None), callbacks=[CMDCallback()])``.
    """

    def __init__(self) -> None:
        self._last: tuple[str, int] | None = None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        opt = find_cmd_optimizer(optimizer)
        if opt is not None:
            self._last = (opt.phase, opt.cycle)
            if getattr(args, "world_size", 1) > 1:
                attach(opt)  # idempotent; finds the Trainer's DDP wrapper at its first forward
        return control

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        opt = find_cmd_optimizer(optimizer)
        if opt is None:
            return control
        now = (opt.phase, opt.cycle)
        if now != self._last:
            entry = {"step": state.global_step, "cmd_phase": opt.phase, "cmd_cycle": opt.cycle,
                     "cmd_trainable_params": opt.trainable_parameters()}
            state.log_history.append(entry)
            logger.info("modeopt: %s", entry)
            control.should_log = True
        self._last = now
        return control
