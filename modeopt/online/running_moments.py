"""Welford/Chan running moments of weights against their modes' references, on the weights' devices.

The pieces :class:`~modeopt.OnlineCMD` is built from, as functions of plain tensors. Per weight
``i`` of mode ``m``: its mean and its co-moment ``C_i`` with the reference ``r_m`` (float64, on
the weight's device); per mode: the reference's mean and second moment ``M2_m`` (float64, on the
reference device). The least-squares fit ``w_i ~= a_i r_m + b_i`` over every sample is then
``a_i = C_i / M2_m``, ``b_i = mean_i - a_i mean_r``. Apart from :func:`first_nonfinite`, none of
these functions synchronises with the host.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import warnings

import torch
from torch import Tensor

from modeopt.modespace import kernels
from modeopt.utils.transfer import to_device
from modeopt.trajectories.layout import ParamLayout
from modeopt.trajectories.trajectory import Trajectory

__all__ = ["MomentsPhase", "slopes", "per_device", "gather_plan", "gather", "split_labels", "start_moments", "replay_window", "welford_step",
           "cmd_weights", "first_nonfinite"]


def slopes(comoment: Tensor, var: Tensor) -> Tensor:
    """``a = C / M2`` elementwise (both float64, same shape), 0 where the reference did not move (``M2 = 0``)."""
    return torch.where(var > 0, comoment / var.clamp(min=1e-300), torch.zeros_like(comoment))


def per_device(*values: Tensor) -> Callable[[torch.device], tuple[Tensor, ...]]:
    """``get(device)``: the (per-mode) tensors ``values`` on ``device``, copied once per device."""
    cache: dict[torch.device, tuple[Tensor, ...]] = {}

    def get(device: torch.device) -> tuple[Tensor, ...]:
        if device not in cache:
            cache[device] = tuple(to_device(v, device) for v in values)
        return cache[device]

    return get


def gather_plan(ref_index: Sequence[tuple[int, int]], tensors: Sequence[Tensor],
                reference_device: torch.device) -> tuple[list[tuple[int, Tensor]], Tensor | None]:
    """How to read the references ``ref_index`` (``(tensor, flat element)`` per mode) without a host sync.

    Returns ``(pieces, position)``: per tensor holding references, ``(tensor, index)`` with the int64
    index of its reference elements (on its device); ``position`` (int64 on ``reference_device``, or
    None when already in order) puts the concatenated values in mode order.
    """
    by_tensor: dict[int, list[tuple[int, int]]] = {}
    for m, (t, i) in enumerate(ref_index):
        by_tensor.setdefault(t, []).append((m, i))
    pieces, where = [], [0] * len(ref_index)
    k = 0
    for t, members in by_tensor.items():
        pieces.append((t, torch.tensor([i for _, i in members], dtype=torch.long, device=tensors[t].device)))
        for m, _ in members:
            where[m] = k
            k += 1
    position = None if where == list(range(len(where))) else torch.tensor(
        where, dtype=torch.long, device=reference_device)
    return pieces, position


def gather(flat: Sequence[Tensor], plan: tuple[list[tuple[int, Tensor]], Tensor | None],
           reference_device: torch.device) -> Tensor:
    """``(M,)`` float64 on ``reference_device``: the reference elements of the flat tensors, in mode
    order (one ``index_select`` per tensor holding references)."""
    pieces, position = plan
    vals = [to_device(flat[t].index_select(0, idx), reference_device, torch.float64) for t, idx in pieces]
    raw = vals[0] if len(vals) == 1 else torch.cat(vals)
    return raw if position is None else raw.index_select(0, position)


def split_labels(labels: Tensor, n_modes: int, layout: ParamLayout, tensors: Sequence[Tensor]) -> list[Tensor]:
    """A fit's ``(N,)`` mode labels (any device) per tensor, flat, on each tensor's device, in the compact
    dtype of :func:`kernels.label_dtype` (uint8 for M <= 256, uint16 stored in int16 up to 65,536)."""
    ldt = kernels.label_dtype(n_modes)
    return [labels[s.offset : s.stop].to(device=t.device, dtype=ldt).contiguous() for s, t in zip(layout.specs, tensors)]


def start_moments(rows: Sequence[int], layout: ParamLayout, tensors: Sequence[Tensor]
                  ) -> tuple[list[tuple[int, int]], list[Tensor], list[Tensor]]:
    """The per-weight state right after a fit, before any sample: ``(ref_index, mean, comoment)``.

    ``rows``: the reference weights' flat rows, turned into ``(tensor, flat element)``; mean and
    co-moment: float64 zeros of each tensor's size on its device.
    """
    specs = layout.specs
    ref_index = []
    for row in rows:
        name, _ = layout.locate(row)
        t = layout.names.index(name)
        ref_index.append((t, row - specs[t].offset))
    mean = [torch.zeros(s.numel, dtype=torch.float64, device=t.device) for s, t in zip(specs, tensors)]
    comoment = [torch.zeros(s.numel, dtype=torch.float64, device=t.device) for s, t in zip(specs, tensors)]
    return ref_index, mean, comoment


def replay_window(traj: Trajectory, order: Sequence[int], ref_rows: Tensor, tensors: Sequence[Tensor],
                  mean: Sequence[Tensor], comoment: Sequence[Tensor], labels: Sequence[Tensor],
                  mode_sample: Callable[[Tensor], Tensor], max_values: int) -> None:
    """Add the samples ``order`` (rows of the host recording ``traj``, oldest first) to the moments.

    ``mode_sample(r)`` updates the per-mode moments with the ``(M,)`` float64 reference values ``r``
    (read at ``ref_rows``, sent to the reference device: ``mode_sample``'s) and returns
    ``r - mean_r``; every sample goes through it first. Then, per group of consecutive tensors on one
    device (at most ``max_values`` values), each sample's slice of the row is uploaded once and
    folded in: each weight sees the same operations as in :func:`welford_step`, and device memory
    holds one group's slice at a time.
    """
    data, offset = traj.data, traj.offset
    rdev = tensors[0].device
    drs = []
    for j in order:
        r = data[j].index_select(0, ref_rows).to(torch.float32)
        if offset is not None:
            r = r + offset.index_select(0, ref_rows)
        drs.append(mode_sample(to_device(r, rdev, torch.float64)))
    specs = traj.layout.specs
    groups: list[list[int]] = []
    for t, x in enumerate(tensors):
        g = groups[-1] if groups else None
        if g and tensors[g[0]].device == x.device and specs[t].stop - specs[g[0]].offset <= max_values:
            g.append(t)
        else:
            groups.append([t])
    for g in groups:
        dev = tensors[g[0]].device
        lo, hi = specs[g[0]].offset, specs[g[-1]].stop
        off = None if offset is None else to_device(offset[lo:hi], dev)
        dr_dev = [to_device(dr, dev) for dr in drs]
        for k, j in enumerate(order):
            row = to_device(data[j, lo:hi], dev).to(torch.float32)
            if off is not None:
                row = row + off
            flat = [row[specs[t].offset - lo : specs[t].stop - lo] for t in g]
            kernels.welford(flat, [mean[t] for t in g], [comoment[t] for t in g], [labels[t] for t in g],
                            dr_dev[k], k + 1)


def welford_step(flat: Sequence[Tensor], mean: Sequence[Tensor], comoment: Sequence[Tensor],
                 labels: Sequence[Tensor], dr_after: Tensor, count: int, skip: set[int] = frozenset()) -> None:
    """Fold one sample into the per-weight moments: ``flat[t]`` (the values, flat) of every tensor not in
    ``skip``, with ``dr_after = r - mean_r`` (``(M,)``, after the per-mode update) and the new ``count``;
    one :func:`kernels.welford` call per device."""
    by_device: dict[torch.device, list[int]] = {}
    for t in range(len(flat)):
        if t not in skip:
            by_device.setdefault(flat[t].device, []).append(t)
    for dev, live in by_device.items():
        kernels.welford([flat[t] for t in live], [mean[t] for t in live], [comoment[t] for t in live],
                        [labels[t] for t in live], to_device(dr_after, dev), count)


def cmd_weights(names: Sequence[str], tensors: Sequence[Tensor], mean: Sequence[Tensor],
                comoment: Sequence[Tensor], labels: Sequence[Tensor], mode_m2: Tensor, dr_now: Tensor,
                frozen: set[int]) -> dict[str, Tensor]:
    """The fitted weights ``a_i r_now[m(i)] + b_i`` as ``{name: tensor}`` (each tensor's dtype, shape and
    device), computed as ``mean_i + a_i (r_now - mean_r)`` (``dr_now``, ``(M,)``) so that no large
    terms cancel. A frozen tensor is exactly that already: its current values are copied."""
    per_mode = per_device(mode_m2, dr_now)
    out = {}
    for i, (name, t, mu, com, lab) in enumerate(zip(names, tensors, mean, comoment, labels)):
        if i in frozen:
            out[name] = t.detach().clone()
            continue
        var_m, dr_m = per_mode(lab.device)
        idx = kernels.as_index(lab)
        out[name] = (mu + slopes(com, var_m[idx]) * dr_m[idx]).to(t.dtype).view_as(t)
    return out


def first_nonfinite(names: Sequence[str], tensors: Sequence[Tensor]) -> str | None:
    """Name of the first tensor holding NaN/inf, or None (one host sync per device)."""
    flags: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        flags.setdefault(t.device, []).append(torch.isfinite(t).all())
    finite: dict[torch.device, list[bool]] = {dev: torch.stack(f).tolist() for dev, f in flags.items()}
    seen: dict[torch.device, int] = {}
    for name, t in zip(names, tensors):
        k = seen.get(t.device, 0)
        seen[t.device] = k + 1
        if not finite[t.device][k]:
            return name
    return None


class MomentsPhase:
    """Mixin of the shadow models (:class:`~modeopt.OnlineCMD` and its FSDP2 counterpart): the fit
    check and the state count, from ``phase``, ``calls``, ``fit_at``, the window ``_buffer`` and the
    per-tensor ``mean``, ``comoment`` (float64) and ``labels`` (uint8 for M <= 256) of the host."""

    #: how the snapshot-skip warning names the host, and where a snapshot is not recorded
    _WHO, _WHERE = "OnlineCMD", ""

    def _record(self) -> None:
        """Record a snapshot of the window, unless a tensor holds NaN/inf: such a snapshot would block every fit
        while it stays in the window, so it is skipped and the next finite weights are recorded instead
        (``_record_pending``; counted once in ``skipped_snapshots``, warned once). The host says which tensor
        holds NaN/inf (``_nonfinite_snapshot``) and how a snapshot is appended (``_append_snapshot``)."""
        bad = self._nonfinite_snapshot()
        if bad is None:
            self._append_snapshot()
            self._record_pending = False
            return
        if self._record_pending:  # still missing from an earlier step: counted once
            return
        self._record_pending = True
        self.skipped_snapshots += 1
        if self.skipped_snapshots == 1:
            warnings.warn(f"{self._WHO}: step {self.calls}: {bad!r} holds NaN/inf: this snapshot is not recorded"
                          f"{self._WHERE} and the next finite weights are recorded instead (online.skipped_snapshots "
                          "counts the skips; this warning is given once)", RuntimeWarning, stacklevel=4)

    def check_fitted(self) -> None:
        """Raise ``RuntimeError`` unless the fit has been made (``phase == "fitted"``)."""
        if self.phase != "fitted":
            raise RuntimeError(f"OnlineCMD has not fitted yet (step {self.calls} of fit_at={self.fit_at})")

    @property
    def state_bytes(self) -> int:
        """Bytes held now, on this process (window before the fit; moments and labels after: 17 per
        weight + 16 per mode)."""
        if self.phase == "recording":
            return 0 if self._buffer is None else self._buffer.nbytes
        tensors = self.mean + self.comoment + self.labels
        return sum(t.numel() * t.element_size() for t in tensors) + 16 * self.n_modes
