"""``CMDOptimizer``: warm up with any torch optimizer, then train only M mode scalars.

Phases (``opt.phase``):

* ``"warmup"`` - the base optimizer trains every parameter; every ``snapshot_every`` steps the
  embeddable parameters are recorded (bounded memory, see :class:`~modeopt.trajectory.SnapshotBuffer`).
* ``"embedded"`` - after ``warmup_steps`` steps the recording is decomposed (:func:`~modeopt.decompose`)
  and every embedded weight becomes ``a_i * r[m(i)] + b_i``; the model's trainable parameters are
  the ``n_modes`` scalars ``r`` (registered as ``modeopt_r0``, ``modeopt_r1``, ... on the model's last module, after every
  original parameter, one per param group; never in ``model.state_dict()``) plus what was kept out of the embedding, trained through
  autograd by the base optimizer with its hyper-parameters and LR schedule.
* With ``recluster_every=R``: after R embedded steps it returns to full training
  (``"warmup"`` again, ``opt.cycle`` counts the embeddings) for ``recluster_steps`` recorded
  steps, then embeds afresh.
* ``"exported"`` - after :meth:`CMDOptimizer.export`: plain weights, plain base optimizer.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import kernels
from ._checks import check_base_class, check_int, check_no_duplicates, describe, short_names
from ._wrapping import SharesBaseOptimizer
from .decomposition import decompose
from .layout import ParamLayout
from .modespace import ModeSpace
from .snapshots import SnapshotBuffer
from .trajectory import Trajectory

__all__ = ["CMDOptimizer", "NonFiniteWarning"]

logger = logging.getLogger("modeopt")

#: Optimizers whose step size does not scale with the gradient's magnitude.
SCALE_INVARIANT = tuple(
    getattr(torch.optim, n)
    for n in ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta", "Rprop", "SparseAdam")
    if hasattr(torch.optim, n)
)

Exclude = Callable[[str, nn.Parameter], bool] | Sequence[str] | None


class NonFiniteWarning(RuntimeWarning):
    """A step or a snapshot with NaN/inf was skipped (see ``CMDOptimizer.nan_policy``)."""


class CMDOptimizer(SharesBaseOptimizer):
    """Wraps a ``torch.optim`` optimizer: warm-up, then training in CMD mode space.

    Args:
        model: the model whose parameters ``base_optimizer`` trains.
        base_optimizer: any ``torch.optim.Optimizer`` built on ``model.parameters()`` or on
            param groups of them. Its param groups, hyper-parameters and LR schedule are kept.
        n_modes: M, the number of mode scalars trained after the warm-up.
        warmup_steps: base-optimizer steps before the switch to mode space.
        snapshot_every: record the weights every this many steps of a warm-up.
        n_samples: K, weights sampled for the clustering (``>= n_modes``; ~30*M is plenty).
        seed: seed of the sampling (embedding ``c`` uses ``seed + c``); ``None`` draws one from
            torch's global generator, so ``torch.manual_seed`` makes runs reproducible.
        exclude: parameters kept out of the embedding (they stay trainable as usual): a
            predicate ``f(name, param) -> bool`` or a list of name patterns (``fnmatch``, e.g.
            ``["fc.*", "*.bias"]``). A param group with ``"cmd": False`` is kept out whole.
            ``lambda n, p: p.ndim < 2`` keeps biases and norm scales free (often better).
        recluster_every: if given, embedded steps per cycle, after which it returns to full
            training for ``recluster_steps`` steps (recorded) and embeds again with fresh modes.
        recluster_steps: full-training steps between two embeddings (default
            ``max(recluster_every // 4, 3 * snapshot_every)``).
        max_snapshots: keep only the latest snapshots of a warm-up (a ring); default all.
        record_dtype: storage dtype of the snapshots; ``torch.bfloat16`` halves the memory
            (movements from the first snapshot are stored, exactly resolved to ~0.4 %).
        record_dir: keep the snapshots in a memory-mapped file in this directory (not in RAM).
        init: at the switch, ``"keep"`` the current weights (``b`` absorbs the fit residual, so
            the model's function is unchanged) or move them to the CMD ``"fit"``
            ``a_i * w_ref(now) + b_i`` (the post-hoc CMD model, which often tests better).
        mode_scale: how each mode's coefficients are normalised: ``"rms"`` (RMS(a) = 1 in each
            mode: an Adam-type step of ``lr`` on ``r_m`` moves its weights by ~``lr``),
            ``"norm"`` (unit-norm mode directions: SGD on ``r`` is exactly the projection of the
            SGD step onto the modes), or ``"auto"`` (``"rms"`` for scale-invariant optimizers
            such as Adam/AdamW/RMSprop, ``"norm"`` otherwise).
        coef_dtype: storage of the coefficients ``a`` in mode space: float32, or bfloat16 (half the
            memory and less traffic per step; the model is then exactly ``w = a_bf16 * r + b``,
            the fitted ``a`` rounded to 8 bits of mantissa).
        progress: progress bars during the decomposition (``None``: only on a terminal).

    Warm-up memory: ``min(T, max_snapshots) * N * itemsize(record_dtype)`` bytes (+ ``4 N`` for
    the baseline of a bf16/fp16 recording), ``T = warmup_steps // snapshot_every``, N the number
    of embedded weights. Embedded-phase memory per embedded weight, on every device: its mode
    (1 byte for M <= 256, 2 up to 65,536, else 4) and ``a`` (4 bytes, or 2 in bfloat16), instead of
    the base optimizer's state; no weight gradient outlives its layer's backward.
    """

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
    _switch_delay: int = 0
    _record_pending: bool = False
    _warned_nan_step: bool = False
    _warned_nan_snapshot: bool = False

    def __init__(
        self,
        model: nn.Module,
        base_optimizer: torch.optim.Optimizer,
        *,
        n_modes: int = 10,
        warmup_steps: int = 500,
        snapshot_every: int = 10,
        n_samples: int = 1000,
        seed: int | None = None,
        exclude: Exclude = None,
        recluster_every: int | None = None,
        recluster_steps: int | None = None,
        max_snapshots: int | None = None,
        record_dtype: torch.dtype = torch.float32,
        record_dir: str | None = None,
        init: str = "keep",
        mode_scale: str = "auto",
        coef_dtype: torch.dtype = torch.float32,
        progress: bool | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        # Data parallelism (modeopt.distributed): a DistributedDataParallel model is unwrapped (and
        # attached below); sharding wrappers and sharded base optimizers are refused with a reason.
        from .distributed import check_supported  # lazy: the integration imports the core, not the reverse

        model, ddp = check_supported(model, base_optimizer)
        if isinstance(base_optimizer, CMDOptimizer):
            raise TypeError("base_optimizer is already a CMDOptimizer")
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer).__name__}")
        check_base_class(base_optimizer)
        check_no_duplicates(model, base_optimizer)  # before Optimizer.__init__, whose message names none
        check_int("n_modes", n_modes, 1)
        check_int("warmup_steps", warmup_steps, 1)
        check_int("snapshot_every", snapshot_every, 1)
        check_int("n_samples", n_samples, 1)
        if n_modes > n_samples:
            raise ValueError(f"n_modes={n_modes} > n_samples={n_samples}: ask for fewer modes or sample more "
                             f"weights (n_samples >= 30 * n_modes is a good rule)")
        _check_snapshots("warmup_steps", warmup_steps, snapshot_every)
        if max_snapshots is not None:
            check_int("max_snapshots", max_snapshots, 3)
        if recluster_every is not None:
            check_int("recluster_every", recluster_every, 1)
            if recluster_steps is None:
                recluster_steps = max(recluster_every // 4, 3 * snapshot_every)
            check_int("recluster_steps", recluster_steps, 1)
            _check_snapshots("recluster_steps", recluster_steps, snapshot_every)
        elif recluster_steps is not None:
            raise ValueError("recluster_steps needs recluster_every (how many embedded steps per cycle)")
        if init not in ("keep", "fit"):
            raise ValueError(f"init must be 'keep' or 'fit', got {init!r}")
        if mode_scale not in ("auto", "rms", "norm"):
            raise ValueError(f"mode_scale must be 'auto', 'rms' or 'norm', got {mode_scale!r}")
        if coef_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"coef_dtype must be torch.float32 or torch.bfloat16, got {coef_dtype!r}")
        if not (isinstance(record_dtype, torch.dtype) and record_dtype.is_floating_point):
            raise ValueError(f"record_dtype must be a floating-point torch.dtype, got {record_dtype!r}")

        self._init_shared(base_optimizer)
        self.model = model
        self.n_modes = n_modes
        self.warmup_steps = warmup_steps
        self.snapshot_every = snapshot_every
        self.n_samples = n_samples
        self.seed = int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None else int(seed)
        self.recluster_every = recluster_every
        self.recluster_steps = recluster_steps
        self.max_snapshots = max_snapshots
        self.record_dtype = record_dtype
        self.record_dir = record_dir
        self.init = init
        if mode_scale == "auto":
            mode_scale = "rms" if isinstance(base_optimizer, SCALE_INVARIANT) else "norm"
        self.mode_scale = mode_scale
        self.coef_dtype = coef_dtype
        self.progress = progress

        self._phase_hooks: list[Callable[[CMDOptimizer, str], None]] = []  # see register_phase_hook
        self._select(exclude)
        self.phase = "warmup"
        self.cycle = 0
        self._step = 0
        self._phase_step = 0
        self._buffer: SnapshotBuffer | None = None
        self.space: ModeSpace | None = None
        self.history: list[dict[str, Any]] = []
        self._warned_no_grad = False
        self._warned_low_precision = False
        self._group_sizes = self._current_group_sizes()
        if ddp is not None:
            from .distributed import attach

            attach(self, ddp)

    # ---------------------------------------------------- phase hooks
    # Additive integration point (used by modeopt.distributed): the set of trainable parameters
    # changes at the switch, at re-clustering, export and load_state_dict; wrappers that captured it
    # (DistributedDataParallel) must hear about it, and every rank must decompose with the same seed.
    def register_phase_hook(self, fn: Callable[[CMDOptimizer, str], None]) -> Callable[[], None]:
        """Call ``fn(opt, event)`` at every change of phase; returns a function that removes it.

        Events: ``"pre_embed"`` (the switch is about to decompose with ``opt.seed + opt.cycle``: a
        hook may still set ``opt.seed``), ``"embedded"`` (mode space entered), ``"unembedded"``
        (re-clustering returned to full training), ``"exported"`` and ``"loaded"`` (after
        :meth:`load_state_dict`). All but ``"pre_embed"`` mean the trainable parameters changed.
        """
        self._phase_hooks.append(fn)
        return lambda: self._phase_hooks.remove(fn) if fn in self._phase_hooks else None

    def _fire(self, event: str) -> None:
        for fn in list(self._phase_hooks):
            fn(self, event)

    # torch.optim plumbing: param_groups / state / defaults are the base optimizer's own objects
    # (modeopt._wrapping.SharesBaseOptimizer), so the base's load_state_dict cannot leave stale copies.

    def __repr__(self) -> str:
        extra = f", n_modes={self.space.n_modes}" if self.space is not None else ""
        return (f"CMDOptimizer(phase={self.phase!r}, step={self._step}, cycle={self.cycle}{extra}, "
                f"embeddable={self._layout.n:,} weights in {len(self._layout)} tensors, base={self.base!r})")

    # ----------------------------------------------------------- selection
    def _select(self, exclude: Exclude) -> None:
        """Decide once which parameters get embedded, and remember every group's params."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        if callable(exclude):
            excluded = exclude
        elif exclude is None:
            excluded = lambda n, p: False  # noqa: E731
        else:
            patterns = [exclude] if isinstance(exclude, str) else list(exclude)
            excluded = lambda n, p: any(fnmatch.fnmatchcase(n, pat) for pat in patterns)  # noqa: E731
        self._orig_params: list[list[nn.Parameter]] = []
        emb: list[tuple[str, nn.Parameter]] = []
        self._emb_group: list[int] = []
        frozen, nonfloat = [], []
        for gi, group in enumerate(self.base.param_groups):
            self._orig_params.append(list(group["params"]))
            for p in group["params"]:
                if id(p) not in names:
                    raise ValueError(
                        f"the base optimizer's param group {gi} holds a tensor of shape {tuple(p.shape)} that is "
                        "not a parameter of the model: build the base optimizer on model.parameters()")
                name = names[id(p)]
                if not p.is_floating_point():
                    nonfloat.append(name)
                elif not p.requires_grad:
                    frozen.append(name)
                elif group.get("cmd", True) and not excluded(name, p):
                    emb.append((name, p))
                    self._emb_group.append(gi)
        if frozen:
            warnings.warn(f"modeopt: {len(frozen)} frozen parameter(s) (requires_grad=False) will not be embedded: "
                          f"{short_names(frozen)}", stacklevel=3)
        if nonfloat:
            warnings.warn(f"modeopt: {len(nonfloat)} non-floating-point parameter(s) will not be embedded: "
                          f"{short_names(nonfloat)}", stacklevel=3)
        if not emb:
            raise ValueError("nothing to embed: every parameter of the base optimizer is frozen, non-float or "
                             "excluded (check exclude= and the param groups' 'cmd' flags)")
        self._emb_names = [n for n, _ in emb]
        self._emb_params = [p for _, p in emb]
        self._layout = ParamLayout.from_named_tensors(emb)
        if self.n_modes > self._layout.n:
            raise ValueError(f"n_modes={self.n_modes} > the {self._layout.n} weights to embed: ask for fewer modes")

    @property
    def embedded_names(self) -> list[str]:
        """Names of the parameters that go into mode space."""
        return list(self._emb_names)

    # ---------------------------------------------------------------- step
    def step(self, closure: Callable[[], Any] | None = None):
        """One base-optimizer step (of every parameter in warm-up, of ``r`` when embedded).

        With a closure (e.g. LBFGS), the weights are brought up to date with ``r`` before
        every evaluation. In mode space with r on an accelerator, the wrapper adds no host
        synchronisation to the step (see ``nonfinite_check``; the base optimizer may read its own
        host-side state, e.g. torch's non-fused Adam its step counter).
        """
        self._check_groups()
        space = self.space
        if closure is not None and space is not None:
            inner = closure

            def closure():
                # Never write a non-finite r into the weights: an LBFGS line search can reach one, and
                # the step is undone only after the base step returns (issue #15, item 9).
                space.sync(finite_only=True)
                return inner()

        if space is not None and self._device_check(space):
            loss = self._guarded_base_step(space, closure)
            self._warn_if_no_grad(space)
            space.sync()
            self._step += 1
            self._phase_step += 1
            every = self.nonfinite_poll_every
            if every and self._phase_step % every == 0:
                self._poll_skips(stacklevel=3)
            self._advance()
            return loss
        if space is not None and closure is None and not _all_finite(p.grad for p in space.r_params):
            # Like GradScaler: a non-finite gradient is not stepped on (weights, r and state untouched).
            self._skip_step(space, "the gradient of the mode scalars r", restore=False)
            return None
        loss = self._base_step(closure)
        if space is not None:
            self._warn_if_no_grad(space)
            if not _all_finite(space.r_params):
                self._skip_step(space, "the new value of the mode scalars r", restore=True)
                return loss
            space.sync()
        self._step += 1
        self._phase_step += 1
        self._advance()
        return loss

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for cache in ("_orig_ids", "_group_ids_seen"):  # ids of the original's tensors: recomputed lazily
            self.__dict__.pop(cache, None)
        # Copied together with its model (copy.deepcopy of both, a pickled training state): this
        # optimizer drives the copied mode space, which is then no orphan copy (ModeSpace.__setstate__).
        if self.__dict__.get("space") is not None:
            self.space.__dict__["_copied"] = False

    def _warn_if_no_grad(self, space: ModeSpace) -> None:
        if not space.has_grad() and not self._warned_no_grad:
            self._warned_no_grad = True
            warnings.warn(
                "modeopt: no gradient reached the mode scalars r this step. Call the model itself "
                "(model(x), not model.forward(x)) so its forward hooks run, and backward() before step().",
                stacklevel=3)

    # ------------------------------------------------ non-finite steps
    def _device_check(self, space: ModeSpace) -> bool:
        """Whether this embedded step checks NaN/inf on r's device (no host sync), see ``nonfinite_check``."""
        mode = self.nonfinite_check
        if mode not in ("auto", "host", "device"):
            raise ValueError(f"nonfinite_check must be 'auto', 'host' or 'device', got {mode!r}")
        if self.nan_policy == "raise":
            return False
        self._check_nan_policy()
        if mode == "auto":
            return space.applied.device.type != "cpu"
        return mode == "device"

    def _guarded_base_step(self, space: ModeSpace, closure):
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
        if not self._warned_nan_step:
            self._warned_nan_step = True
            warnings.warn(
                f"modeopt: by step {self._step}, {new} embedded step(s) had NaN/inf in the gradient or the new value "
                f"of the mode scalars r: they were skipped on {dev.device} (weights, r and its optimizer state as "
                "before each such step), checked on the device without a host synchronisation, so the skipped "
                "steps still counted toward the warm-up/re-clustering schedule. Later skips are counted in "
                "opt.skipped_steps without a warning", NonFiniteWarning, stacklevel=stacklevel + 1)

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

    def _current_group_sizes(self) -> list[int]:
        return [len(g["params"]) for g in self.base.param_groups]

    def _check_groups(self) -> None:
        """Refuse, before any work, param groups changed behind the wrapper's back (base.add_param_group).

        The switch, re-clustering and export rebuild every group from the groups seen at construction;
        a group added later would make the switch fail half-way.
        """
        if self.phase == "exported":
            return  # a plain optimizer now: nothing is planned from the groups any more
        sizes = self._current_group_sizes()
        if sizes == self._group_sizes:
            self._check_group_identity()
            return
        if len(sizes) != len(self._group_sizes):
            what = f"{len(sizes)} param groups now, {len(self._group_sizes)} when it was wrapped (base.add_param_group?)"
        else:
            gi = next(i for i, (a, b) in enumerate(zip(sizes, self._group_sizes)) if a != b)
            what = f"param group {gi} holds {sizes[gi]} tensors now, {self._group_sizes[gi]} expected"
        raise RuntimeError(
            f"the base optimizer's param groups changed after it was wrapped in CMDOptimizer ({what}). The switch to "
            "mode space is planned from the groups seen at construction, so this step was refused and nothing was "
            "changed. Give the base optimizer every param group before wrapping it (a group with 'cmd': False "
            "stays out of mode space), or call opt.export() first and go on with a plain optimizer")

    def _check_export_groups(self) -> None:
        """Export restores the groups seen at construction. Groups appended since (base.add_param_group
        in mode space, which the next step refuses and points to export) are kept as they are, if they
        hold none of the model's embedded weights; any other change is refused before anything changes."""
        sizes, want = self._current_group_sizes(), self._group_sizes
        if len(sizes) >= len(want) and sizes[: len(want)] == want:
            own = {id(p) for orig in self._orig_params for p in orig}
            added = [p for g in self.base.param_groups[len(want):] for p in g["params"]]
            if not any(id(p) in own for p in added):
                return
            what = "a param group added since holds a parameter the wrapper embeds or trains"
        else:
            what = (f"the first {len(want)} param groups hold {sizes[: len(want)]} tensors, "
                    f"{want} when mode space was entered")
        raise RuntimeError(
            f"export() cannot restore the base optimizer's param groups: {what}. Nothing was changed (still in mode "
            "space). Undo the change to the groups (e.g. base.param_groups.pop()), call opt.export(), then add the "
            "groups to the now plain optimizer")

    def _check_group_identity(self) -> None:
        """A tensor replaced inside a param group (same count) would be dropped silently when the switch
        (or re-clustering, export) rebuilds the groups: refuse it, by identity, before any work.

        One pass over the groups' tensor ids per step (about 15 us for 200 tensors on a busy CPU). The expected ids: in
        warm-up the groups seen at construction; otherwise those seen at the first step after the
        optimizer itself last changed the groups (it then records new group sizes).
        """
        ids = [id(p) for g in self.base.param_groups for p in g["params"]]
        if self.space is None and self.phase == "warmup":
            want = getattr(self, "_orig_ids", None)
            if want is None:  # the groups seen at construction never change
                want = self._orig_ids = [id(p) for orig in self._orig_params for p in orig]
        else:
            seen = getattr(self, "_group_ids_seen", None)
            if seen is None or seen[0] is not self._group_sizes:
                self._group_ids_seen = (self._group_sizes, ids)
                return
            want = seen[1]
        if ids == want:
            return
        k = next(i for i, (a, b) in enumerate(zip(ids, want)) if a != b)
        gi, pos = 0, k
        while pos >= len(self.base.param_groups[gi]["params"]):
            pos -= len(self.base.param_groups[gi]["params"])
            gi += 1
        p = self.base.param_groups[gi]["params"][pos]
        names = {id(q): n for n, q in self.model.named_parameters()}
        what = repr(names[id(p)]) if id(p) in names else f"a tensor of shape {tuple(p.shape)} that is not the model's"
        raise RuntimeError(
            f"the base optimizer's param groups changed after it was wrapped in CMDOptimizer: param group {gi} holds "
            f"{what} at position {pos}, where it held another tensor. The switch to mode space is planned from the "
            "groups seen at construction (a replaced tensor would be dropped silently), so this step was refused and "
            "nothing was changed. Build the base optimizer on the final parameters before wrapping it, or call "
            "opt.export() first and go on with a plain optimizer")

    def _advance(self) -> None:
        if self.phase == "warmup":
            if self._phase_step % self.snapshot_every == 0 or self._record_pending:
                self._record()
            target = self.warmup_steps if self.cycle == 0 else self.recluster_steps
            if self._phase_step >= target:
                self._embed()
        elif self.phase == "embedded" and self.recluster_every is not None:
            if self._phase_step >= self.recluster_every:
                self._unembed()
                self.phase = "warmup"
                self.cycle += 1
                self._phase_step = 0
                self._fire("unembedded")

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
            if not self._warned_nan_snapshot:
                self._warned_nan_snapshot = True
                warnings.warn(
                    f"modeopt: step {self._step}: parameter {bad!r} holds NaN/inf: this snapshot is not recorded "
                    "and the next finite weights are recorded instead (opt.skipped_snapshots counts the skips; "
                    "this warning is given once). The weights are the base optimizer's: if they stay NaN/inf, "
                    "fix the divergence", NonFiniteWarning, stacklevel=4)
            return
        if self._buffer is None:
            self._buffer = self._new_buffer(self.cycle)
        self._buffer.append(self._layout, self._emb_params, self._step)
        self._record_pending = False

    def _new_buffer(self, cycle: int) -> SnapshotBuffer:
        steps = (self.warmup_steps if cycle == 0 else self.recluster_steps) // self.snapshot_every
        cap = steps if self.max_snapshots is None else min(steps, self.max_snapshots)
        return SnapshotBuffer(self._layout.n, dtype=self.record_dtype, capacity=cap, directory=self.record_dir)

    def _first_nonfinite(self) -> str | None:
        """Name of the first embeddable parameter holding NaN/inf, or None."""
        for name, p in zip(self._emb_names, self._emb_params):
            if not bool(torch.isfinite(p).all()):
                return name
        return None

    def _check_nan_policy(self) -> None:
        if self.nan_policy not in ("skip", "raise"):
            raise ValueError(f"nan_policy must be 'skip' or 'raise', got {self.nan_policy!r}")

    @torch.no_grad()
    def _skip_step(self, space: ModeSpace, what: str, *, restore: bool) -> None:
        """An embedded step with a non-finite r: keep the weights as they are and r at the applied value."""
        step = self._step + 1
        if restore:  # the base optimizer already moved r: put it back (and drop state it poisoned)
            for value, p in zip(space.group_values(space.applied), space.r_params):
                p.copy_(value.to(device=p.device, dtype=p.dtype))
                st = self.base.state.get(p)
                if st and not _all_finite(v for v in st.values() if isinstance(v, Tensor) and v.is_floating_point()):
                    self.base.state.pop(p)
        self._check_nan_policy()
        if self.nan_policy == "raise":
            raise FloatingPointError(
                f"modeopt: step {step}: {what} holds NaN/inf (nan_policy='raise'). The step was not applied: the "
                "weights, r and the step count are as before it. Lower the learning rate or clip gradients, or "
                "set opt.nan_policy = 'skip' to skip such steps")
        self._skipped_host += 1
        if not self._warned_nan_step:
            self._warned_nan_step = True
            warnings.warn(
                f"modeopt: step {step}: {what} holds NaN/inf: the step is skipped, like GradScaler does (weights "
                "and r unchanged, the step is not counted). Later skips are counted in opt.skipped_steps "
                "without a warning", NonFiniteWarning, stacklevel=3)

    @property
    def recording_bytes(self) -> int:
        """Bytes the warm-up recording holds now (RAM, or file with ``record_dir``)."""
        return 0 if self._buffer is None else self._buffer.nbytes

    # -------------------------------------------------------------- switch
    @torch.no_grad()
    def _embed(self) -> None:
        bad = self._first_nonfinite()
        have = 0 if self._buffer is None else len(self._buffer)
        if bad is not None or have < 3:
            self._check_nan_policy()
            waited = self._switch_delay
            if self.nan_policy == "raise" or waited >= self.max_switch_delay:
                after = f" (the switch waited {waited} step(s) for it)" if waited else ""
                if bad is not None:
                    raise ValueError(
                        f"modeopt refuses to embed at step {self._step}: parameter {bad!r} holds NaN/inf. The "
                        "training state is unchanged (still in warm-up); fix the divergence (lower the learning "
                        f"rate, clip gradients) and resume from a checkpoint{after}")
                raise ValueError(
                    f"modeopt cannot embed at step {self._step}: only {have} finite snapshot(s) were recorded, CMD "
                    "needs 3. The training state is unchanged (still in warm-up); the next steps record more "
                    f"if the weights are finite{after}")
            self._switch_delay += 1
            self._record_pending = self._record_pending or bad is None  # record the next finite weights
            why = (f"parameter {bad!r} holds NaN/inf" if bad is not None
                   else f"only {have} finite snapshot(s), CMD needs 3")
            warnings.warn(
                f"modeopt: step {self._step}: {why}: the switch to mode space waits a step (wait "
                f"{self._switch_delay} of at most opt.max_switch_delay={self.max_switch_delay}; then it raises)",
                NonFiniteWarning, stacklevel=4)
            return
        if not self._phase_hooks and _world_size() > 1:
            warnings.warn(
                f"modeopt: {_world_size()} processes run torch.distributed, but this CMDOptimizer is not "
                "attached: under DistributedDataParallel the ranks may pick different modes and the mode "
                "scalars' gradients are NOT all-reduced (the ranks drift apart silently). Call "
                "modeopt.distributed.attach(opt) once before training (see docs/scaling-out.md)", stacklevel=4)
        self._fire("pre_embed")
        data, steps = self._buffer.raw()
        traj = Trajectory(data, self._layout, steps, self._buffer.anchor)
        # Issue #16: the full passes run where the weights are (the result, too); see _switch_device.
        d = decompose(traj, n_modes=self.n_modes, n_samples=self.n_samples, seed=self.seed + self.cycle,
                      progress=self.progress, device=_switch_device(self._emb_params))
        m = d.n_modes
        by_name = dict(zip(self._emb_names, self._emb_params))
        r = torch.tensor([float(by_name[name][idx]) for name, idx in map(self._layout.locate, d.reference.tolist())],
                         dtype=torch.float64)  # the references' values now
        # Per-mode scale of a (see mode_scale). Constants have a = 0 and add nothing to the squares.
        sq = torch.bincount(d.labels, weights=d.a.to(torch.float64) ** 2, minlength=m)
        count = torch.bincount(d.labels[~d.constant], minlength=m).clamp(min=1).to(torch.float64)
        scale = (sq / count).sqrt() if self.mode_scale == "rms" else sq.sqrt()  # > 0: a_ref = 1
        a_scaled = d.a / scale.to(torch.float32)[d.labels]
        scale = scale.cpu()  # (M,): on the host with r and r_groups; labels and a stay on d's device
        # Each mode's scalar joins the param group that holds most of its weights.
        n_groups = len(self.base.param_groups)
        if len(set(self._emb_group)) == 1:
            r_groups = torch.full((m,), self._emb_group[0], dtype=torch.int64)
        else:
            row_group = torch.tensor(self._emb_group, dtype=torch.int64).repeat_interleave(
                torch.tensor(self._layout.numels, dtype=torch.int64)).to(d.labels.device)
            moving = ~d.constant
            votes = torch.bincount(d.labels[moving] * n_groups + row_group[moving], minlength=m * n_groups)
            r_groups = votes.view(m, n_groups).argmax(dim=1).cpu()
        self._enter(  # each tensor's labels and a on that tensor's device (no-op on one device)
            labels=[d.labels[s.offset : s.stop].to(p.device) for s, p in zip(self._layout.specs, self._emb_params)],
            a=[a_scaled[s.offset : s.stop].to(p.device) for s, p in zip(self._layout.specs, self._emb_params)],
            r_groups=r_groups,
            r=(r * scale).to(torch.float32),
        )
        if self.init == "fit":  # after _enter, which validates before it changes anything
            ref_now = r.to(device=d.a.device, dtype=torch.float32)
            for spec, p in zip(self._layout.specs, self._emb_params):
                sl = slice(spec.offset, spec.stop)
                p.copy_(torch.addcmul(d.b[sl], d.a[sl], ref_now[d.labels[sl]]).view_as(p))
        self._buffer = None
        self._switch_delay = 0
        self._record_pending = False
        info = {
            "step": self._step, "cycle": self.cycle, "n_modes": m, "sizes": d.sizes.tolist(),
            "constant": int(d.constant.sum()), "scale": scale.tolist(),
            "references": [self._layout.locate(int(i))[0] for i in d.reference],
        }
        self.history.append(info)
        logger.info("modeopt: step %d: embedded %s weights of %d tensors into %d modes (sizes %s); trainable "
                    "parameters now %s", self._step, f"{self._layout.n:,}", len(self._layout), m, info["sizes"],
                    f"{self.trainable_parameters():,}")
        self._fire("embedded")

    def _enter(self, *, labels: Sequence[Tensor], a: Sequence[Tensor], r_groups: Tensor, r: Tensor) -> None:
        """Build the mode space and move the param groups onto ``r`` (in place)."""
        space = ModeSpace(self.model, list(zip(self._emb_names, self._emb_params)), labels, a, r_groups, r,
                          coef_dtype=self.coef_dtype)
        emb_ids = {id(p) for p in self._emb_params}
        r_of_group = dict(zip(space.groups, space.r_params))
        for gi, group in enumerate(self.base.param_groups):
            kept = [p for p in self._orig_params[gi] if id(p) not in emb_ids]
            if gi in r_of_group:
                kept.append(r_of_group[gi])
            group["params"][:] = kept  # the same list object: schedulers and wrappers hold the dicts
        for p in self._emb_params:
            self.base.state.pop(p, None)  # the weights' optimizer state is no longer needed
        self._params_changed()
        self.space = space
        self.phase = "embedded"
        self._phase_step = 0
        low = sorted({str(p.dtype).replace("torch.", "") for p in self._emb_params
                      if p.dtype in (torch.bfloat16, torch.float16)})
        if low and not self._warned_low_precision:
            self._warned_low_precision = True
            warnings.warn(
                f"modeopt: the embedded weights are {'/'.join(low)}. Mode space applies each change of r to "
                "them in place (w += a * dr), and in half precision the rounding of every step accumulates: "
                "the weights drift away from a * r + b (measured on a bf16 MLP with AdamW: after 400 embedded "
                "steps the error was 60 % of the intended movement). Keep float32 weights and train under "
                "torch.autocast (mixed precision) instead; see docs/optimizer.md, 'Half-precision weights'",
                stacklevel=5)

    def _unembed(self) -> None:
        space = self.space
        self._poll_skips(stacklevel=4)
        space.sync()
        space.remove()
        # Groups appended after the switch (allowed before export, see _check_export_groups) stay as they are.
        for group, orig in zip(self.base.param_groups, self._orig_params):
            group["params"][:] = orig
        for p in space.r_params:
            self.base.state.pop(p, None)
        self._params_changed()
        self.space = None

    def _params_changed(self) -> None:
        """Tell optimizers that keep whole-parameter-set state that the set changed."""
        self._group_sizes = self._current_group_sizes()
        if isinstance(self.base, torch.optim.LBFGS):
            # LBFGS caches the total size and keeps its curvature history (vectors over all
            # params) under the first parameter: both describe the old parameter set.
            self.base._numel_cache = None
            self.base.state.clear()

    def trainable_parameters(self) -> int:
        """Number of scalars that require grad in the model now."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    # -------------------------------------------------------------- export
    def export(self) -> nn.Module:
        """Leave mode space for good: the model gets back plain trainable parameters.

        The weights are maintained in place, so the exported model computes exactly the function
        of the embedded one, with the original parameter names and shapes. Afterwards this
        optimizer behaves like the plain base optimizer (fresh state for the weights).
        """
        self._poll_skips(stacklevel=3)
        if self.space is not None:
            self._check_export_groups()
            self._unembed()
        self._buffer = None
        self.phase = "exported"
        self._fire("exported")
        return self.model

    # ------------------------------------------------------- state dicts
    def state_dict(self) -> dict[str, Any]:
        """``{"base": base.state_dict(), "cmd": ...}`` - tensors and plain values only.

        Loading needs the model's own ``state_dict`` too (the weights live there); the order of the
        two loads does not matter.
        """
        cmd: dict[str, Any] = {
            "version": 1, "phase": self.phase, "step": self._step, "phase_step": self._phase_step,
            "cycle": self.cycle, "seed": self.seed, "n_modes": self.n_modes, "names": list(self._emb_names),
            "history": [dict(h) for h in self.history], "buffer": None, "space": None,
        }
        self._poll_skips(stacklevel=4)
        if self._buffer is not None:
            cmd["buffer"] = self._buffer.state_dict()
        if self.space is not None:
            s = self.space
            # labels as stored (kernels.label_dtype: int16 holds uint16 values, read by kernels.as_index)
            cmd["space"] = {
                "labels": [lab.clone() for lab in s.labels], "a": [x.clone() for x in s.a],
                "r_groups": s.r_groups.clone(), "r": s.r_full().detach().clone(), "applied": s.applied.clone(),
            }
        return {"base": self.base.state_dict(), "cmd": cmd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` (a fresh optimizer built with the same arguments).

        Everything is checked against this optimizer and its model first (names, shapes, dtypes,
        mode labels, finiteness, the recording, the base optimizer's groups): a checkpoint that does
        not fit raises ``ValueError`` and leaves the optimizer and the model as they were.
        """
        if not isinstance(state_dict, Mapping) or "cmd" not in state_dict or "base" not in state_dict:
            raise ValueError("not a CMDOptimizer state dict (expected the keys 'base' and 'cmd'); to load a "
                             "plain optimizer's state use opt.base.load_state_dict(...)")
        cmd = state_dict["cmd"]
        buffer = self._checked_load(cmd, state_dict["base"])  # raises before anything changes
        if self.space is not None:
            self._unembed()
        self._buffer = None
        saved = cmd["space"]
        if saved is not None:
            self._enter(labels=saved["labels"], a=saved["a"], r_groups=saved["r_groups"], r=saved["r"])
            self.space.applied.copy_(saved["applied"])
        self.phase = cmd["phase"]
        self._step, self._phase_step, self.cycle = int(cmd["step"]), int(cmd["phase_step"]), int(cmd["cycle"])
        self.seed = int(cmd["seed"])
        # The run's M comes with it, like its seed (older checkpoints: the size of the saved space).
        n_modes = cmd.get("n_modes", None if saved is None else int(saved["r"].numel()))
        if n_modes is not None and int(n_modes) != self.n_modes:
            warnings.warn(f"modeopt: the checkpoint was trained with n_modes={int(n_modes)}; this CMDOptimizer was "
                          f"built with n_modes={self.n_modes}: opt.n_modes is now {int(n_modes)}, as in the "
                          "checkpoint", stacklevel=3)
            self.n_modes = int(n_modes)
        self.history = [dict(h) for h in cmd["history"]]
        self._buffer = buffer
        self._switch_delay, self._record_pending = 0, False
        self.base.load_state_dict(state_dict["base"])
        self._fire("loaded")

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
            v = cmd[k]
            if not isinstance(v, int) or isinstance(v, bool) or (k != "seed" and v < 0):
                at_least = "" if k == "seed" else " >= 0"
                raise ValueError(f"the checkpoint's {k!r} must be an integer{at_least}, got {v!r}")
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
                "(the switch waits for 3 finite ones if fewer remain)", NonFiniteWarning, stacklevel=3)
        return buffer

    def _check_saved_n_modes(self, n_modes: Any, saved: Any) -> None:
        """The run's M (absent in older checkpoints): what this optimizer could decompose into, and at
        least the number of mode scalars of a saved space (the clustering may give fewer than asked)."""
        if not isinstance(n_modes, int) or isinstance(n_modes, bool) or n_modes < 1:
            raise ValueError(f"the checkpoint's 'n_modes' must be an integer >= 1, got {n_modes!r}: damaged checkpoint")
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
        for name, p, lab, x in zip(self._emb_names, self._emb_params, labels, a):
            if not isinstance(lab, Tensor) or lab.is_floating_point() or lab.is_complex() or lab.dtype == torch.bool:
                raise ValueError(f"checkpoint tensor {name!r}: its mode labels must be an integer tensor, got "
                                 f"{describe(lab)}: damaged checkpoint")
            if not isinstance(x, Tensor) or not x.is_floating_point():
                raise ValueError(f"checkpoint tensor {name!r}: its coefficients a must be a floating-point tensor, "
                                 f"got {describe(x)}: damaged checkpoint")
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


def _all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t is not None)


def _undoable(v: Any, p: Tensor) -> bool:
    """Optimizer state the device-side NaN/inf check restores: tensors on the parameter's device."""
    return isinstance(v, Tensor) and v.device == p.device and v.layout == torch.strided








def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _switch_device(params: Sequence[Tensor]) -> torch.device:
    """Where the switch decomposes: the weights' CUDA device (the first one when they are spread
    over several; the results then move per tensor), else the CPU as before (#16)."""
    cuda = sorted({p.device for p in params if p.device.type == "cuda"}, key=lambda d: d.index or 0)
    return cuda[0] if cuda else torch.device("cpu")




def _check_snapshots(name: str, steps: int, every: int) -> None:
    if steps // every < 3:
        raise ValueError(
            f"{name}={steps} with snapshot_every={every} records {steps // every} snapshot(s); CMD needs at "
            f"least 3: make {name} >= {3 * every} or snapshot_every <= {max(1, steps // 3)}")

