"""``CMDOptimizer``: warm up with any torch optimizer, then train only M mode scalars.

Phases (``opt.phase``):

* ``"warmup"`` - the base optimizer trains every parameter; every ``snapshot_every`` steps the
  embeddable parameters are recorded (bounded memory, see :class:`~modeopt.trajectory.SnapshotBuffer`).
* ``"embedded"`` - after ``warmup_steps`` steps the recording is decomposed (:func:`~modeopt.decompose`)
  and every embedded weight becomes ``a_i * r[m(i)] + b_i``; the model's trainable parameters are
  the ``n_modes`` scalars ``r`` (registered on the model as ``modeopt_r0``, ``modeopt_r1``, ...,
  one per param group; never in ``model.state_dict()``) plus what was kept out of the embedding, trained through
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
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._wrapping import SharesBaseOptimizer
from .decomposition import decompose
from .layout import ParamLayout
from .modespace import ModeSpace
from .trajectory import SnapshotBuffer, Trajectory

__all__ = ["CMDOptimizer"]

logger = logging.getLogger("modeopt")

#: Optimizers whose step size does not scale with the gradient's magnitude.
SCALE_INVARIANT = tuple(
    getattr(torch.optim, n)
    for n in ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta", "Rprop", "SparseAdam")
    if hasattr(torch.optim, n)
)

Exclude = Callable[[str, nn.Parameter], bool] | Sequence[str] | None


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
    of embedded weights. Embedded-phase memory per embedded weight: its mode (1 byte for M <= 256
    with the fused CPU kernels, else 2-8) and ``a`` (4 bytes, or 2 in bfloat16), instead of the
    base optimizer's state; no weight gradient outlives its layer's backward.
    """

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
        _check_base_class(base_optimizer)
        _check_no_duplicates(model, base_optimizer)  # before Optimizer.__init__, whose message names none
        _check_int("n_modes", n_modes, 1)
        _check_int("warmup_steps", warmup_steps, 1)
        _check_int("snapshot_every", snapshot_every, 1)
        _check_int("n_samples", n_samples, 1)
        if n_modes > n_samples:
            raise ValueError(f"n_modes={n_modes} > n_samples={n_samples}: ask for fewer modes or sample more "
                             f"weights (n_samples >= 30 * n_modes is a good rule)")
        _check_snapshots("warmup_steps", warmup_steps, snapshot_every)
        if max_snapshots is not None:
            _check_int("max_snapshots", max_snapshots, 3)
        if recluster_every is not None:
            _check_int("recluster_every", recluster_every, 1)
            if recluster_steps is None:
                recluster_steps = max(recluster_every // 4, 3 * snapshot_every)
            _check_int("recluster_steps", recluster_steps, 1)
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
                          f"{_short(frozen)}", stacklevel=3)
        if nonfloat:
            warnings.warn(f"modeopt: {len(nonfloat)} non-floating-point parameter(s) will not be embedded: "
                          f"{_short(nonfloat)}", stacklevel=3)
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
        every evaluation.
        """
        self._check_groups()
        space = self.space
        if closure is not None and space is not None:
            inner = closure

            def closure():
                space.sync()
                return inner()

        loss = self._base_step(closure)
        if space is not None:
            if not space.has_grad() and not self._warned_no_grad:
                self._warned_no_grad = True
                warnings.warn(
                    "modeopt: no gradient reached the mode scalars r this step. Call the model itself "
                    "(model(x), not model.forward(x)) so its forward hooks run, and backward() before step().",
                    stacklevel=2)
            space.sync()
        self._step += 1
        self._phase_step += 1
        self._advance()
        return loss

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

    def _advance(self) -> None:
        if self.phase == "warmup":
            if self._phase_step % self.snapshot_every == 0:
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
        if self._buffer is None:
            steps = (self.warmup_steps if self.cycle == 0 else self.recluster_steps) // self.snapshot_every
            cap = steps if self.max_snapshots is None else min(steps, self.max_snapshots)
            self._buffer = SnapshotBuffer(self._layout.n, dtype=self.record_dtype, capacity=cap,
                                          directory=self.record_dir)
        self._buffer.append(self._layout, self._emb_params, self._step)

    @property
    def recording_bytes(self) -> int:
        """Bytes the warm-up recording holds now (RAM, or file with ``record_dir``)."""
        return 0 if self._buffer is None else self._buffer.nbytes

    # -------------------------------------------------------------- switch
    @torch.no_grad()
    def _embed(self) -> None:
        for name, p in zip(self._emb_names, self._emb_params):
            if not bool(torch.isfinite(p).all()):
                raise ValueError(
                    f"modeopt refuses to embed at step {self._step}: parameter {name!r} holds NaN/inf. The "
                    "training state is unchanged (still in warm-up); fix the divergence (lower the learning "
                    "rate, clip gradients) and resume from a checkpoint")
        if not self._phase_hooks and _world_size() > 1:
            warnings.warn(
                f"modeopt: {_world_size()} processes run torch.distributed, but this CMDOptimizer is not "
                "attached: under DistributedDataParallel the ranks may pick different modes and the mode "
                "scalars' gradients are NOT all-reduced (the ranks drift apart silently). Call "
                "modeopt.distributed.attach(opt) once before training (see docs/scaling-out.md)", stacklevel=4)
        self._fire("pre_embed")
        data, steps = self._buffer.raw()
        traj = Trajectory(data, self._layout, steps, self._buffer.anchor)
        d = decompose(traj, n_modes=self.n_modes, n_samples=self.n_samples, seed=self.seed + self.cycle,
                      progress=self.progress)
        m = d.n_modes
        by_name = dict(zip(self._emb_names, self._emb_params))
        r = torch.tensor([float(by_name[name][idx]) for name, idx in map(self._layout.locate, d.reference.tolist())],
                         dtype=torch.float64)  # the references' values now
        # Per-mode scale of a (see mode_scale). Constants have a = 0 and add nothing to the squares.
        sq = torch.bincount(d.labels, weights=d.a.to(torch.float64) ** 2, minlength=m)
        count = torch.bincount(d.labels[~d.constant], minlength=m).clamp(min=1).to(torch.float64)
        scale = (sq / count).sqrt() if self.mode_scale == "rms" else sq.sqrt()  # > 0: a_ref = 1
        a_scaled = d.a / scale.to(torch.float32)[d.labels]
        # Each mode's scalar joins the param group that holds most of its weights.
        n_groups = len(self.base.param_groups)
        if len(set(self._emb_group)) == 1:
            r_groups = torch.full((m,), self._emb_group[0], dtype=torch.int64)
        else:
            row_group = torch.tensor(self._emb_group, dtype=torch.int64).repeat_interleave(
                torch.tensor(self._layout.numels, dtype=torch.int64))
            moving = ~d.constant
            votes = torch.bincount(d.labels[moving] * n_groups + row_group[moving], minlength=m * n_groups)
            r_groups = votes.view(m, n_groups).argmax(dim=1)
        self._enter(
            labels=[d.labels[s.offset : s.stop] for s in self._layout.specs],
            a=[a_scaled[s.offset : s.stop] for s in self._layout.specs],
            r_groups=r_groups,
            r=(r * scale).to(torch.float32),
        )
        if self.init == "fit":  # after _enter, which validates before it changes anything
            ref_now = r.to(torch.float32)
            for spec, p in zip(self._layout.specs, self._emb_params):
                sl = slice(spec.offset, spec.stop)
                p.copy_(torch.addcmul(d.b[sl], d.a[sl], ref_now[d.labels[sl]]).view_as(p))
        self._buffer = None
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

    def _unembed(self) -> None:
        space = self.space
        space.sync()
        space.remove()
        for gi, group in enumerate(self.base.param_groups):
            group["params"][:] = self._orig_params[gi]
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
        if self.space is not None:
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
        if self._buffer is not None:
            cmd["buffer"] = self._buffer.state_dict()
        if self.space is not None:
            s = self.space
            small = torch.uint8 if s.n_modes <= 256 else torch.int16 if s.n_modes <= 32767 else torch.int32
            cmd["space"] = {
                "labels": [lab.to(small) for lab in s.labels], "a": [x.clone() for x in s.a],
                "r_groups": s.r_groups.clone(), "r": s.r_full().detach().clone(), "applied": s.applied.clone(),
            }
        return {"base": self.base.state_dict(), "cmd": cmd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` (a fresh optimizer built with the same arguments)."""
        if "cmd" not in state_dict or "base" not in state_dict:
            raise ValueError("not a CMDOptimizer state dict (expected the keys 'base' and 'cmd'); to load a "
                             "plain optimizer's state use opt.base.load_state_dict(...)")
        cmd = state_dict["cmd"]
        if list(cmd["names"]) != self._emb_names:
            raise ValueError("the checkpoint embeds different parameters than this optimizer "
                             f"({len(cmd['names'])} vs {len(self._emb_names)} tensors): build the model and the "
                             "CMDOptimizer with the same arguments (exclude=, param groups) as the saved run")
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
        if cmd["buffer"] is not None:
            steps = (self.warmup_steps if self.cycle == 0 else self.recluster_steps) // self.snapshot_every
            cap = steps if self.max_snapshots is None else min(steps, self.max_snapshots)
            self._buffer = SnapshotBuffer(self._layout.n, dtype=self.record_dtype, capacity=cap,
                                          directory=self.record_dir)
            self._buffer.load_state_dict(cmd["buffer"])
        self.base.load_state_dict(state_dict["base"])
        self._fire("loaded")


def _check_base_class(base: torch.optim.Optimizer) -> None:
    """Refuse at construction the base optimizers that cannot train the mode scalars r (a 1-D dense vector)."""
    muon = getattr(torch.optim, "Muon", None)
    if muon is not None and isinstance(base, muon):
        raise TypeError(
            "torch.optim.Muon updates only 2-D matrices, but in mode space the trainable parameters are the mode "
            "scalars r, a vector: wrap an element-wise optimizer (AdamW, SGD, ...) in CMDOptimizer for the "
            "parameters you put in mode space, and train the matrices you keep out of it with a separate Muon")
    if isinstance(base, torch.optim.SparseAdam):
        raise TypeError(
            "torch.optim.SparseAdam takes only sparse gradients, but the gradient of the mode scalars r is dense: "
            "use Adam/AdamW (with nn.Embedding(sparse=False)), or SGD/Adagrad, which take the embedding's sparse "
            "gradients in warm-up and r's dense ones after the switch")


def _check_no_duplicates(model: nn.Module, base: torch.optim.Optimizer) -> None:
    names = {id(p): n for n, p in model.named_parameters()}
    group_of: dict[int, int] = {}
    for gi, group in enumerate(base.param_groups):
        for p in group["params"]:
            if id(p) in group_of:
                where = f"param group {gi}" if group_of[id(p)] == gi else f"param groups {group_of[id(p)]} and {gi}"
                name = names.get(id(p), f"of shape {tuple(p.shape)}")
                raise ValueError(f"the base optimizer lists the parameter {name!r} twice ({where}): give each "
                                 "parameter to the base optimizer once")
            group_of[id(p)] = gi


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_snapshots(name: str, steps: int, every: int) -> None:
    if steps // every < 3:
        raise ValueError(
            f"{name}={steps} with snapshot_every={every} records {steps // every} snapshot(s); CMD needs at "
            f"least 3: make {name} >= {3 * every} or snapshot_every <= {max(1, steps // 3)}")


def _short(names: Sequence[str], k: int = 5) -> str:
    return ", ".join(names[:k]) + (f", ... (+{len(names) - k})" if len(names) > k else "")
