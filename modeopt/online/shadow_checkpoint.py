"""Validation of :class:`~modeopt.OnlineCMD` settings, and of its checkpoints before anything is loaded.

A state that does not fit the model (other tensors or sizes, labels outside ``0..M-1``, wrong
dtypes, NaN/inf moments, counts beyond float64's exact integers) raises ``ValueError`` saying
what to do; the caller then changes nothing.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from modeopt.modespace import kernels
from modeopt.utils.checks import check_int
from modeopt.trajectories.snapshots import SnapshotBuffer

__all__ = ["check_online_settings", "check_online_state", "CheckedOnlineState", "MAX_COUNT"]

#: Largest ``calls`` / ``count`` a loaded state may hold: float64 counts are exact up to 2**53.
MAX_COUNT = 2**53


def check_online_settings(*, n_modes: Any, fit_at: Any, snapshot_every: Any, n_samples: Any, sample_every: Any,
                          max_snapshots: Any, seed: Any, record_dtype: Any) -> None:
    """Raise ``ValueError`` for the :class:`~modeopt.OnlineCMD` settings that cannot work (non-integer counts,
    fewer than 3 snapshots before ``fit_at``, ``n_modes > n_samples``, a non-float ``record_dtype``)."""
    for label, v, lo in (("n_modes", n_modes, 1), ("fit_at", fit_at, 1), ("snapshot_every", snapshot_every, 1),
                         ("n_samples", n_samples, 1), ("sample_every", sample_every, 1),
                         ("max_snapshots", max_snapshots, 3)):
        if v is not None or label in ("n_modes", "fit_at", "snapshot_every", "n_samples"):
            check_int(label, v, lo)
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


class CheckedOnlineState:
    """A state dict that :func:`check_online_state` accepted (``state``), with its recording window
    loaded into a new buffer (``buffer``, None after the fit): what
    :meth:`OnlineCMD.load_checked_state <modeopt.OnlineCMD.load_checked_state>` loads without failing."""

    def __init__(self, state: dict[str, Any], buffer: SnapshotBuffer | None):
        self.state = state
        self.buffer = buffer

    def on_devices(self, devices: Sequence[torch.device], reference_device: torch.device) -> dict[str, Any]:
        """Copies of the state's tensors where they are used: per tensor ``labels`` (compact dtype),
        ``mean``, ``comoment`` (float64) on ``devices``; per mode ``mode_mean``, ``mode_m2``, ``ref_scale``,
        ``ref_shift`` (float64, the last two identity when the state predates them) on ``reference_device``."""
        sd = self.state
        ldt = kernels.label_dtype(int(sd["n_modes"]))
        f64 = dict(dtype=torch.float64, copy=True)
        m = len(sd["ref_index"])
        out = {"labels": [t.to(device=d, dtype=ldt, copy=True) for t, d in zip(sd["labels"], devices)],
               "mean": [t.to(device=d, **f64) for t, d in zip(sd["mean"], devices)],
               "comoment": [t.to(device=d, **f64) for t, d in zip(sd["comoment"], devices)]}
        for k, default in (("mode_mean", None), ("mode_m2", None), ("ref_scale", torch.ones), ("ref_shift", torch.zeros)):
            out[k] = (sd[k].to(reference_device, **f64) if k in sd
                      else default(m, dtype=torch.float64, device=reference_device))
        return out


def check_online_state(sd: Any, *, names: Sequence[str], tensors: Sequence[Tensor], n_samples: int,
                       new_buffer: Callable[[], SnapshotBuffer]) -> CheckedOnlineState:
    """Validate an :meth:`OnlineCMD.state_dict <modeopt.OnlineCMD.state_dict>` for the modelled tensors
    ``names``/``tensors`` (in that order) without changing anything.

    Returns the accepted state, with (in phase ``"recording"``) its window loaded into ``new_buffer()``
    (snapshots holding NaN/inf dropped, with a warning). Raises
    ``ValueError`` saying what does not fit (names, shapes, dtypes, label range, finiteness,
    counts above :data:`MAX_COUNT`).
    """
    names, n_weights = list(names), sum(t.numel() for t in tensors)
    keys = ("phase", "calls", "seed", "names", "n_modes", "count", "history", "buffer", "labels", "mean",
            "comoment", "ref_index", "mode_mean", "mode_m2")
    if not isinstance(sd, dict) or any(k not in sd for k in keys):
        missing = [k for k in keys if not isinstance(sd, dict) or k not in sd]
        raise ValueError(f"not an OnlineCMD state (it lacks {missing}): load what online.state_dict() saved")
    if not isinstance(sd["names"], (list, tuple)) or list(sd["names"]) != names:
        saved = list(sd["names"]) if isinstance(sd["names"], (list, tuple)) else None
        if saved is not None and len(saved) == len(names) and sorted(map(str, saved)) == sorted(names):
            k = next(i for i, (a, b) in enumerate(zip(saved, names)) if a != b)
            raise ValueError(f"this OnlineCMD state models the same tensors in a different order (position {k}: "
                             f"{saved[k]!r} in the state, {names[k]!r} here): build it with names= in the "
                             "saved run's order (state['names'])")
        if saved is None:
            what = f"its 'names' is a {type(sd['names']).__name__}, not a list: damaged checkpoint"
        else:
            added = sorted(set(names) - set(map(str, saved)))
            removed = sorted(set(map(str, saved)) - set(names))
            what = (f"{len(saved)} tensors in the state, {len(names)} here; only here: {added[:5]}, only "
                    f"in the state: {removed[:5]}")
        raise ValueError(f"this OnlineCMD state models different tensors than the model it was built on ({what}): "
                         "build it with the same names= and model as the saved run")
    phase = sd["phase"]
    if phase not in ("recording", "fitted"):
        raise ValueError(f"the state's phase {phase!r} is not 'recording' or 'fitted': damaged checkpoint")
    for k, lo in (("calls", 0), ("seed", None), ("n_modes", 1), ("count", 0)):
        try:
            check_int(f"the state's {k!r}", sd[k], lo)
        except ValueError as e:
            raise ValueError(f"{e}: damaged checkpoint") from None
        if k in ("calls", "count") and sd[k] > MAX_COUNT:
            raise ValueError(f"the state's {k!r} must be an integer >= 0 and <= 2**53, got {sd[k]!r}: "
                             "damaged checkpoint")
    if sd["n_modes"] > n_weights:
        raise ValueError(f"the state's n_modes={sd['n_modes']} exceeds the {n_weights} weights modelled: "
                         "damaged checkpoint, or one of another model")
    if phase == "recording" and sd["n_modes"] > n_samples:
        raise ValueError(f"the state's n_modes={sd['n_modes']} > n_samples={n_samples}: the fit could never "
                         "be made; build the OnlineCMD with the saved run's n_samples")

    if not isinstance(sd["history"], (list, tuple)) or not all(isinstance(h, dict) for h in sd["history"]):
        raise ValueError("the state's 'history' must be a list of dicts: damaged checkpoint")
    frozen = sd.get("frozen_tensors", [])
    n_t = len(names)
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
        buffer = new_buffer()
        try:
            dropped = buffer.load_state_dict(sd["buffer"])
        except ValueError as e:
            raise ValueError(f"the state's recording window does not fit this OnlineCMD: {e}") from None
        if dropped:
            warnings.warn(f"OnlineCMD: the state's recording window held {len(dropped)} snapshot(s) with NaN/inf "
                          f"(steps {dropped[:10]}): dropped on load", RuntimeWarning, stacklevel=4)
        return CheckedOnlineState(sd, buffer)
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
    for t, (name, x) in enumerate(zip(names, tensors)):
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
        if not ok or not 0 <= ref[0] < n_t or not 0 <= ref[1] < tensors[ref[0]].numel():
            where = (f"element {ref[1]} of tensor {ref[0]} ({names[ref[0]]!r}, "
                     f"{tensors[ref[0]].numel()} values)") if ok and 0 <= ref[0] < n_t else repr(ref)
            raise ValueError(f"the state's reference {j} points at {where}, which this model lacks: the state is "
                             "from a different model; build the same model as the saved run")
    return CheckedOnlineState(sd, None)
