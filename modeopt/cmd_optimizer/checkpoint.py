"""The checkpoint of :class:`~modeopt.CMDOptimizer`: what its ``"cmd"`` entry holds, its validation
before anything changes, the restore, and the mode space saved and re-entered on its own.

``CMDOptimizer.load_state_dict`` (and ``load_mode_space``) first check everything against the
optimizer and its model - names, shapes, dtypes, mode labels, finiteness, the recording, the base
optimizer's groups - and raise ``ValueError`` with what to do; only then is any state replaced.

:class:`Checkpointing` is a mixin of ``CMDOptimizer``: it reads and restores the optimizer's
counters (``phase``, ``_step``, ``_phase_step``, ``cycle``, ``seed``, ``n_modes``, ``history``), its
recording (``_buffer``, ``_new_buffer``), its embedded parameters (``_emb_names``, ``_emb_params``,
``_layout``, ``_orig_params``) and enters or leaves mode space with its ``_enter`` / ``_unembed``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from modeopt.modespace import kernels
from modeopt.modespace.half import check_base_state
from modeopt.utils.checks import check_int, describe, short_names
from modeopt.optim.nonfinite import NonFiniteWarning, check_optimizer_state_finite
from modeopt.trajectories.snapshots import SnapshotBuffer

__all__ = ["Checkpointing"]


class Checkpointing:
    """Saving and restoring the optimizer's own state (the base optimizer's is ``base.state_dict()``)."""

    def _checkpoint_entry(self) -> dict[str, Any]:
        """The ``"cmd"`` entry of ``state_dict()``: tensors and plain values only."""
        cmd: dict[str, Any] = {
            "version": 1, "phase": self.phase, "step": self._step, "phase_step": self._phase_step,
            "cycle": self.cycle, "seed": self.seed, "n_modes": self.n_modes, "names": list(self._emb_names),
            "history": [dict(h) for h in self.history], "buffer": None, "space": None,
        }
        self._poll_skips(stacklevel=5)
        if self._buffer is not None:
            cmd["buffer"] = self._buffer.state_dict()
        cmd["space"] = self.mode_space_state()
        return cmd

    def _restore(self, cmd: Any, base: Any) -> None:
        """Load a checkpoint's ``"cmd"`` and ``"base"`` entries, after checking both (then phase hooks: "loaded")."""
        buffer = self._checked_load(cmd, base)  # raises before anything changes
        if self.space is not None:
            self._unembed()
        self._buffer = None
        saved = cmd["space"]
        if saved is not None:
            self._enter_saved(saved)
        self.phase = cmd["phase"]
        self._step, self._phase_step, self.cycle = int(cmd["step"]), int(cmd["phase_step"]), int(cmd["cycle"])
        self.seed = int(cmd["seed"])
        # The run's M comes with it, like its seed (older checkpoints: the size of the saved space).
        n_modes = cmd.get("n_modes", None if saved is None else int(saved["r"].numel()))
        if n_modes is not None and int(n_modes) != self.n_modes:
            warnings.warn(f"modeopt: the checkpoint was trained with n_modes={int(n_modes)}; this CMDOptimizer was "
                          f"built with n_modes={self.n_modes}: opt.n_modes is now {int(n_modes)}, as in the "
                          "checkpoint", stacklevel=4)
            self.n_modes = int(n_modes)
        self.history = [dict(h) for h in cmd["history"]]
        self._buffer = buffer
        self._switch_delay, self._record_pending = 0, False
        self.base.load_state_dict(base)
        self._fire("loaded")

    # ------------------------------------------------- the mode space, saved and re-entered
    def mode_space_state(self) -> dict[str, Any] | None:
        """The current mode space as copies of its tensors (None outside mode space).

        ``{"labels", "a", "r_groups", "r", "applied", "half_base"}``: per embedded tensor the mode labels (stored
        compactly, see :func:`modeopt.modespace.kernels.label_dtype`; read them with ``kernels.as_index``) and the
        coefficients ``a`` (flat, on the weight's device), ``(M,)`` int64 ``r_groups``, the ``(M,)`` mode
        scalars ``r`` and the ``r`` the weights reflect (``ModeSpace.r_in_weights``; the model's
        ``state_dict()`` holds the weights at that ``r``), and for bfloat16/float16 weights their frozen
        bases (:meth:`ModeSpace.base_state <modeopt.modespace.space.ModeSpace.base_state>`: the
        parameters themselves, not copies, and the ``r`` they hold; None without such weights;
        checkpoints without the key load as bases equal to the model's weights). It is the
        ``"space"`` entry of ``state_dict()["cmd"]``, and what :meth:`load_mode_space` takes.

        With ``coef_dtype=torch.int8`` (the 8-bit encoding) ``a`` holds the int8 codes, ``"a_scale"``
        per tensor their ``(M,)`` float32 scales, and the labels are packed two per byte when
        ``M <= 16`` (``kernels.unpack_labels``): the space is saved as stored, so it resumes bit for bit.
        """
        s = self.space
        if s is None:
            return None
        out = {"labels": [lab.clone() for lab in s.labels], "a": [x.clone() for x in s.a],
               "r_groups": s.r_groups.clone(), "r": s.r_full().detach().clone(), "applied": s.r_in_weights.clone(),
               "half_base": s.base_state() if s.half else None}
        if s.a_scale is not None:
            out["a_scale"] = [x.clone() for x in s.a_scale]
        return out

    def load_mode_space(self, state: Mapping[str, Any]) -> None:
        """Enter the mode space ``state`` (from :meth:`mode_space_state`, e.g. another rank's).

        It is validated first (``ValueError``, nothing changed, if it does not fit this optimizer's
        embedded parameters). The current mode space (or warm-up recording) is left, the weights keep
        their values, ``r`` and the param groups are those of ``state``, the phase is ``"embedded"``
        with its step count restarted at 0 (``step_count``, ``cycle``, ``seed`` and ``history`` are
        kept), and the phase hooks hear ``"loaded"``. Refused after ``export()``.
        """
        if self.phase == "exported":
            raise RuntimeError("load_mode_space: this CMDOptimizer was exported and is a plain optimizer now")
        self._check_saved_space(state)  # raises before anything changes
        if self.space is not None:
            self._unembed()
        self._buffer = None
        self._switch_delay, self._record_pending = 0, False
        self._enter_saved(state)
        self._fire("loaded")

    def _enter_saved(self, saved: Mapping[str, Any]) -> None:
        scales = saved.get("a_scale")
        labels = list(saved["labels"])
        if scales is not None:  # the 8-bit encoding: codes and scales as saved, labels unpacked for ModeSpace
            labels = [kernels.unpack_labels(lab, p.numel()) if kernels.is_packed(lab, p.numel()) else lab
                      for lab, p in zip(labels, self._emb_params)]
        self._enter(labels=labels, a=saved["a"], r_groups=saved["r_groups"], r=saved["r"], a_scale=scales)
        self.space.r_in_weights.copy_(saved["applied"])
        self.space.load_base_state(saved.get("half_base"))

    # ------------------------------------------------- validation (read-only: changes nothing)

    def _checked_load(self, cmd: Any, base: Any) -> SnapshotBuffer | None:
        """Validate a checkpoint's ``cmd`` and ``base`` entries without changing anything.

        Returns the warm-up recording, already loaded into a new buffer (NaN/inf snapshots dropped
        with a warning), or None.
        """
        keys = ("phase", "step", "phase_step", "cycle", "seed", "names", "history", "buffer", "space")
        if not isinstance(cmd, Mapping) or any(k not in cmd for k in keys):
            missing = [k for k in keys if not isinstance(cmd, Mapping) or k not in cmd]
            raise ValueError(f"the checkpoint's 'cmd' entry lacks {missing}: not a CMDOptimizer state dict, or a "
                             "damaged one; load the file opt.state_dict() was saved to")
        if not isinstance(cmd["names"], (list, tuple)) or list(cmd["names"]) != self._emb_names:
            n = len(cmd["names"]) if isinstance(cmd["names"], (list, tuple)) else "?"
            if n == len(self._emb_names) and sorted(map(str, cmd["names"])) == sorted(self._emb_names):
                k = next(i for i, (a, b) in enumerate(zip(cmd["names"], self._emb_names)) if a != b)
                raise ValueError(f"the checkpoint embeds the same parameters in a different order (position {k}: "
                                 f"{cmd['names'][k]!r} in the checkpoint, {self._emb_names[k]!r} here): build the "
                                 "model and the base optimizer's param groups in the saved run's order")
            raise ValueError("the checkpoint embeds different parameters than this optimizer "
                             f"({n} vs {len(self._emb_names)} tensors): build the model and the "
                             "CMDOptimizer with the same arguments (exclude=, param groups) as the saved run")
        phase = cmd["phase"]
        if phase not in ("warmup", "embedded", "exported"):
            raise ValueError(f"the checkpoint's phase {phase!r} is not 'warmup', 'embedded' or 'exported': "
                             "damaged checkpoint")
        for k in ("step", "phase_step", "cycle", "seed"):
            check_int(f"the checkpoint's {k!r}", cmd[k], None if k == "seed" else 0)
        if not isinstance(cmd["history"], (list, tuple)) or not all(isinstance(h, Mapping) for h in cmd["history"]):
            raise ValueError("the checkpoint's 'history' must be a list of dicts: damaged checkpoint")
        saved = cmd["space"]
        if "n_modes" in cmd:  # absent in checkpoints from before it was saved
            self._check_saved_n_modes(cmd["n_modes"], saved)
        if phase == "warmup" and cmd["cycle"] >= 1 and self.recluster_every is None:
            raise ValueError(f"the checkpoint is in the warm-up of re-clustering cycle {cmd['cycle']}, but this "
                             "CMDOptimizer was built without recluster_every: build it with the saved run's "
                             "recluster_every (and recluster_steps)")
        if (saved is not None) != (phase == "embedded"):
            raise ValueError(f"the checkpoint's phase is {phase!r} but it {'holds' if saved is not None else 'lacks'} "
                             "a mode space: damaged checkpoint")
        if cmd["buffer"] is not None and phase != "warmup":
            raise ValueError(f"the checkpoint holds a warm-up recording in phase {phase!r}: damaged checkpoint")
        r_groups = self._check_saved_space(saved) if saved is not None else None
        self._check_saved_base(base, r_groups)
        if cmd["buffer"] is None:
            return None
        try:
            buffer = self._new_buffer(cmd["cycle"])  # a record_dir file is reserved here: may raise OSError
        except ValueError as e:
            raise ValueError(f"cannot rebuild the checkpoint's warm-up recording: {e}") from None
        try:
            dropped = buffer.load_state_dict(cmd["buffer"])
        except ValueError as e:
            raise ValueError(f"the checkpoint's warm-up recording does not fit this optimizer: {e}") from None
        if dropped:
            warnings.warn(
                f"modeopt: the checkpoint's warm-up recording held {len(dropped)} snapshot(s) with NaN/inf (steps "
                f"{short_names([str(s) for s in dropped])}): dropped on load, {len(buffer)} finite snapshot(s) kept "
                "(the switch waits for 3 finite ones if fewer remain)", NonFiniteWarning, stacklevel=4)
        return buffer

    def _check_saved_n_modes(self, n_modes: Any, saved: Any) -> None:
        """The run's M (absent in older checkpoints): what this optimizer could decompose into, and at
        least the number of mode scalars of a saved space (the clustering may give fewer than asked)."""
        try:
            check_int("the checkpoint's 'n_modes'", n_modes, 1)
        except ValueError as e:
            raise ValueError(f"{e}: damaged checkpoint") from None
        if n_modes > self.n_samples or n_modes > self._layout.n:
            raise ValueError(f"the checkpoint's n_modes={n_modes} exceeds this optimizer's n_samples={self.n_samples} "
                             f"or its {self._layout.n} embeddable weights: build the model and the CMDOptimizer as in "
                             "the saved run")
        r = saved.get("r") if isinstance(saved, Mapping) else None
        if isinstance(r, Tensor) and r.numel() > n_modes:
            raise ValueError(f"the checkpoint's mode space has {r.numel()} mode scalars but its n_modes is {n_modes}: "
                             "damaged or edited checkpoint; load an intact one")

    def _check_saved_space(self, saved: Any) -> set[int]:
        """Validate a checkpoint's mode space; return the param groups that hold mode scalars."""
        keys = ("labels", "a", "r_groups", "r", "applied")
        if not isinstance(saved, Mapping) or any(k not in saved for k in keys):
            raise ValueError(f"the checkpoint's mode space must hold {list(keys)}: damaged checkpoint")
        r, applied, r_groups = saved["r"], saved["applied"], saved["r_groups"]
        if not isinstance(r, Tensor) or r.dim() != 1 or r.numel() < 1 or not r.is_floating_point():
            raise ValueError(f"the checkpoint's mode scalars r must be a 1-D floating-point tensor, got "
                             f"{describe(r)}: damaged checkpoint")
        m = r.numel()
        if not isinstance(applied, Tensor) or tuple(applied.shape) != (m,) or not applied.is_floating_point():
            raise ValueError(f"the checkpoint's applied r must be a floating-point tensor of shape ({m},) like r, got "
                             f"{describe(applied)}: damaged checkpoint")
        n_groups = len(self.base.param_groups)
        if (not isinstance(r_groups, Tensor) or tuple(r_groups.shape) != (m,) or r_groups.is_floating_point()
                or r_groups.is_complex() or r_groups.dtype == torch.bool):
            raise ValueError(f"the checkpoint's r_groups must be an integer tensor of shape ({m},), got "
                             f"{describe(r_groups)}: damaged checkpoint")
        bad_groups = sorted({int(g) for g in r_groups.tolist() if not 0 <= int(g) < n_groups})
        if bad_groups:
            raise ValueError(f"the checkpoint puts mode scalars into param group(s) {bad_groups}, this optimizer has "
                             f"{n_groups} param group(s): build the base optimizer with the same param groups as the "
                             "saved run")
        for what, t in (("r", r), ("applied r", applied)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"the checkpoint's {what} holds NaN/inf: it was saved from a diverged run; resume "
                                 "from an earlier checkpoint")
        labels, a = saved["labels"], saved["a"]
        n = len(self._emb_names)
        if not isinstance(labels, (list, tuple)) or not isinstance(a, (list, tuple)) or len(labels) != n or len(a) != n:
            raise ValueError(f"the checkpoint's mode space must hold {n} label and {n} coefficient tensors, one per "
                             "embedded parameter: damaged checkpoint")
        scales = saved.get("a_scale")  # the 8-bit encoding (absent in float checkpoints and older ones)
        if scales is not None and not (
                isinstance(scales, (list, tuple)) and len(scales) == n
                and all(isinstance(t, Tensor) and tuple(t.shape) == (m,) and t.is_floating_point() for t in scales)):
            raise ValueError(f"the checkpoint's a_scale must hold {n} float tensors of shape ({m},), one per embedded "
                             "parameter: damaged checkpoint")
        if scales is not None and not all(bool(torch.isfinite(t).all()) and bool((t >= 0).all()) for t in scales):
            raise ValueError("the checkpoint's a_scale holds negative or NaN/inf scales: damaged checkpoint")
        for j, (name, p, lab, x) in enumerate(zip(self._emb_names, self._emb_params, labels, a)):
            if not isinstance(lab, Tensor) or lab.is_floating_point() or lab.is_complex() or lab.dtype == torch.bool:
                raise ValueError(f"checkpoint tensor {name!r}: its mode labels must be an integer tensor, got "
                                 f"{describe(lab)}: damaged checkpoint")
            if scales is None and (not isinstance(x, Tensor) or not x.is_floating_point()):
                raise ValueError(f"checkpoint tensor {name!r}: its coefficients a must be a floating-point tensor, "
                                 f"got {describe(x)}: damaged checkpoint")
            if scales is not None:
                if not isinstance(x, Tensor) or x.dtype != torch.int8:
                    raise ValueError(f"checkpoint tensor {name!r}: with a_scale (the 8-bit encoding) its coefficients a "
                                     f"must be int8 codes, got {describe(x)}: damaged checkpoint")
                if kernels.is_packed(lab, p.numel()):
                    if m > kernels.encoding.PACK_MAX_MODES:
                        raise ValueError(f"checkpoint tensor {name!r}: packed 4-bit labels hold at most "
                                         f"{kernels.encoding.PACK_MAX_MODES} modes, the checkpoint has {m}: damaged "
                                         "checkpoint")
                    lab = kernels.unpack_labels(lab, p.numel())
            for what, t in (("mode labels", lab), ("coefficients", x)):
                if t.numel() != p.numel():
                    raise ValueError(
                        f"checkpoint tensor {name!r} has {t.numel()} {what}, the model's parameter has {p.numel()} "
                        f"weights (shape {tuple(p.shape)}): the checkpoint is from a different model; build the same "
                        "model (same layer sizes) as the saved run, or start this optimizer afresh")
            if lab.numel():
                idx = kernels.as_index(lab)
                lo, hi = int(idx.min()), int(idx.max())
                if lo < 0 or hi >= m:
                    raise ValueError(
                        f"checkpoint tensor {name!r} has mode labels from {lo} to {hi}, but the checkpoint has {m} "
                        f"modes (valid labels 0..{m - 1}): the file is damaged or was edited; resume from an intact "
                        "checkpoint")
            if scales is not None:  # the values the codes stand for
                x = kernels.dequantize(x, scales[j], kernels.as_index(lab))
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"checkpoint tensor {name!r}: its coefficients a hold NaN/inf: damaged checkpoint; "
                                 "resume from an intact one")
            # Each mode is normalised (mode_scale): RMS(a) = 1 over its moving members, or unit norm, so no
            # |a| exceeds sqrt(number of embedded weights). Larger values cannot come from a switch and would
            # overflow the weights later (1.01: bf16 rounding of a).
            bound = 1.01 * math.sqrt(self._layout.n)
            if x.numel() and float(x.abs().max()) > bound:
                raise ValueError(f"checkpoint tensor {name!r}: its coefficients a reach |a| = {float(x.abs().max()):.3g}, "
                                 f"above {bound:.3g}, which no switch produces (each mode's a is normalised): damaged "
                                 "checkpoint; resume from an intact one")
        if saved.get("half_base") is not None:
            check_base_state(saved["half_base"], self._emb_names, self._emb_params, m)
        return {int(g) for g in r_groups.tolist()}

    def _check_saved_base(self, base: Any, r_groups: set[int] | None) -> None:
        """The base optimizer's state must have this optimizer's param groups, as they will be after the load."""
        if not isinstance(base, Mapping) or not isinstance(base.get("param_groups"), (list, tuple)) \
                or "state" not in base:
            raise ValueError("the checkpoint's 'base' entry is not an optimizer state dict (keys 'state' and "
                             "'param_groups'): damaged checkpoint")
        groups = base["param_groups"]
        if len(groups) != len(self._orig_params):
            raise ValueError(f"the checkpoint's base optimizer has {len(groups)} param group(s), this one "
                             f"{len(self._orig_params)}: build the base optimizer with the same param groups as the "
                             "saved run")
        emb = {id(p) for p in self._emb_params}
        for gi, (g, orig) in enumerate(zip(groups, self._orig_params)):
            want = len(orig) if r_groups is None else sum(id(p) not in emb for p in orig) + (gi in r_groups)
            got = len(g.get("params", ())) if isinstance(g, Mapping) else -1
            if got != want:
                raise ValueError(f"param group {gi} of the checkpoint's base optimizer holds {got} tensor(s), this "
                                 f"optimizer's would hold {want} after the load: the checkpoint is from a different "
                                 "model or set-up; build both as in the saved run")
        # NaN/inf in the saved moments would poison r (or the weights) at the first step after the load
        names = {id(p): n for n, p in self.model.named_parameters()}
        owner = list(self.model.named_modules())[-1][0]  # where the mode space registers r (ModeSpace.r_owner)
        order = sorted(r_groups or ())
        r_name = [f"{owner}.modeopt_r{j}" if owner else f"modeopt_r{j}" for j in range(len(order))]
        check_optimizer_state_finite(base, [n for gi, orig in enumerate(self._orig_params) for n in
                                            [names.get(id(p), "?") for p in orig if r_groups is None or id(p) not in emb]
                                            + ([r_name[order.index(gi)]] if gi in order else [])])
