"""Online CMD: a shadow CMD model of an ordinary training, kept exact from running moments.

The follow-up CMD paper (Brokman et al., arXiv 2312.13247): during a normal training run,
record a window of snapshots, decompose it once (modes and reference weights are then fixed),
and from then on keep every weight's affine fit ``w_i ~= a_i * r_m(i) + b_i`` up to date over *all*
samples since the window began - without keeping any history. The evaluated model is
``a_i * r_t[m(i)] + b_i`` with ``r_t`` the references' current values: a shadow model, used like
EMA or SWA; the training itself is untouched.

Numerics: the least-squares fit needs cov(w_i, r_m) and var(r_m). Sums of raw values lose
everything to cancellation when the weights are much larger than their movement (the design
brief measured NaN with naive float64 sums), so the moments are kept with Welford/Chan updates
in float64: per weight its mean and its co-moment with its reference; per mode the reference's
mean and second moment. ``a = C_i / M2_m``, ``b = mean_i - a * mean_r``.

Memory after the fit point, per modelled weight: mean (8 bytes) + co-moment (8) + mode label
(1 byte for M <= 256, 2 up to 65,536: :func:`~modeopt.kernels.label_dtype`) = 17 bytes, on every
device, and nothing that grows with time. Before it: the recording window, as in
:class:`~modeopt.TrajectoryRecorder` (always in host memory).

Devices: every fitted tensor lives where the weights are. Per weight (labels, mean, co-moment) on
its own tensor's device; per mode (``mode_mean``, ``mode_m2``, ``ref_scale``, ``ref_shift``) on the
*reference device*, the device of the first modelled tensor. The fit decomposes on the reference
device and replays the window into the moments on each tensor's device. After the fit,
:meth:`OnlineCMD.update` never synchronises with the host: the references are gathered with
precomputed index tensors, and the Welford updates stay on the devices.
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

from . import kernels
from .decomposition import decompose
from .layout import ParamLayout, select_parameters
from .snapshots import SnapshotBuffer
from .trajectory import Trajectory, load_named_into

__all__ = ["OnlineCMD"]


def default_names(model: nn.Module) -> list[str]:
    """Trainable floating-point parameters and floating-point buffers (BatchNorm statistics)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()]
    names += [n for n, b in model.named_buffers() if b.is_floating_point()]
    return names


def _to(x: Tensor, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """``x`` on ``device`` (and ``dtype``) without a host sync where that is safe: copies to an
    accelerator are ``non_blocking`` (ordered on its stream); a copy to the CPU blocks, since a CPU
    op would otherwise read it before it landed."""
    return x.to(device=device, dtype=dtype, non_blocking=device.type != "cpu")


def _float_names(model: nn.Module) -> set[str]:
    return {n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_floating_point()}


class OnlineCMD:
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
        max_snapshots: keep only the latest snapshots of the window (a ring).
        record_dtype: storage of the window's snapshots (bfloat16 halves it).

    Phases: ``"recording"`` until ``fit_at``, then ``"fitted"``.
    """

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
        # The set-ups CMDOptimizer refuses are refused here too, at once (not warned about at every step).
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        checks = [("n_modes", n_modes, 1), ("fit_at", fit_at, 1), ("snapshot_every", snapshot_every, 1),
                  ("n_samples", n_samples, 1)]
        if sample_every is not None:
            checks.append(("sample_every", sample_every, 1))
        if max_snapshots is not None:
            checks.append(("max_snapshots", max_snapshots, 3))
        for label, v, lo in checks:
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{label} must be an integer >= {lo}, got {v!r}")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"seed must be an integer or None, got {seed!r}")
        if not (isinstance(record_dtype, torch.dtype) and record_dtype.is_floating_point):
            raise ValueError(f"record_dtype must be a floating-point torch.dtype, got {record_dtype!r}")
        if fit_at // snapshot_every < 3:
            raise ValueError(f"fit_at={fit_at} with snapshot_every={snapshot_every} records {fit_at // snapshot_every} "
                             f"snapshot(s) before the fit; CMD needs at least 3: make fit_at >= {3 * snapshot_every}")
        if n_modes > n_samples:
            raise ValueError(f"n_modes={n_modes} > n_samples={n_samples}: ask for fewer modes or sample more weights "
                             "(n_samples >= 30 * n_modes is a good rule)")
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
        self._buffer: SnapshotBuffer | None = SnapshotBuffer(self.layout.n, dtype=record_dtype, capacity=self._capacity)
        self.skipped_snapshots = 0  # recording-phase snapshots not taken because a tensor held NaN/inf
        self._record_pending = False
        self.phase = "recording"
        self.calls = 0
        # fitted state (per tensor lists, flat)
        self.labels: list[Tensor] = []
        self.mean: list[Tensor] = []
        self.comoment: list[Tensor] = []
        self.ref_index: list[tuple[int, int]] = []  # (tensor, flat element) of each reference
        # r_m = (w_ref - ref_shift[m]) / ref_scale[m]: identity until a reference is handed off to
        # another weight of its mode (gradual embedding froze the tensor that held it).
        self.ref_scale = torch.ones(0, dtype=torch.float64)
        self.ref_shift = torch.zeros(0, dtype=torch.float64)
        self.mode_mean = torch.zeros(0, dtype=torch.float64)
        self.mode_m2 = torch.zeros(0, dtype=torch.float64)
        self.count = 0
        self._ref_plan: tuple | None = None  # how references_now() gathers (built from ref_index)
        self.history: list[dict[str, Any]] = []
        self.frozen_tensors: set[int] = set()  # tensors that follow their references exactly (gradual embedding)
        self._model_ids = tuple(id(t) for t in model.parameters()) + tuple(id(t) for t in model.buffers())
        self._all_names = _float_names(model)

    # ------------------------------------------------------------------ update
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
            self._add_sample([t.reshape(-1) for t in self._tensors], self.references_now())

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

    def _record(self) -> None:
        # A snapshot with NaN/inf would block every fit while it stays in the window: skip it and
        # record the next finite weights instead.
        bad = self._first_nonfinite()
        if bad is None:
            self._buffer.append(self.layout, self._tensors, self.calls)
            self._record_pending = False
            return
        if self._record_pending:  # still missing from an earlier step: counted once
            return
        self._record_pending = True
        self.skipped_snapshots += 1
        if self.skipped_snapshots == 1:
            warnings.warn(f"OnlineCMD: step {self.calls}: {bad!r} holds NaN/inf: this snapshot is not recorded and the "
                          "next finite weights are recorded instead (online.skipped_snapshots counts the skips; this "
                          "warning is given once)", RuntimeWarning, stacklevel=4)

    def _first_nonfinite(self) -> str | None:
        """Name of the first modelled tensor holding NaN/inf, or None (one host sync per device)."""
        flags: dict[torch.device, list[Tensor]] = {}
        for t in self._tensors:
            flags.setdefault(t.device, []).append(torch.isfinite(t).all())
        finite: dict[torch.device, list[bool]] = {dev: torch.stack(f).tolist() for dev, f in flags.items()}
        seen: dict[torch.device, int] = {}
        for name, t in zip(self._names, self._tensors):
            k = seen.get(t.device, 0)
            seen[t.device] = k + 1
            if not finite[t.device][k]:
                return name
        return None

    @property
    def reference_device(self) -> torch.device:
        """Where the per-mode state lives: the device of the first modelled tensor."""
        return self._tensors[0].device

    def _fit(self) -> None:
        bad = self._first_nonfinite()
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
        specs = self.layout.specs
        rows, sizes, labels = d.reference.tolist(), d.sizes.tolist(), d.labels
        del d  # the other (N,) results (a, b, score): not kept, freed before the moments are allocated
        # Compact labels on every device (uint8 for M <= 256, uint16 in int16 up to 65,536).
        ldt = kernels.label_dtype(len(rows))
        self.labels = [labels[s.offset : s.stop].to(device=t.device, dtype=ldt).contiguous()
                       for s, t in zip(specs, self._tensors)]
        del labels
        self.ref_index = []
        for row in rows:
            name, idx = self.layout.locate(row)
            t = self._names.index(name)
            self.ref_index.append((t, row - specs[t].offset))
        self._ref_plan = None
        self.n_modes = len(rows)
        f64 = dict(dtype=torch.float64, device=rdev)
        self.ref_scale = torch.ones(self.n_modes, **f64)
        self.ref_shift = torch.zeros(self.n_modes, **f64)
        self.mean = [torch.zeros(s.numel, dtype=torch.float64, device=t.device) for s, t in zip(specs, self._tensors)]
        self.comoment = [torch.zeros(s.numel, dtype=torch.float64, device=t.device)
                         for s, t in zip(specs, self._tensors)]
        self.mode_mean = torch.zeros(self.n_modes, **f64)
        self.mode_m2 = torch.zeros(self.n_modes, **f64)
        self.count = 0
        # The window's samples go through the same updates: at the fit point the moments are
        # exactly the batch least-squares over the window, and later samples extend them.
        self._replay(traj, sorted(range(len(steps)), key=lambda j: steps[j]), torch.tensor(rows, dtype=torch.long))
        self._buffer = None
        self.phase = "fitted"
        self.history.append({"step": self.calls, "n_modes": self.n_modes, "sizes": sizes, "window": len(steps)})

    #: Largest ``calls`` / ``count`` a loaded state may hold: float64 counts are exact up to 2**53.
    MAX_COUNT = 2**53

    #: float32 elements of the window uploaded at once per group of tensors during the replay.
    REPLAY_GROUP = 1 << 24

    def _replay(self, traj: Trajectory, order: list[int], ref_rows: Tensor) -> None:
        """Add the window's samples (rows ``order`` of the host recording, oldest first) to the moments.

        The per-mode moments go first, for every sample (the references are a few values per row);
        then, per group of consecutive tensors on one device (at most :attr:`REPLAY_GROUP` values),
        each sample's slice of the row is uploaded once and folded in with the sample's ``dr``. Each
        weight sees the same sequence of operations as in :meth:`_add_sample`, so the result is the
        same as adding the samples one by one; device memory holds one group's slice at a time.
        """
        data, offset = traj.data, traj.offset
        rdev = self.reference_device
        drs = []
        for j in order:
            r = data[j].index_select(0, ref_rows).to(torch.float32)
            if offset is not None:
                r = r + offset.index_select(0, ref_rows)
            drs.append(self._mode_sample(_to(r, rdev, torch.float64)))
        specs = self.layout.specs
        groups: list[list[int]] = []
        for t, x in enumerate(self._tensors):
            g = groups[-1] if groups else None
            if (g and self._tensors[g[0]].device == x.device
                    and specs[t].stop - specs[g[0]].offset <= self.REPLAY_GROUP):
                g.append(t)
            else:
                groups.append([t])
        for g in groups:
            dev = self._tensors[g[0]].device
            lo, hi = specs[g[0]].offset, specs[g[-1]].stop
            off = None if offset is None else _to(offset[lo:hi], dev)
            dr_dev = [_to(dr, dev) for dr in drs]
            for k, j in enumerate(order):
                row = _to(data[j, lo:hi], dev).to(torch.float32)
                if off is not None:
                    row = row + off
                flat = [row[specs[t].offset - lo : specs[t].stop - lo] for t in g]
                kernels.welford(flat, [self.mean[t] for t in g], [self.comoment[t] for t in g],
                                [self.labels[t] for t in g], dr_dev[k], k + 1)

    def _gather_plan(self) -> tuple:
        """``(pieces, position)``: per tensor holding references, its index tensor (on its device) of
        the reference elements; ``position`` (on the reference device) puts the concatenated values
        in mode order. Built once per change of ``ref_index`` (fit, hand-off, load)."""
        if self._ref_plan is None:
            by_tensor: dict[int, list[tuple[int, int]]] = {}
            for m, (t, i) in enumerate(self.ref_index):
                by_tensor.setdefault(t, []).append((m, i))
            pieces, where = [], [0] * len(self.ref_index)
            k = 0
            for t, members in by_tensor.items():
                idx = torch.tensor([i for _, i in members], dtype=torch.long, device=self._tensors[t].device)
                pieces.append((t, idx))
                for m, _ in members:
                    where[m] = k
                    k += 1
            position = None if where == list(range(len(where))) else torch.tensor(
                where, dtype=torch.long, device=self.reference_device)
            self._ref_plan = (pieces, position)
        return self._ref_plan

    def _gather(self, flat: Sequence[Tensor]) -> Tensor:
        """``(M,)`` float64 on the reference device: the reference elements of the flat tensors
        (one ``index_select`` per tensor holding references; no host sync)."""
        pieces, position = self._gather_plan()
        rdev = self.reference_device
        vals = [_to(flat[t].index_select(0, idx), rdev, torch.float64) for t, idx in pieces]
        raw = vals[0] if len(vals) == 1 else torch.cat(vals)
        return raw if position is None else raw.index_select(0, position)

    def references_now(self) -> Tensor:
        """``(M,)`` float64 on the reference device: the modes' reference profiles now (the reference
        weights' values, in the units of the original references after a :meth:`hand_off`)."""
        raw = self._gather([t.detach().reshape(-1) for t in self._tensors])
        return (raw - self.ref_shift) / self.ref_scale

    def hand_off(self, mode: int, tensor: int, index: int, a: float, b: float) -> None:
        """Make weight ``index`` of tensor ``tensor`` (a member of ``mode`` with fit ``a, b``) carry
        the mode's reference profile: ``r = (w - b) / a`` from now on.

        Every fit stays expressed in the same ``r``, so frozen weights, the running moments and the
        other references are untouched. Used by gradual embedding to freeze the tensor that held
        the old reference; ``|a|`` must be far from 0.
        """
        self._need_fit()
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

    def _add_sample(self, flat: Sequence[Tensor], r: Tensor) -> None:
        """One Welford/Chan step: n += 1; mean_r, M2_r per mode; mean_i, C_i per weight (one
        ``kernels.welford`` call per device, with ``dr`` copied there without a host sync)."""
        dr_after = self._mode_sample(r)
        n = self.count
        by_device: dict[torch.device, list[int]] = {}
        for t in range(len(flat)):
            if t not in self.frozen_tensors:
                by_device.setdefault(flat[t].device, []).append(t)
        for dev, live in by_device.items():
            kernels.welford([flat[t] for t in live], [self.mean[t] for t in live], [self.comoment[t] for t in live],
                            [self.labels[t] for t in live], _to(dr_after, dev), n)

    # -------------------------------------------------------------- results
    def coefficients(self) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Per tensor: ``labels`` (compact ints: index with ``kernels.as_index``), ``a`` and ``b`` (float64) of
        the current fit (empty for frozen tensors)."""
        self._need_fit()
        per_mode = self._per_mode(self.mode_m2, self.mode_mean)
        a, b = [], []
        for t, (mean, com, lab) in enumerate(zip(self.mean, self.comoment, self.labels)):
            if t in self.frozen_tensors:  # moments freed: the caller holds the frozen coefficients
                a.append(com)
                b.append(mean)
                continue
            var_m, mean_m = per_mode(lab.device)
            idx = kernels.as_index(lab)
            var = var_m[idx]
            a.append(torch.where(var > 0, com / var.clamp(min=1e-300), torch.zeros_like(com)))
            b.append(mean - a[-1] * mean_m[idx])
        return self.labels, a, b

    @staticmethod
    def _per_mode(*values: Tensor):
        """``get(device)``: the per-mode tensors ``values`` on ``device`` (copied once per device)."""
        cache: dict[torch.device, tuple[Tensor, ...]] = {}

        def get(device: torch.device) -> tuple[Tensor, ...]:
            if device not in cache:
                cache[device] = tuple(_to(v, device) for v in values)
            return cache[device]

        return get

    def cmd_state_dict(self) -> dict[str, Tensor]:
        """The CMD weights ``a_i * r_now[m(i)] + b_i``, named like the model's tensors.

        Before the fit the model's own (raw) values are returned.
        """
        if self.phase != "fitted":
            return self._with_aliases({n: t.detach().clone() for n, t in zip(self._names, self._tensors)})
        r = self.references_now()
        per_mode = self._per_mode(self.mode_m2, r - self.mode_mean)
        out = {}
        for i, (name, t, mean, com, lab) in enumerate(zip(self._names, self._tensors, self.mean, self.comoment,
                                                          self.labels)):
            if i in self.frozen_tensors:  # it is exactly a r_now + b already
                out[name] = t.detach().clone()
                continue
            var_m, dr_m = per_mode(lab.device)
            idx = kernels.as_index(lab)
            var = var_m[idx]
            slope = torch.where(var > 0, com / var.clamp(min=1e-300), torch.zeros_like(com))
            # a r + b = mean + a (r - mean_r): no large terms cancel
            w = mean + slope * dr_m[idx]
            out[name] = w.to(t.dtype).view_as(t)
        return self._with_aliases(out)

    def _with_aliases(self, out: dict[str, Tensor]) -> dict[str, Tensor]:
        """Add every other name a modelled tensor is reachable under (tied weights: an embedding that is
        also the decoder), so that ``model.load_state_dict(..., strict=True)`` finds all its keys."""
        canonical = {id(t): n for n, t in zip(self._names, self._tensors)}
        named = list(self.model.named_parameters(remove_duplicate=False))
        named += list(self.model.named_buffers(remove_duplicate=False))
        for alias, t in named:
            name = canonical.get(id(t))
            if name is not None and alias not in out:
                out[alias] = out[name]
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

    def _need_fit(self) -> None:
        if self.phase != "fitted":
            raise RuntimeError(f"OnlineCMD has not fitted yet (step {self.calls} of fit_at={self.fit_at})")

    @property
    def state_bytes(self) -> int:
        """Bytes held now (window before the fit; moments and labels after)."""
        if self.phase == "recording":
            return 0 if self._buffer is None else self._buffer.nbytes
        tensors = self.mean + self.comoment + self.labels
        return sum(t.numel() * t.element_size() for t in tensors) + 16 * self.n_modes

    # --------------------------------------------------------- state dicts
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
        """Resume from :meth:`state_dict`. Everything is checked first (names, shapes, dtypes, label
        range, finiteness, counts): a state that does not fit raises ``ValueError`` and changes nothing.
        Then the tensors are copied to where this model's tensors are (labels in the compact dtype),
        whatever device they were saved or mapped to."""
        self._apply_state(sd, self._checked_state(sd))

    def _apply_state(self, sd: dict[str, Any], buffer: SnapshotBuffer | None) -> None:
        """Load a state that :meth:`_checked_state` accepted (returning ``buffer``); nothing here raises."""
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
        devs = [t.device for t in self._tensors]
        ldt = kernels.label_dtype(self.n_modes)
        f64 = dict(dtype=torch.float64, copy=True)
        self.labels = [t.to(device=d, dtype=ldt, copy=True) for t, d in zip(sd["labels"], devs)]
        self.mean = [t.to(device=d, **f64) for t, d in zip(sd["mean"], devs)]
        self.comoment = [t.to(device=d, **f64) for t, d in zip(sd["comoment"], devs)]
        self.ref_index = [tuple(int(v) for v in x) for x in sd["ref_index"]]
        self._ref_plan = None
        rdev = self.reference_device
        self.mode_mean, self.mode_m2 = sd["mode_mean"].to(rdev, **f64), sd["mode_m2"].to(rdev, **f64)
        m = len(self.ref_index)
        self.ref_scale = sd["ref_scale"].to(rdev, **f64) if "ref_scale" in sd else torch.ones(m, dtype=torch.float64,
                                                                                              device=rdev)
        self.ref_shift = sd["ref_shift"].to(rdev, **f64) if "ref_shift" in sd else torch.zeros(m, dtype=torch.float64,
                                                                                               device=rdev)
        self.frozen_tensors = {int(t) for t in sd.get("frozen_tensors", [])}
        if self.phase == "fitted":
            # validated above; registered now (one sync) so that the first update() after the load needs none
            kernels.check_labels(self.labels, self.n_modes)

    def _checked_state(self, sd: Any) -> SnapshotBuffer | None:
        """Validate a :meth:`state_dict` against this model without changing anything; return the
        recording window loaded into a new buffer (NaN/inf snapshots dropped, with a warning) or None."""
        self.check_layout()
        keys = ("phase", "calls", "seed", "names", "n_modes", "count", "history", "buffer", "labels", "mean",
                "comoment", "ref_index", "mode_mean", "mode_m2")
        if not isinstance(sd, dict) or any(k not in sd for k in keys):
            missing = [k for k in keys if not isinstance(sd, dict) or k not in sd]
            raise ValueError(f"not an OnlineCMD state (it lacks {missing}): load what online.state_dict() saved")
        if not isinstance(sd["names"], (list, tuple)) or list(sd["names"]) != self._names:
            saved = list(sd["names"]) if isinstance(sd["names"], (list, tuple)) else None
            if saved is not None and len(saved) == len(self._names) and sorted(map(str, saved)) == sorted(self._names):
                k = next(i for i, (a, b) in enumerate(zip(saved, self._names)) if a != b)
                raise ValueError(f"this OnlineCMD state models the same tensors in a different order (position {k}: "
                                 f"{saved[k]!r} in the state, {self._names[k]!r} here): build it with names= in the "
                                 "saved run's order (state['names'])")
            if saved is None:
                what = f"its 'names' is a {type(sd['names']).__name__}, not a list: damaged checkpoint"
            else:
                added = sorted(set(self._names) - set(map(str, saved)))
                removed = sorted(set(map(str, saved)) - set(self._names))
                what = (f"{len(saved)} tensors in the state, {len(self._names)} here; only here: {added[:5]}, only "
                        f"in the state: {removed[:5]}")
            raise ValueError(f"this OnlineCMD state models different tensors than the model it was built on ({what}): "
                             "build it with the same names= and model as the saved run")
        phase = sd["phase"]
        if phase not in ("recording", "fitted"):
            raise ValueError(f"the state's phase {phase!r} is not 'recording' or 'fitted': damaged checkpoint")
        top = self.MAX_COUNT
        for k, lo, hi in (("calls", 0, top), ("seed", None, None), ("n_modes", 1, None), ("count", 0, top)):
            v = sd[k]
            if (not isinstance(v, int) or isinstance(v, bool) or (lo is not None and v < lo)
                    or (hi is not None and v > hi)):
                big = hi is not None and isinstance(v, int) and v > hi
                rng = ("" if lo is None else f" >= {lo}") + (" and <= 2**53" if big else "")
                raise ValueError(f"the state's {k!r} must be an integer{rng}, got {v!r}: damaged checkpoint")
        if sd["n_modes"] > self.layout.n:
            raise ValueError(f"the state's n_modes={sd['n_modes']} exceeds the {self.layout.n} weights modelled: "
                             "damaged checkpoint, or one of another model")
        if phase == "recording" and sd["n_modes"] > self.n_samples:
            raise ValueError(f"the state's n_modes={sd['n_modes']} > n_samples={self.n_samples}: the fit could never "
                             "be made; build the OnlineCMD with the saved run's n_samples")

        if not isinstance(sd["history"], (list, tuple)) or not all(isinstance(h, dict) for h in sd["history"]):
            raise ValueError("the state's 'history' must be a list of dicts: damaged checkpoint")
        frozen = sd.get("frozen_tensors", [])
        n_t = len(self._names)
        if not isinstance(frozen, (list, tuple)) or not all(isinstance(t, int) and 0 <= t < n_t for t in frozen):
            raise ValueError(f"the state's 'frozen_tensors' must be tensor indices 0..{n_t - 1}, got {frozen!r}")
        for k in ("labels", "mean", "comoment", "ref_index"):
            if not isinstance(sd[k], (list, tuple)):
                raise ValueError(f"the state's {k!r} must be a list: damaged checkpoint")
        if phase == "recording":
            if sd["buffer"] is None:
                raise ValueError("the state is in phase 'recording' but holds no recording: damaged checkpoint")
            if sd["labels"] or sd["mean"] or sd["comoment"] or sd["ref_index"] or frozen:
                raise ValueError("the state is in phase 'recording' but holds fitted moments: damaged checkpoint")
            buffer = SnapshotBuffer(self.layout.n, dtype=self._record_dtype, capacity=self._capacity)
            try:
                dropped = buffer.load_state_dict(sd["buffer"])
            except ValueError as e:
                raise ValueError(f"the state's recording window does not fit this OnlineCMD: {e}") from None
            if dropped:
                warnings.warn(f"OnlineCMD: the state's recording window held {len(dropped)} snapshot(s) with NaN/inf "
                              f"(steps {dropped[:10]}): dropped on load", RuntimeWarning, stacklevel=3)
            return buffer
        if sd["buffer"] is not None:
            raise ValueError("the state is in phase 'fitted' but still holds a recording window: damaged checkpoint")
        m = sd["n_modes"]
        for k in ("mode_mean", "mode_m2", "ref_scale", "ref_shift"):
            if k not in sd and k in ("ref_scale", "ref_shift"):
                continue
            t = sd[k]
            if not isinstance(t, Tensor) or tuple(t.shape) != (m,) or not t.is_floating_point():
                got = f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"the state's {k!r} must be a floating-point tensor of shape ({m},) (n_modes), got "
                                 f"{got}: damaged checkpoint")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"the state's {k!r} holds NaN/inf: damaged checkpoint")
        if bool((sd["mode_m2"] < 0).any()) or ("ref_scale" in sd and bool((sd["ref_scale"] == 0).any())):
            raise ValueError("the state's 'mode_m2' must be >= 0 and its 'ref_scale' non-zero: damaged checkpoint")
        if len(sd["ref_index"]) != m:
            raise ValueError(f"the state has {len(sd['ref_index'])} reference weights for {m} modes: "
                             "damaged checkpoint")
        for k in ("labels", "mean", "comoment"):
            if len(sd[k]) != n_t:
                raise ValueError(f"the state's {k!r} holds {len(sd[k])} tensors, this OnlineCMD models {n_t}: "
                                 "damaged checkpoint")
        for t, (name, x) in enumerate(zip(self._names, self._tensors)):
            lab = sd["labels"][t]
            if not isinstance(lab, Tensor) or lab.is_floating_point() or lab.is_complex() or lab.dtype == torch.bool:
                raise ValueError(f"{name!r}: the state's mode labels must be an integer tensor: damaged checkpoint")
            if lab.dim() != 1:
                raise ValueError(f"{name!r}: the state's mode labels must be a 1-D tensor, got shape "
                                 f"{tuple(lab.shape)}: damaged checkpoint")
            if lab.numel() != x.numel():
                raise ValueError(f"{name!r} has {lab.numel()} mode labels, the model's tensor has {x.numel()} values: "
                                 "the state is from a different model; build the same model (same layer sizes) as "
                                 "the saved run")
            if lab.numel():
                idx = kernels.as_index(lab)
                lo, hi = int(idx.min()), int(idx.max())
                if lo < 0 or hi >= m:
                    raise ValueError(f"{name!r} has mode labels from {lo} to {hi}, but the state has {m} modes (valid "
                                     f"labels 0..{m - 1}): the file is damaged or was edited; load an intact one")
            for k in ("mean", "comoment"):
                v = sd[k][t]
                want = 0 if t in frozen else x.numel()
                if not isinstance(v, Tensor) or v.dtype != torch.float64 or v.dim() != 1:
                    got = f"a {v.dtype} tensor of shape {tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__
                    raise ValueError(f"the state's {k!r} of {name!r} must be a 1-D float64 tensor, got {got}: "
                                     "damaged or edited checkpoint; load an intact one")
                if v.numel() != want:
                    got = f"{v.numel()} values"
                    raise ValueError(f"the state's {k!r} of {name!r} has {got}, the model's tensor needs {want}: the "
                                     "state is from a different model; build the same model as the saved run")
                if not bool(torch.isfinite(v).all()):
                    raise ValueError(f"the state's {k!r} of {name!r} holds NaN/inf: damaged checkpoint")
        for j, ref in enumerate(sd["ref_index"]):
            ok = isinstance(ref, (list, tuple)) and len(ref) == 2 and all(isinstance(v, int) for v in ref)
            if not ok or not 0 <= ref[0] < n_t or not 0 <= ref[1] < self._tensors[ref[0]].numel():
                where = (f"element {ref[1]} of tensor {ref[0]} ({self._names[ref[0]]!r}, "
                         f"{self._tensors[ref[0]].numel()} values)") if ok and 0 <= ref[0] < n_t else repr(ref)
                raise ValueError(f"the state's reference {j} points at {where}, which this model lacks: the state is "
                                 "from a different model; build the same model as the saved run")
        return None

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
