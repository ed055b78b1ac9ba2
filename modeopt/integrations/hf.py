"""Hugging Face ``Trainer`` support (imports ``transformers``: ``pip install 'modeopt[hf]'``).

* :class:`CMDCallback` - ``CMDOptimizer`` needs nothing special to run inside the ``Trainer``
  (``Trainer(optimizers=(opt, None))``). This callback only makes its phase visible: the
  ``Trainer`` logs the number of trainable parameters once, at the start, and would never say
  that it dropped to ``n_modes`` at the switch.
* :class:`TrajectoryCallback` - records the Trainer's model for analysis, as
  :class:`~modeopt.analysis.Recording` does in a plain loop.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(f"modeopt.integrations.hf needs transformers: pip install 'modeopt[hf]' ({e})") from e

from modeopt.analysis.recording import Recording, recording_options
from modeopt.distributed.ddp import attach
from modeopt.cmd_optimizer.optimizer import CMDOptimizer
from modeopt.cmd_optimizer.sharded import ShardedCMDOptimizer
from modeopt.trajectories.trajectory import Trajectory

__all__ = ["CMDCallback", "TrajectoryCallback", "find_cmd_optimizer"]

logger = logging.getLogger("modeopt")


def find_cmd_optimizer(optimizer: Any) -> CMDOptimizer | ShardedCMDOptimizer | None:
    """The ``CMDOptimizer`` (or its FSDP2 form) inside an optimizer wrapper (``AcceleratedOptimizer``), if any."""
    seen = 0
    while optimizer is not None and seen < 8:
        if isinstance(optimizer, (CMDOptimizer, ShardedCMDOptimizer)):
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

    **The Trainer's own optimizer** (FSDP): with CMDOptimizer's keyword arguments,
    ``CMDCallback(n_modes=10, warmup_steps=500, ...)`` wraps the optimizer the Trainer built (its
    ``optim``, learning rate and scheduler) in a ``CMDOptimizer`` when training begins, after
    Accelerate prepared the model. This is the way under FSDP, where the Trainer refuses
    ``optimizers=``: Accelerate has then ``fully_shard``-ed the model, so the wrapper is the sharded
    one (docs/scaling-out.md). Without FSDP it is the plain one (attached to DDP as above).
    """

    def __init__(self, **cmd_options: Any) -> None:
        self._last: tuple[str, int] | None = None
        self.cmd_options = cmd_options

    def on_train_begin(self, args, state, control, optimizer=None, model=None, **kwargs):
        """Wrap the Trainer's optimizer if asked to; note the phase; under DDP, attach it to the process group."""
        opt = find_cmd_optimizer(optimizer)
        if opt is None and self.cmd_options and optimizer is not None and model is not None:
            opt = self._wrap(optimizer, model)
        if opt is not None:
            self._last = (opt.phase, opt.cycle)
            if getattr(args, "world_size", 1) > 1 and not getattr(opt, "sharded", False):
                attach(opt)  # idempotent; finds the Trainer's DDP wrapper at its first forward
        return control

    def _wrap(self, optimizer: Any, model: Any) -> Any:
        """Put a CMDOptimizer between the Trainer's optimizer wrapper (Accelerate's) and the plain optimizer."""
        holder, inner = None, optimizer
        while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):
            holder, inner = inner, inner.optimizer
        if holder is None:
            raise TypeError("modeopt: CMDCallback(**options) wraps the optimizer inside the Trainer's optimizer "
                            f"wrapper (Accelerate's AcceleratedOptimizer); got a bare {type(optimizer).__name__}: "
                            "pass the CMDOptimizer with Trainer(optimizers=(opt, None)) instead")
        opt = CMDOptimizer(model, inner, **self.cmd_options)
        holder.optimizer = opt  # Accelerate's wrapper reads param_groups/state through .optimizer: the
        return opt              # scheduler built on it keeps driving the same group dicts

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        """Log a change of the optimizer's phase (or cycle) since the last step."""
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


class TrajectoryCallback(TrainerCallback):
    """Snapshots the Trainer's model every ``every`` optimizer steps or epochs.

    Takes the keyword arguments of :class:`~modeopt.analysis.Recording` (``every``, ``unit``,
    ``start``, ``initial``, ``directory``, ``names``, ``dtype``, ``max_snapshots``; not the model,
    which the Trainer passes in, nor ``resume_from``), checked here. Counts are the Trainer's: ``state.global_step`` for
    steps, finished epochs for epochs. A training resumed from a checkpoint continues them and,
    with a ``directory``, continues the same snapshot directory (snapshots taken after the
    checkpoint by the interrupted run are replaced). Only the main process records.

    Usage::

        cb = TrajectoryCallback(every=10, directory="runs/bert")
        Trainer(..., callbacks=[cb]).train()
        traj = cb.trajectory()            # or: modeopt analyze runs/bert --modes 10 --out report/
    """

    def __init__(self, **options: Any):
        self._options = recording_options(**options)
        self._initial = self._options.pop("initial")
        self._model = None
        self._started = False
        self.recording: Recording | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        """Keep the Trainer's model; the recording starts at the first step."""
        if model is None:
            raise ValueError("TrajectoryCallback got no model from the Trainer")
        self._model = model
        self._started = False
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        """Start (or resume) the recording at the first step of a training."""
        # The Trainer restores a resumed run's state (global_step, epoch) after on_train_begin:
        # the recording starts here, where the state is known.
        if self._started or not state.is_world_process_zero:
            return control
        self._started = True
        count = int(state.global_step) if self._options["unit"] == "step" else int(state.epoch or 0)
        resume = count if state.global_step > 0 else None
        if self.recording is None or self.recording.model is not self._model or resume is not None:
            self.recording = Recording(self._model, resume_from=resume, **self._options)
        rec = self.recording
        rec.steps, rec.epochs = int(state.global_step), int(state.epoch or 0)
        if self._initial and resume is None and rec.start == 0 and rec.n_snapshots == 0:
            rec.snapshot()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        """Count the step (the Trainer's ``global_step``); snapshot if due."""
        if self.recording is not None and state.is_world_process_zero:
            self.recording.step(state.global_step)
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        """Count a finished epoch; snapshot if due."""
        if self.recording is not None and state.is_world_process_zero and state.epoch is not None:
            e = float(state.epoch)
            if abs(e - round(e)) < 1e-6:  # a whole epoch (not the end of a max_steps run mid-epoch)
                self.recording.epoch(round(e))
        return control

    def trajectory(self, *, progress: bool | None = None) -> Trajectory:
        """The snapshots recorded so far."""
        if self.recording is None:
            raise RuntimeError("nothing recorded yet: pass the callback to a Trainer and train")
        return self.recording.trajectory(progress=progress)
