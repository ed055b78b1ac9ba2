"""``OnlineCMD``: a shadow CMD model of an ordinary training, kept exact from running moments.

The follow-up CMD paper (Brokman et al., arXiv 2312.13247): during a normal training run,
record a window of snapshots, decompose it once (modes and reference weights are then fixed),
and from then on keep every weight's affine fit ``w_i ~= a_i * r_m(i) + b_i`` up to date over *all*
samples since the window began - without keeping any history. The evaluated model is ``a_i * r_t[m(i)] + b_i``
with ``r_t`` the references' current values: a shadow model, used like EMA or SWA; the training is untouched.

Numerics: Welford/Chan updates in float64 (:mod:`modeopt.online.running_moments`), since raw sums of
weights much larger than their movement cancel: per weight its mean and its co-moment with its
reference; per mode the reference's mean and second moment. ``a = C_i / M2_m``,
``b = mean_i - a * mean_r``.

Memory after the fit point, per modelled weight: mean (8 bytes) + co-moment (8) + mode label
(1 byte for M <= 256, 2 up to 65,536: :func:`~modeopt.modespace.kernels.label_dtype`) = 17 bytes, on every
device, and nothing that grows with time. Before it: the recording window, as in
:class:`~modeopt.TrajectoryRecorder` (always in host memory).

Devices: per weight state on its tensor's device, per mode state on the *reference device* (the first
modelled tensor's); after the fit, :meth:`OnlineCMD.update` never synchronises with the host (docs/online.md).
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from modeopt.modespace import kernels
from modeopt.decomposition.algorithm import decompose
from modeopt.trajectories.layout import ParamLayout, named_tensors, select_parameters
from modeopt.distributed.wrappers import sharding_wrapper, uses_fsdp2
from .running_moments import (MomentsPhase, cmd_weights, first_nonfinite, gather, gather_plan, per_device, replay_window, slopes,
                              split_labels, start_moments, welford_step)
from .shadow_checkpoint import CheckedOnlineState, check_online_settings, check_online_state
from modeopt.trajectories.snapshots import SnapshotBuffer
from modeopt.trajectories.trajectory import Trajectory, load_named_into

__all__ = ["OnlineCMD", "default_names"]


def default_names(model: nn.Module) -> list[str]:
    """Trainable floating-point parameters and floating-point buffers (BatchNorm statistics)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()]
    names += [n for n, b in model.named_buffers() if b.is_floating_point()]
    return names


def _float_names(model: nn.Module) -> set[str]:
    return {n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_floating_point()}


class OnlineCMD(MomentsPhase):
    """A CMD model of a training run, updated from running moments after a one-time fit.

    Args:
        model: the model being trained (it is read, never written, except by :meth:`applied`).
        n_modes: M.
        fit_at: ``update()`` calls (optimizer steps) after which the recorded window is decomposed.
        snapshot_every: record a snapshot every this many calls before the fit.
        sample_every: after the fit, add a sample to the running moments every this many calls
            (default ``snapshot_every``). Each sample is one pass over the weights.
        n_samples, seed: as in :func:`~modeopt.decompose` (``seed=None`` draws one from torch's RNG).
        names: tensors to model; default every trainable float parameter and every float buffer
            (BatchNorm running statistics are modelled too). A list of names or a predicate.
        max_snapshots: keep only the latest snapshots of the window (a ring, >= 3).
        record_dtype: storage of the window's snapshots (bfloat16 halves it).

    Raises ``ValueError`` at once for the set-ups :class:`~modeopt.CMDOptimizer` refuses (fewer than
    3 snapshots before ``fit_at``, ``n_modes > n_samples`` or above the number of modelled weights,
    non-integer counts).

    Attributes (read them; they change only through the methods):
        phase: ``"recording"`` until ``fit_at``, then ``"fitted"``.
        calls: :meth:`update` calls so far. ``count``: samples in the running moments.
        names, tensors: the modelled tensors (the model's own), in layout order; ``layout`` their rows.
        labels, mean, comoment: per modelled tensor, flat: mode labels (compact ints, index with
            :func:`kernels.as_index`), float64 mean and co-moment with the reference (empty when
            the tensor is frozen, see :meth:`freeze_tensor`). Empty lists before the fit.
        ref_index: per mode, ``(tensor, flat element)`` of its reference weight.
        mode_mean, mode_m2, ref_scale, ref_shift: ``(M,)`` float64 on :attr:`reference_device`.
        frozen_tensors: indices of the tensors that follow their references exactly.
        history: one dict per fit (step, n_modes, sizes, window).
    """

    #: float32 elements of the window uploaded at once per group of tensors during the replay.
    REPLAY_GROUP = 1 << 24

    def __new__(cls, model: Any = None, **kwargs: Any):
        # A fully_shard-ed (FSDP2) model gets the sharded shadow model (not a subclass: __init__ is not rerun)
        if cls is OnlineCMD and isinstance(model, nn.Module) and uses_fsdp2(model):
            from .sharded import ShardedOnlineCMD

            return ShardedOnlineCMD(model, **kwargs)
        return super().__new__(cls)

    def __init__(
        self,
        model: nn.Module,
        *,
        n_modes: int = 10,
        fit_at: int,
        snapshot_every: int = 1,
        sample_every: int | None = None,
        n_samples: int = 1000,
        seed: int | None = None,
        names: Sequence[str] | Callable[[str, Tensor], bool] | None = None,
        max_snapshots: int | None = None,
        record_dtype: torch.dtype = torch.float32,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if (sharded := sharding_wrapper(model)) is not None:  # FSDP2 is served by __new__
            raise TypeError(f"modeopt: OnlineCMD does not support a model sharded by {sharded} (docs/scaling-out.md)")
        check_online_settings(n_modes=n_modes, fit_at=fit_at, snapshot_every=snapshot_every, n_samples=n_samples,
                              sample_every=sample_every, max_snapshots=max_snapshots, seed=seed,
                              record_dtype=record_dtype)
        self.model = model
        self.n_modes = n_modes
        self.fit_at = fit_at
        self.snapshot_every = snapshot_every
        self.sample_every = snapshot_every if sample_every is None else sample_every
        self.n_samples = n_samples
        self.seed = int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None else int(seed)
        chosen = select_parameters(model, default_names(model) if names is None else names)
        self._names = [n for n, _ in chosen]
        self._tensors = [t for _, t in chosen]
        self.layout = ParamLayout.from_named_tensors(chosen)
        if n_modes > self.layout.n:
            raise ValueError(f"n_modes={n_modes} > the {self.layout.n} weights modelled: ask for fewer modes")
        cap = fit_at // snapshot_every
        self._record_dtype = record_dtype
        self._capacity = cap if max_snapshots is None else min(cap, max_snapshots)
        self._buffer: SnapshotBuffer | None = self._new_buffer()
        self.skipped_snapshots = 0  # recording-phase snapshots not taken because a tensor held NaN/inf
        self._record_pending = False
        self.phase = "recording"
        self.calls = 0
        self.labels: list[Tensor] = []
        self.mean: list[Tensor] = []
        self.comoment: list[Tensor] = []
        self.ref_index: list[tuple[int, int]] = []
        # r_m = (w_ref - ref_shift[m]) / ref_scale[m]: identity until a reference is handed off to
        # another weight of its mode (gradual embedding froze the tensor that held it).
        self.ref_scale = torch.ones(0, dtype=torch.float64)
        self.ref_shift = torch.zeros(0, dtype=torch.float64)
        self.mode_mean = torch.zeros(0, dtype=torch.float64)
        self.mode_m2 = torch.zeros(0, dtype=torch.float64)
        self.count = 0
        self._ref_plan: tuple | None = None  # how references_now() gathers (built from ref_index)
        self.history: list[dict[str, Any]] = []
        self.frozen_tensors: set[int] = set()
        self._model_ids = tuple(id(t) for t in model.parameters()) + tuple(id(t) for t in model.buffers())
        self._all_names = _float_names(model)

    def _new_buffer(self) -> SnapshotBuffer:
        return SnapshotBuffer(self.layout.n, dtype=self._record_dtype, capacity=self._capacity)

    @property
    def names(self) -> list[str]:
        """Names of the modelled tensors, in layout order (do not modify the list)."""
        return self._names

    @property
    def tensors(self) -> list[Tensor]:
        """The modelled tensors themselves (the model's parameters/buffers), in layout order."""
        return self._tensors

    @property
    def reference_device(self) -> torch.device:
        """Where the per-mode state lives: the device of the first modelled tensor."""
        return self._tensors[0].device

    @torch.no_grad()
    def update(self) -> None:
        """Call once after every optimizer step. Never raises on the training's behalf: a fit that
        cannot be made (NaN/inf weights) is reported with a warning and retried at the next step."""
        self.calls += 1
        if self.phase == "recording":
            if self.calls % self.snapshot_every == 0 or self._record_pending:
                self._check_model()
                self._record()
            if self.calls >= self.fit_at:
                self._fit()
        elif self.calls % self.sample_every == 0:
            self._check_model()
            self.add_sample()

    @torch.no_grad()
    def add_sample(self) -> None:
        """Fold the weights' current values into the running moments now (what :meth:`update` does
        every ``sample_every`` calls after the fit): one pass over the weights, no host sync."""
        self.check_fitted()
        dr_after = self._mode_sample(self.references_now())
        welford_step([t.reshape(-1) for t in self._tensors], self.mean, self.comoment, self.labels, dr_after,
                     self.count, self.frozen_tensors)

    def _check_model(self) -> None:
        # Identity of the model's tensors: a parameter added, removed or replaced after construction
        # would otherwise be modelled stale, silently.
        ids = tuple(id(t) for t in self.model.parameters()) + tuple(id(t) for t in self.model.buffers())
        if ids != self._model_ids:
            self.check_layout()
            now = _float_names(self.model)
            if now != self._all_names:
                added, removed = sorted(now - self._all_names), sorted(self._all_names - now)
                raise ValueError(f"the model changed after the OnlineCMD was built (added: {added}, removed: "
                                 f"{removed}): it models a fixed set of tensors; build a new OnlineCMD for the new model")
            self._model_ids = ids

    def _nonfinite_snapshot(self) -> str | None:
        return first_nonfinite(self._names, self._tensors)

    def _append_snapshot(self) -> None:
        self._buffer.append(self.layout, self._tensors, self.calls)

    def _fit(self) -> None:
        bad = first_nonfinite(self._names, self._tensors)
        if bad is not None:
            warnings.warn(f"OnlineCMD cannot fit at step {self.calls}: {bad!r} holds NaN/inf. Training goes on "
                          "(this is a shadow model); the fit is retried at the next step", stacklevel=3)
            return
        data, steps = self._buffer.raw()
        traj = Trajectory(data, self.layout, steps, self._buffer.anchor)
        rdev = self.reference_device
        try:
            d = decompose(traj, n_modes=self.n_modes, n_samples=self.n_samples, seed=self.seed, device=rdev)
        except ValueError as e:  # e.g. NaN/inf in a recorded snapshot: wait for a clean window
            warnings.warn(f"OnlineCMD cannot fit at step {self.calls}: {e}. Training goes on; the fit is retried "
                          "at the next step", stacklevel=3)
            return
        rows, sizes, labels = d.reference.tolist(), d.sizes.tolist(), d.labels
        del d  # the other (N,) results (a, b, score): not kept, freed before the moments are allocated
        self.labels = split_labels(labels, len(rows), self.layout, self._tensors)
        del labels
        self.ref_index, self.mean, self.comoment = start_moments(rows, self.layout, self._tensors)
        self._ref_plan = None
        self.n_modes = len(rows)
        f64 = dict(dtype=torch.float64, device=rdev)
        self.ref_scale, self.ref_shift = torch.ones(self.n_modes, **f64), torch.zeros(self.n_modes, **f64)
        self.mode_mean, self.mode_m2 = torch.zeros(self.n_modes, **f64), torch.zeros(self.n_modes, **f64)
        self.count = 0
        # The window's samples go through the same updates: at the fit point the moments are
        # exactly the batch least-squares over the window, and later samples extend them.
        replay_window(traj, sorted(range(len(steps)), key=lambda j: steps[j]), torch.tensor(rows, dtype=torch.long),
                      self._tensors, self.mean, self.comoment, self.labels, self._mode_sample, self.REPLAY_GROUP)
        self._buffer = None
        self.phase = "fitted"
        self.history.append({"step": self.calls, "n_modes": self.n_modes, "sizes": sizes, "window": len(steps)})

    def references_now(self) -> Tensor:
        """``(M,)`` float64 on the reference device: the modes' reference profiles now (the reference
        weights' values, in the units of the original references after a :meth:`hand_off`); no host sync."""
        if self._ref_plan is None:  # rebuilt once per change of ref_index (fit, hand-off, load)
            self._ref_plan = gather_plan(self.ref_index, self._tensors, self.reference_device)
        raw = gather([t.detach().reshape(-1) for t in self._tensors], self._ref_plan, self.reference_device)
        return (raw - self.ref_shift) / self.ref_scale

    def reference_variance(self) -> Tensor:
        """``(M,)`` float64 on the reference device: each reference's variance over the samples so far."""
        return self.mode_m2 / max(self.count, 1)

    def hand_off(self, mode: int, tensor: int, index: int, a: float, b: float) -> None:
        """Make weight ``index`` of tensor ``tensor`` (a member of ``mode`` with fit ``a, b``) carry
        the mode's reference profile: ``r = (w - b) / a`` from now on.

        Every fit stays expressed in the same ``r``, so frozen weights, the running moments and the
        other references are untouched. Used by gradual embedding to freeze the tensor that held
        the old reference. Raises ``ValueError`` unless ``a`` is finite and non-zero (``|a|`` should
        be far from 0), ``RuntimeError`` before the fit.
        """
        self.check_fitted()
        if not (math.isfinite(a) and math.isfinite(b)) or a == 0.0:
            raise ValueError(f"hand_off needs a finite, non-zero slope a (got a={a}, b={b})")
        self.ref_index[mode] = (int(tensor), int(index))
        self._ref_plan = None
        self.ref_scale[mode] = float(a)
        self.ref_shift[mode] = float(b)

    def _mode_sample(self, r: Tensor) -> Tensor:
        """The per-mode half of a Welford/Chan step: n += 1; mean_r, M2_r. Returns ``r - mean_r`` after."""
        self.count += 1
        n = self.count
        dr = r - self.mode_mean
        self.mode_mean += dr / n
        dr_after = r - self.mode_mean
        self.mode_m2 += dr * dr_after
        return dr_after

    def coefficients(self) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Per tensor: ``labels`` (compact ints: index with ``kernels.as_index``), ``a`` and ``b`` (float64,
        flat) of the current fit, on the tensor's device (a frozen tensor's entries are empty)."""
        self.check_fitted()
        per_mode = per_device(self.mode_m2, self.mode_mean)
        a, b = [], []
        for t, (mean, com, lab) in enumerate(zip(self.mean, self.comoment, self.labels)):
            if t in self.frozen_tensors:  # moments freed: the caller holds the frozen coefficients
                a.append(com)
                b.append(mean)
                continue
            var_m, mean_m = per_mode(lab.device)
            idx = kernels.as_index(lab)
            a.append(slopes(com, var_m[idx]))
            b.append(mean - a[-1] * mean_m[idx])
        return self.labels, a, b

    def cmd_state_dict(self) -> dict[str, Tensor]:
        """The CMD weights ``a_i * r_now[m(i)] + b_i``, named like the model's tensors.

        Before the fit the model's own (raw) values are returned.
        """
        if self.phase != "fitted":
            return self._with_aliases({n: t.detach().clone() for n, t in zip(self._names, self._tensors)})
        out = cmd_weights(self._names, self._tensors, self.mean, self.comoment, self.labels, self.mode_m2,
                          self.references_now() - self.mode_mean, self.frozen_tensors)
        return self._with_aliases(out)

    def _with_aliases(self, out: dict[str, Tensor]) -> dict[str, Tensor]:
        """Add every other name a modelled tensor is reachable under (tied weights: an embedding that is
        also the decoder), so that ``model.load_state_dict(..., strict=True)`` finds all its keys."""
        canonical = {id(t): n for n, t in zip(self._names, self._tensors)}
        for alias, t in named_tensors(self.model):
            if id(t) in canonical and alias not in out:
                out[alias] = out[canonical[id(t)]]
        return out

    def averaged_model(self) -> nn.Module:
        """A copy of the model holding the CMD weights (like ``AveragedModel.module``)."""
        clone = copy.deepcopy(self.model)
        load_named_into(clone, self.cmd_state_dict())
        return clone

    def load_into(self, model: nn.Module) -> None:
        """Write the CMD weights into ``model`` (same architecture), in place."""
        load_named_into(model, self.cmd_state_dict())

    @contextlib.contextmanager
    def applied(self) -> Iterator[nn.Module]:
        """Temporarily put the CMD weights into the tracked model (e.g. to evaluate it), then restore
        the raw weights exactly. Yields the model."""
        raw = {n: t.detach().clone() for n, t in zip(self._names, self._tensors)}
        load_named_into(self.model, self.cmd_state_dict())
        try:
            yield self.model
        finally:
            load_named_into(self.model, raw)

    def freeze_tensor(self, t: int) -> None:
        """Stop tracking tensor ``t`` (it now follows its references exactly): its moments are freed."""
        self.frozen_tensors.add(t)
        self.mean[t] = self.mean[t].new_zeros(0)
        self.comoment[t] = self.comoment[t].new_zeros(0)


    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only (``torch.load(weights_only=True)`` reads it). The tensors are
        the live ones, on their devices: load with ``map_location`` to read them elsewhere; any
        device's state loads on any other (:meth:`load_state_dict` moves them)."""
        return {
            "version": 1, "phase": self.phase, "calls": self.calls, "seed": self.seed, "names": list(self._names),
            "n_modes": self.n_modes, "count": self.count, "history": [dict(h) for h in self.history],
            "buffer": None if self._buffer is None else self._buffer.state_dict(),
            "labels": self.labels, "mean": self.mean, "comoment": self.comoment,
            "ref_index": [list(x) for x in self.ref_index], "mode_mean": self.mode_mean, "mode_m2": self.mode_m2,
            "ref_scale": self.ref_scale, "ref_shift": self.ref_shift,
            "frozen_tensors": sorted(self.frozen_tensors),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`. Everything is checked first (:meth:`check_state_dict`): a state
        that does not fit raises ``ValueError`` and changes nothing. Then the tensors are copied to where
        this model's tensors are (labels in the compact dtype), whatever device they were saved on."""
        self.load_checked_state(self.check_state_dict(sd))

    def check_state_dict(self, sd: Any) -> CheckedOnlineState:
        """Validate a :meth:`state_dict` against this model without changing anything (``ValueError``
        saying what does not fit); the result loads with :meth:`load_checked_state`, which cannot fail."""
        self.check_layout()
        return check_online_state(sd, names=self._names, tensors=self._tensors, n_samples=self.n_samples,
                                  new_buffer=self._new_buffer)

    def load_checked_state(self, checked: CheckedOnlineState) -> None:
        """Load a state that :meth:`check_state_dict` accepted; nothing here raises."""
        sd, buffer = checked.state, checked.buffer
        if sd["phase"] == "recording" and int(sd["n_modes"]) != self.n_modes:
            # the fit to come uses the saved run's M, like its seed (after the fit M is the fit's own)
            warnings.warn(f"OnlineCMD: the state was recorded for n_modes={int(sd['n_modes'])}; this OnlineCMD was "
                          f"built with n_modes={self.n_modes}: online.n_modes is now {int(sd['n_modes'])}, as in the "
                          "state", stacklevel=3)
        self.phase, self.calls, self.seed = sd["phase"], int(sd["calls"]), int(sd["seed"])
        self.n_modes, self.count = int(sd["n_modes"]), int(sd["count"])
        self.history = [dict(h) for h in sd["history"]]
        self._buffer = buffer
        self._record_pending = False
        moved = checked.on_devices([t.device for t in self._tensors], self.reference_device)
        self.labels, self.mean, self.comoment = moved["labels"], moved["mean"], moved["comoment"]
        self.mode_mean, self.mode_m2 = moved["mode_mean"], moved["mode_m2"]
        self.ref_scale, self.ref_shift = moved["ref_scale"], moved["ref_shift"]
        self.ref_index = [tuple(int(v) for v in x) for x in sd["ref_index"]]
        self._ref_plan = None
        self.frozen_tensors = {int(t) for t in sd.get("frozen_tensors", [])}
        if self.phase == "fitted":
            # validated above; registered now (one sync) so that the first update() after the load needs none
            kernels.check_labels(self.labels, self.n_modes)

    def check_layout(self) -> None:
        """Raise if a modelled tensor was removed from or replaced in the model since construction."""
        current = dict(self.model.named_parameters())
        current.update(dict(self.model.named_buffers()))
        for spec, t in zip(self.layout.specs, self._tensors):
            now = current.get(spec.name)
            if now is not t:
                what = "removed from" if now is None else "replaced in"
                raise ValueError(f"tensor {spec.name!r} of the CMD model was {what} the model after the OnlineCMD was "
                                 "built: it models a fixed set of tensors; build a new OnlineCMD for the new model")
