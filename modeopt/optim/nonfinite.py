"""What :class:`~modeopt.CMDOptimizer` does with NaN/inf: skip (and count) or raise.

An embedded step whose ``r`` gradient or new ``r`` is non-finite is not applied; it is checked
either on the host before the step counts, or on r's device with ``torch.where`` (no host
synchronisation; the skips are counted in a device tensor and read lazily). The user-facing
policy and its trade-offs: ``docs/optimizer.md``, "Non-finite steps".

:class:`NonFiniteGuard` is a mixin of ``CMDOptimizer``: it reads the optimizer's ``base``,
``space``, ``_step``, ``_phase_step`` and the embedded parameters ``_emb_names`` /
``_emb_params``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["NonFiniteWarning", "NonFiniteGuard", "SkipsNonFiniteSteps", "all_finite", "finite", "evaluate_first", "first_nonfinite_weight",
           "check_optimizer_state_finite"]


class NonFiniteWarning(RuntimeWarning):
    """A step or a snapshot with NaN/inf was skipped (see ``CMDOptimizer.nan_policy``)."""


def all_finite(tensors: Iterable[Tensor | None]) -> bool:
    """Whether every given tensor (``None`` entries ignored) holds only finite values (host syncs)."""
    return all(bool(torch.isfinite(t).all()) for t in tensors if t is not None)


def finite(tensors: Iterable[Tensor | None]) -> bool:
    """Whether every given tensor (``None`` ignored; a sparse one by its values) is finite: one host
    synchronisation per device, whatever the number of tensors.

    Exact, and cheap: a NaN or ±inf element makes its tensor's sum NaN or ±inf, so a finite sum means
    finite elements; only tensors whose sum is not finite (a NaN, or finite values that overflow the
    sum) are read element-wise. ``isfinite(t).all()`` on every tensor was ~100x slower on the CPU
    (it writes an N-byte mask first).
    """
    by_device: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        if t is None:
            continue
        if t.is_sparse:
            t = t.coalesce().values()
        if t.is_floating_point() or t.is_complex():
            by_device.setdefault(t.device, []).append(t)
    for ts in by_device.values():
        sums = torch.stack([t.sum() for t in ts])
        if bool(torch.isfinite(sums).all()):
            continue
        if not all(bool(torch.isfinite(t).all()) for t, ok in zip(ts, torch.isfinite(sums).tolist()) if not ok):
            return False
    return True


def first_nonfinite_weight(model: torch.nn.Module) -> str | None:
    """``"parameter 'name'"`` / ``"buffer 'name'"`` of the model's first float tensor holding NaN/inf, or None."""
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            if t.is_floating_point() and not finite([t]):
                return f"{kind} {name!r}"
    return None


def evaluate_first(closure: Callable[[], Any], before: Callable[[], None] | None = None) -> tuple[Callable[[], Any], Any]:
    """Evaluate ``closure`` once now (under ``enable_grad``, after ``before()``), so that its gradients can be
    checked before the base step changes anything. Returns ``(closure for the base, the loss)``: the
    base's first call gets this evaluation (torch's optimizers evaluate the closure first thing, before
    any change), later calls (LBFGS) evaluate afresh, each after ``before()``."""

    def evaluate():
        if before is not None:
            before()
        return closure()

    with torch.enable_grad():
        first = [evaluate()]
    loss = first[0]

    def again():
        return first.pop() if first else evaluate()

    return again, loss


class SkipsNonFiniteSteps:
    """GradScaler-like skipping for a wrapper whose base optimizer trains weights (``BlockwiseCMD``,
    ``OnlineCMDOptimizer``): a step with a non-finite gradient of a tensor it would change is not taken.

    The host class has ``model`` and a ``skipped_steps`` counter; :meth:`_skips_nonfinite` is called
    before the base step, with the tensors the step would change and the number of that step.
    """

    _warned_skip: bool = False
    _consecutive_skips: int = 0
    #: Skipped steps in a row after which a step raises ``ValueError`` instead: with finite weights, a
    #: gradient that is NaN/inf at every step (weights so large that the forward overflows, a loss that is
    #: NaN for every batch) would otherwise skip every step for ever, silently after the first warning.
    max_consecutive_skips: int = 10

    def _skips_nonfinite(self, params: Sequence[Tensor], step: int) -> bool:
        """True if the gradient of some tensor of ``params`` holds NaN/inf: the step is to be skipped
        (counted in ``skipped_steps``, one ``NonFiniteWarning`` the first time). ``ValueError`` instead,
        naming the tensor, if the model's weights already hold NaN/inf: every later step would be skipped
        too. One host synchronisation per device."""
        if finite(p.grad for p in params):
            self._consecutive_skips = 0
            return False
        bad_weight = first_nonfinite_weight(self.model)
        if bad_weight is not None:
            raise ValueError(
                f"modeopt: step {step}: {bad_weight} holds NaN/inf, so every gradient would and every step would be "
                "skipped; nothing changed. The training diverged (lower the learning rate, clip gradients) or the "
                "weights were loaded so: resume from a checkpoint")
        if self._consecutive_skips >= self.max_consecutive_skips:
            raise ValueError(
                f"modeopt: step {step}: the last {self._consecutive_skips + 1} steps were all skipped (NaN/inf gradients "
                "from finite weights): the training is stuck; nothing changed. The weights may have grown so large "
                "that the forward overflows (lower the learning rate, clip gradients, resume from a checkpoint), or "
                "the loss is NaN for every batch (check the data and the loss); raise opt.max_consecutive_skips to "
                "allow longer runs of skips")
        self._consecutive_skips += 1
        self.skipped_steps += 1
        if not self._warned_skip:
            self._warned_skip = True
            bad = next(p for p in params if not finite([p.grad]))
            name = next((n for n, p in self.model.named_parameters() if p is bad), "a parameter")
            warnings.warn(f"{type(self).__name__}: step {step}: the gradient of {name!r} holds NaN/inf: the step is "
                          "skipped (nothing changes, the step is not counted), as GradScaler does. Later skips are "
                          "counted in opt.skipped_steps without a warning", NonFiniteWarning, stacklevel=4)
        return True


def _undoable(v: Any, p: Tensor) -> bool:
    """Optimizer state the device-side NaN/inf check restores: tensors on the parameter's device."""
    return isinstance(v, Tensor) and v.device == p.device and v.layout == torch.strided


class NonFiniteGuard:
    """The non-finite policy of ``CMDOptimizer``: its settings, counters and the guarded step."""

    #: What a NaN/inf does (docs/optimizer.md, "Non-finite steps"): ``"skip"`` - an embedded step
    #: whose ``r`` gradient or new ``r`` is non-finite is not applied, a snapshot with NaN/inf weights
    #: is not recorded, a switch waits up to ``max_switch_delay`` steps for finite weights; each skip
    #: is counted and warned about once. ``"raise"`` - ``FloatingPointError`` instead, state intact.
    #: Set it on the instance: ``opt.nan_policy = "raise"``.
    nan_policy: str = "skip"
    #: Steps a switch may wait for finite weights (and 3 finite snapshots) before it raises.
    max_switch_delay: int = 10
    #: Where an embedded step's NaN/inf check runs (docs/optimizer.md, "Non-finite values"):
    #: ``"host"`` - read on the host before the step is applied (immediate: a skipped step is not
    #: counted); ``"device"`` - decided on r's device with ``torch.where``, no host synchronisation
    #: (a skipped step still counts toward the schedule; skips are counted in a device tensor and
    #: reported lazily); ``"auto"`` - ``"host"`` when r lives on the CPU, else ``"device"``.
    #: ``nan_policy="raise"`` always checks on the host (raising needs the answer at once).
    nonfinite_check: str = "auto"
    #: With the device-side check, read its skip counter (one host synchronisation) every this many
    #: embedded steps to give the warning; 0: only at ``opt.skipped_steps``, ``state_dict()`` and
    #: phase changes. Never while a CUDA graph is being captured.
    nonfinite_poll_every: int = 100
    _skipped_host: int = 0
    _skipped_dev: Tensor | None = None  # device-side count of skipped steps, folded in by _poll_skips
    _skipped_dev_seen: int = 0
    #: Warm-up snapshots not recorded at their step because a weight was non-finite.
    skipped_snapshots: int = 0
    _warned_nan_step: bool = False
    _warned_nan_snapshot: bool = False

    def _check_nan_policy(self) -> None:
        if self.nan_policy not in ("skip", "raise"):
            raise ValueError(f"nan_policy must be 'skip' or 'raise', got {self.nan_policy!r}")

    def _warn_once(self, flag: str, message: str, stacklevel: int) -> None:
        """Give a ``NonFiniteWarning`` unless the instance flag ``flag`` says it was given; set it."""
        if not getattr(self, flag):
            setattr(self, flag, True)
            warnings.warn(message, NonFiniteWarning, stacklevel=stacklevel + 1)

    def _first_nonfinite(self) -> str | None:
        """Name of the first embeddable parameter holding NaN/inf, or None."""
        if finite(self._emb_params):  # no N-byte mask (the record step's largest allocation otherwise)
            return None
        for name, p in zip(self._emb_names, self._emb_params):
            if not finite([p]):
                return name
        return None

    def _device_check(self, space) -> bool:
        """Whether this embedded step checks NaN/inf on r's device (no host sync), see ``nonfinite_check``."""
        mode = self.nonfinite_check
        if mode not in ("auto", "host", "device"):
            raise ValueError(f"nonfinite_check must be 'auto', 'host' or 'device', got {mode!r}")
        if self.nan_policy == "raise":
            return False
        self._check_nan_policy()
        if mode == "auto":
            return space.r_in_weights.device.type != "cpu"
        return mode == "device"

    def _guarded_base_step(self, space, closure):
        """The base step on ``r``, undone on the device where it was not finite: no host sync.

        Before the step, ``r`` and the tensors of its optimizer state (M-sized) are copied; after it,
        ``finite`` (r's gradient and new value) selects per element between the new and the old values
        (``torch.where``), state the step created is reset to zeros where not finite (a fresh state for
        Adam's moments and SGD's momentum), and a device counter counts the skips. Optimizer state
        held on another device than r (Adam's ``step`` counter on the host when r is on a GPU, unless
        ``fused``/``capturable``) is not undone: reading the answer there would synchronise.
        """
        rs = space.r_params
        state = self.base.state
        with torch.no_grad():
            old_r = [p.detach().clone() for p in rs]
            old_state = [{k: v.clone() for k, v in state.get(p, {}).items() if _undoable(v, p)} for p in rs]
        loss = self._base_step(closure)
        with torch.no_grad():
            checks = [torch.isfinite(p).all() for p in rs]
            checks += [torch.isfinite(p.grad).all() for p in rs
                       if p.grad is not None and p.grad.layout == torch.strided]
            finite = torch.stack(checks).all()
            for p, old in zip(rs, old_r):
                p.copy_(torch.where(finite, p, old))
            for p, old in zip(rs, old_state):
                for k, v in state.get(p, {}).items():
                    if _undoable(v, p):
                        prev = old.get(k)
                        prev = torch.zeros_like(v) if prev is None or prev.shape != v.shape else prev
                        v.copy_(torch.where(finite, v, prev))
            if self._skipped_dev is not None and self._skipped_dev.device != finite.device:
                self._poll_skips(stacklevel=4)  # r moved to another device (a load): fold the old counter in
                self._skipped_dev = None
            if self._skipped_dev is None:
                self._skipped_dev, self._skipped_dev_seen = torch.zeros((), dtype=torch.int64, device=finite.device), 0
            self._skipped_dev.add_(finite.logical_not())
        return loss

    def _poll_skips(self, stacklevel: int = 2) -> None:
        """Fold the device-side skip count into ``skipped_steps`` (one host sync) and warn once."""
        dev = self._skipped_dev
        if dev is None:
            return
        if dev.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return
        total = int(dev)
        new, self._skipped_dev_seen = total - self._skipped_dev_seen, total
        if new <= 0:
            return
        self._skipped_host += new
        self._warn_once(
            "_warned_nan_step",
            f"modeopt: by step {self._step}, {new} embedded step(s) had NaN/inf in the gradient or the new value "
            f"of the mode scalars r: they were skipped on {dev.device} (weights, r and its optimizer state as "
            "before each such step), checked on the device without a host synchronisation, so the skipped "
            "steps still counted toward the warm-up/re-clustering schedule. Later skips are counted in "
            "opt.skipped_steps without a warning", stacklevel=stacklevel + 1)

    @property
    def skipped_steps(self) -> int:
        """Embedded steps skipped because ``r`` or its gradient was non-finite (reading it folds in the
        device-side count: one host synchronisation when that check is in use)."""
        self._poll_skips(stacklevel=3)
        return self._skipped_host

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._poll_skips(stacklevel=3)
        self._skipped_host = int(value)

    @torch.no_grad()
    def _skip_step(self, space, what: str, *, restore: bool) -> None:
        """An embedded step with a non-finite r: keep the weights as they are and r at the applied value."""
        step = self._step + 1
        if restore:  # the base optimizer already moved r: put it back (and drop state it poisoned)
            for value, p in zip(space.group_values(space.r_in_weights), space.r_params):
                p.copy_(value.to(device=p.device, dtype=p.dtype))
                st = self.base.state.get(p)
                if st and not all_finite(v for v in st.values() if isinstance(v, Tensor) and v.is_floating_point()):
                    self.base.state.pop(p)
        self._check_nan_policy()
        if self.nan_policy == "raise":
            raise FloatingPointError(
                f"modeopt: step {step}: {what} holds NaN/inf (nan_policy='raise'). The step was not applied: the "
                "weights, r and the step count are as before it. Lower the learning rate or clip gradients, or "
                "set opt.nan_policy = 'skip' to skip such steps")
        self._skipped_host += 1
        self._warn_once(
            "_warned_nan_step",
            f"modeopt: step {step}: {what} holds NaN/inf: the step is skipped, like GradScaler does (weights "
            "and r unchanged, the step is not counted). Later skips are counted in opt.skipped_steps "
            "without a warning", stacklevel=3)


def check_optimizer_state_finite(base_state: Mapping[str, Any], names: Sequence[str]) -> None:
    """No NaN/inf in the saved base optimizer's state, nor NaN in its hyper-parameters (checked by
    the caller first: a ``torch.optim`` state_dict with ``param_groups`` of dicts with a ``params`` list,
    and a ``state`` dict). ``names``: the name of each saved parameter id's tensor, in the order of the
    saved param groups' ``params``. Raises ``ValueError`` naming the tensor and the state entry.

    Loaded, a NaN moment would make its tensor NaN at the next step (a finished block's ``r``: the
    block would never move again; a shadow model's moments: poisoned for good).
    """
    groups, state = base_state.get("param_groups"), base_state.get("state")
    if not isinstance(groups, (list, tuple)) or not isinstance(state, Mapping):
        return  # not a state_dict at all: the caller's structural checks (or torch's) say so
    ids = [i for g in groups if isinstance(g, Mapping) for i in g.get("params", ())]
    name_of = dict(zip(ids, names))
    for i, st in state.items():
        for key, v in (st.items() if isinstance(st, Mapping) else ()):
            if _nonfinite(v, nan_only=False):
                raise ValueError(f"the checkpoint's base optimizer's state {key!r} of {name_of.get(i, i)!r} holds "
                                 f"NaN/inf: damaged checkpoint; resume from an intact checkpoint")
    for gi, g in enumerate(groups):
        for key, v in (g.items() if isinstance(g, Mapping) else ()):
            if key != "params" and _nonfinite(v, nan_only=True):
                raise ValueError(f"the checkpoint's base param group {gi} has {key}={v!r} (NaN): damaged checkpoint")


def _nonfinite(v: Any, *, nan_only: bool) -> bool:
    """Whether a state value (tensor, float, or a tuple/list of them) holds NaN (or inf unless ``nan_only``)."""
    if isinstance(v, Tensor):
        if hasattr(v, "to_local"):  # a DTensor (FSDP2): this rank's part; the caller makes the ranks agree
            v = v.to_local()
        if not (v.is_floating_point() or v.is_complex()) or v.numel() == 0:
            return False
        return bool(torch.isnan(v).any()) if nan_only else not bool(torch.isfinite(v).all())
    if isinstance(v, float):
        return math.isnan(v) if nan_only else not math.isfinite(v)
    if isinstance(v, (list, tuple)):
        return any(_nonfinite(x, nan_only=nan_only) for x in v)
    return False
