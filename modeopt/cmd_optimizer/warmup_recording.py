"""The warm-up recording of :class:`~modeopt.CMDOptimizer`: a snapshot of the embeddable weights
every ``snapshot_every`` steps, into a bounded :class:`~modeopt.trajectories.trajectory.SnapshotBuffer`.

:class:`WarmupRecording` is a mixin of ``CMDOptimizer`` (after :class:`~modeopt.optim.nonfinite.NonFiniteGuard`,
whose policy decides what a snapshot with NaN/inf does): it reads the optimizer's settings
(``warmup_steps``, ``recluster_steps``, ``snapshot_every``, ``max_snapshots``, ``record_dtype``,
``record_dir``), its ``_layout`` / ``_emb_params`` and its step count.
"""

from __future__ import annotations

from modeopt.trajectories.snapshots import SnapshotBuffer

__all__ = ["WarmupRecording"]


class WarmupRecording:
    """Snapshots of the embeddable weights during a warm-up (``self._buffer``, None until the first)."""

    _record_pending: bool = False  # a snapshot is due and not taken yet: every step tries again

    @property
    def recording_bytes(self) -> int:
        """Bytes the warm-up recording holds now (RAM, or file with ``record_dir``)."""
        return 0 if self._buffer is None else self._buffer.nbytes

    def _record(self) -> None:
        # Until a snapshot is in, every step tries again: one skipped for NaN/inf weights, or one
        # whose file could not be allocated (record_dir on a full disk), is taken at the next step.
        retry, self._record_pending = self._record_pending, True
        bad = self._first_nonfinite()
        if bad is not None:
            self._check_nan_policy()
            if self.nan_policy == "raise":
                raise FloatingPointError(
                    f"modeopt: step {self._step}: parameter {bad!r} holds NaN/inf, so this snapshot was not "
                    "recorded (nan_policy='raise'); the recording is unchanged. Fix the divergence (lower the "
                    "learning rate, clip gradients) and resume from a checkpoint")
            if retry:  # the snapshot missed at an earlier step is still missing: counted once
                return
            self.skipped_snapshots += 1
            self._warn_once(
                "_warned_nan_snapshot",
                f"modeopt: step {self._step}: parameter {bad!r} holds NaN/inf: this snapshot is not recorded "
                "and the next finite weights are recorded instead (opt.skipped_snapshots counts the skips; "
                "this warning is given once). The weights are the base optimizer's: if they stay NaN/inf, "
                "fix the divergence", stacklevel=4)
            return
        if self._buffer is None:
            self._buffer = self._new_buffer(self.cycle)
        self._buffer.append(self._layout, self._emb_params, self._step)
        self._record_pending = False

    def _new_buffer(self, cycle: int) -> SnapshotBuffer:
        """An empty recording sized for the warm-up of embedding ``cycle`` (0: the first warm-up)."""
        steps = (self.warmup_steps if cycle == 0 else self.recluster_steps) // self.snapshot_every
        cap = steps if self.max_snapshots is None else min(steps, self.max_snapshots)
        return SnapshotBuffer(self._layout.n, dtype=self.record_dtype, capacity=cap, directory=self.record_dir)
