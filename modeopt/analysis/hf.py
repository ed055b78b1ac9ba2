"""Recording a Hugging Face ``Trainer`` run for analysis (imports ``transformers``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from transformers import TrainerCallback

from ..trajectory import Trajectory
from .recording import Recording, check_schedule

__all__ = ["TrajectoryCallback"]


class TrajectoryCallback(TrainerCallback):
    """Snapshots the Trainer's model every ``every`` optimizer steps or epochs.

    Takes the arguments of :class:`~modeopt.analysis.Recording` (except the model, which the
    Trainer passes in, and ``resume_from``). Counts are the Trainer's: ``state.global_step`` for
    steps, finished epochs for epochs. A training resumed from a checkpoint continues them and,
    with a ``directory``, continues the same snapshot directory (snapshots taken after the
    checkpoint by the interrupted run are replaced). Only the main process records.

    Usage::

        cb = TrajectoryCallback(every=10, directory="runs/bert")
        Trainer(..., callbacks=[cb]).train()
        traj = cb.trajectory()            # or: modeopt analyze runs/bert --modes 10 --out report/
    """

    def __init__(
        self,
        *,
        every: int = 1,
        unit: str = "step",
        start: int = 0,
        initial: bool = False,
        directory: str | os.PathLike | None = None,
        names: Sequence[str] | Callable[[str, Tensor], bool] | None = None,
        dtype: torch.dtype = torch.float32,
        max_snapshots: int | None = None,
    ):
        self._kwargs = dict(every=every, unit=unit, start=start, directory=directory, names=names, dtype=dtype,
                            max_snapshots=max_snapshots)
        self._initial = initial
        self._model = None
        self._started = False
        self.recording: Recording | None = None
        check_schedule(every, unit, start)
        if directory is not None and max_snapshots is not None:
            raise ValueError("give one of directory= or max_snapshots=")

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("TrajectoryCallback got no model from the Trainer")
        self._model = model
        self._started = False
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        # The Trainer restores a resumed run's state (global_step, epoch) after on_train_begin:
        # the recording starts here, where the state is known.
        if self._started or not state.is_world_process_zero:
            return control
        self._started = True
        count = int(state.global_step) if self._kwargs["unit"] == "step" else int(state.epoch or 0)
        resume = count if state.global_step > 0 else None
        if self.recording is None or self.recording.model is not self._model or resume is not None:
            self.recording = Recording(self._model, resume_from=resume, **self._kwargs)
        rec = self.recording
        rec.steps, rec.epochs = int(state.global_step), int(state.epoch or 0)
        if self._initial and resume is None and rec.start == 0 and rec.n_snapshots == 0:
            rec.snapshot()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.recording is not None and state.is_world_process_zero:
            self.recording.step(state.global_step)
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
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
