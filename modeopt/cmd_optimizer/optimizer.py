"""``CMDOptimizer``: warm up with any torch optimizer, then train only M mode scalars.

Phases (``opt.phase``):

* ``"warmup"`` - the base optimizer trains every parameter; every ``snapshot_every`` steps the
  embeddable parameters are recorded (bounded memory, see :class:`~modeopt.trajectories.trajectory.SnapshotBuffer`).
* ``"embedded"`` - after ``warmup_steps`` steps the recording is decomposed (:func:`~modeopt.decompose`)
  and every embedded weight becomes ``a_i * r[m(i)] + b_i``; the model's trainable parameters are
  the ``n_modes`` scalars ``r`` (registered as ``modeopt_r0``, ``modeopt_r1``, ... on the model's last module, after every
  original parameter, one per param group; never in ``model.state_dict()``) plus what was kept out of the embedding, trained through
  autograd by the base optimizer with its hyper-parameters and LR schedule.
* With ``recluster_every=R``: after R embedded steps it returns to full training
  (``"warmup"`` again, ``opt.cycle`` counts the embeddings) for ``recluster_steps`` recorded
  steps, then embeds afresh.
* ``"exported"`` - after :meth:`CMDOptimizer.export`: plain weights, plain base optimizer.

This module holds the class itself: construction, phase events, the step, the switch and export.
Its other parts are mixins, one job each: :mod:`~modeopt.optim.param_groups` (which parameters are
embedded; param groups kept as wrapped), :mod:`~modeopt.optim.nonfinite` (the NaN/inf policy),
:mod:`~modeopt.cmd_optimizer.warmup_recording` (the snapshots), :mod:`~modeopt.cmd_optimizer.checkpoint` (state dicts and their
validation) and :mod:`~modeopt.optim.wrapping` (a real ``torch.optim.Optimizer`` sharing the base's
groups and state); :mod:`~modeopt.modespace.switch` computes the initial mode space from a decomposition.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from modeopt.utils.checks import check_base_class, check_no_duplicates
from modeopt.optim.wrapping import SharesBaseOptimizer
from .checkpoint import Checkpointing
from modeopt.distributed.ddp import attach
from modeopt.modespace.space import ModeSpace, check_not_in_mode_space
from modeopt.modespace.streamed_switch import stream_mode_space
from modeopt.optim.nonfinite import NonFiniteGuard, NonFiniteWarning, all_finite
from modeopt.optim.settings import check_settings, resolve_mode_scale
from modeopt.distributed.wrappers import check_supported, uses_fsdp2
from modeopt.optim.param_groups import Exclude, ParamGroupGuard
from modeopt.optim.phase_hooks import PhaseHooks
from modeopt.trajectories.snapshots import SnapshotBuffer
from modeopt.modespace.switch import switch_device, world_size
from .warmup_recording import WarmupRecording

__all__ = ["CMDOptimizer", "NonFiniteWarning"]

logger = logging.getLogger("modeopt")

class CMDOptimizer(PhaseHooks, ParamGroupGuard, NonFiniteGuard, WarmupRecording, Checkpointing, SharesBaseOptimizer):
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
        coef_dtype: storage of the coefficients ``a`` in mode space: float32, bfloat16 (half the
            memory and less traffic per step; the model is then exactly ``w = a_bf16 * r + b``,
            the fitted ``a`` rounded to 8 bits of mantissa), or int8: 8-bit codes with a float32 scale
            per (tensor, mode), and labels packed 4 bits per weight for ``n_modes <= 16`` - 1.5 bytes per
            weight for ``a`` and label together (:mod:`modeopt.modespace.kernels.encoding`). Quantising
            at the switch leaves the weights as they are and changes only the direction each moves
            in: the model is exactly ``w = q * scale * r + b``. A mode space loaded from a checkpoint
            keeps the encoding it was saved in.
        progress: progress bars during the decomposition (``None``: only on a terminal).

    Warm-up memory: ``min(T, max_snapshots) * N * itemsize(record_dtype)`` bytes (+ ``4 N`` for
    the baseline of a bf16/fp16 recording, ``2 N`` when the weights are bf16/fp16 themselves),
    ``T = warmup_steps // snapshot_every``, N the number of embedded weights; with ``record_dir`` in a
    file whose pages leave the process as they are written and read. The switch frees the weights'
    gradients, then (once the clustering succeeded) their optimizer state, and writes the result
    straight into compact storage: its peak is the warm-up state plus 1 byte per weight, or the
    embedded storage plus one tensor's float32 coefficients. Embedded-phase memory per embedded weight, on every device: its mode
    (1 byte for M <= 256, 2 up to 65,536, else 4) and ``a`` (4 bytes, or 2 in bfloat16), instead of
    the base optimizer's state (``coef_dtype=torch.int8``, ``M <= 16``: 1.5 bytes for both, plus
    ``4 M`` bytes of scales per tensor); no weight gradient outlives its layer's backward.
    """

    _switch_delay: int = 0  # steps the pending switch has waited for finite weights / snapshots

    def __new__(cls, model: Any = None, base_optimizer: Any = None, **kwargs: Any):
        # A model sharded by FSDP2 (fully_shard) gets the sharded optimizer (docs/scaling-out.md): not a
        # subclass, so Python does not run __init__ again on what this returns.
        if cls is CMDOptimizer and isinstance(model, nn.Module) and uses_fsdp2(model):
            from .sharded import ShardedCMDOptimizer

            return ShardedCMDOptimizer(model, base_optimizer, **kwargs)
        return super().__new__(cls)

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
        # Data parallelism (modeopt.distributed.ddp): a DistributedDataParallel model is unwrapped (and
        # attached below); sharding wrappers and sharded base optimizers are refused with a reason.
        model, ddp = check_supported(model, base_optimizer)
        if isinstance(base_optimizer, CMDOptimizer):
            raise TypeError("base_optimizer is already a CMDOptimizer")
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer).__name__}")
        check_base_class(base_optimizer)
        check_no_duplicates(model, base_optimizer)  # before Optimizer.__init__, whose message names none
        recluster_steps = check_settings(
            n_modes=n_modes, warmup_steps=warmup_steps, snapshot_every=snapshot_every, n_samples=n_samples,
            max_snapshots=max_snapshots, recluster_every=recluster_every, recluster_steps=recluster_steps,
            init=init, mode_scale=mode_scale, coef_dtype=coef_dtype, record_dtype=record_dtype)

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
        self.mode_scale = resolve_mode_scale(mode_scale, base_optimizer)
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
            attach(self, ddp)

    # torch.optim plumbing: param_groups / state / defaults are the base optimizer's own objects
    # (modeopt.optim.wrapping.SharesBaseOptimizer), so the base's load_state_dict cannot leave stale copies.

    def __repr__(self) -> str:
        extra = f", n_modes={self.space.n_modes}" if self.space is not None else ""
        return (f"CMDOptimizer(phase={self.phase!r}, step={self._step}, cycle={self.cycle}{extra}, "
                f"embeddable={self._layout.n:,} weights in {len(self._layout)} tensors, base={self.base!r})")

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
                # the step is undone only after the base step returns.
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
        if space is not None and closure is None and not all_finite(p.grad for p in space.r_params):
            # Like GradScaler: a non-finite gradient is not stepped on (weights, r and state untouched).
            self._skip_step(space, "the gradient of the mode scalars r", restore=False)
            return None
        loss = self._base_step(closure)
        if space is not None:
            self._warn_if_no_grad(space)
            if not all_finite(space.r_params):
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
        if not self._phase_hooks and world_size() > 1:
            warnings.warn(
                f"modeopt: {world_size()} processes run torch.distributed, but this CMDOptimizer is not "
                "attached: under DistributedDataParallel the ranks may pick different modes and the mode "
                "scalars' gradients are NOT all-reduced (the ranks drift apart silently). Call "
                "modeopt.distributed.attach(opt) once before training (see docs/scaling-out.md)", stacklevel=4)
        self._fire("pre_embed")
        check_not_in_mode_space(self.model)  # before the switch frees anything
        for p in self._emb_params:  # the last step's gradients of the weights: mode space has its own
            p.grad = None
        trajs = self._buffer.per_tensor(self._layout)
        # The passes run where the weights are (the result, too); see switch_device. Tensor by tensor,
        # keeping only what mode space keeps (modeopt.modespace.streamed_switch); once the clustering has
        # succeeded nothing can fail for the data's sake, so the weights' optimizer state and gradients,
        # which mode space replaces, are freed before the full pass instead of after it.
        init = stream_mode_space(
            trajs, self._emb_params, self._emb_group, len(self.base.param_groups), n_modes=self.n_modes,
            n_samples=self.n_samples, seed=self.seed + self.cycle, mode_scale=self.mode_scale,
            coef_dtype=self.coef_dtype, fit=self.init == "fit", device=switch_device(self._emb_params),
            progress=self.progress, before_assign=self._free_weight_state)
        del trajs
        self._buffer = None
        m = int(init.r.numel())
        fit = init.fit
        self._enter(labels=init.labels, a=init.a, r_groups=init.r_groups, r=init.r, a_scale=init.a_scale)
        init.labels, init.a, init.a_scale, init.fit = [], [], None, None  # the space holds its own copies
        if fit is not None:  # init="fit", after _enter, which validates before it changes anything
            for p, value in zip(self._emb_params, fit):
                p.copy_(value)
            del fit
        self._switch_delay = 0
        self._record_pending = False
        info = {
            "step": self._step, "cycle": self.cycle, "n_modes": m, "sizes": init.sizes,
            "constant": init.n_constant, "scale": init.scale.tolist(),
            "references": [self._layout.locate(int(i))[0] for i in init.reference],
        }
        self.history.append(info)
        logger.info("modeopt: step %d: embedded %s weights of %d tensors into %d modes (sizes %s); trainable "
                    "parameters now %s", self._step, f"{self._layout.n:,}", len(self._layout), m, info["sizes"],
                    f"{self.trainable_parameters():,}")
        self._fire("embedded")

    def _free_weight_state(self) -> None:
        """The embedded weights' base-optimizer state: what mode space replaces (freed at the switch before the
        full decomposition pass, whose result takes its place in memory; their gradients went first)."""
        for p in self._emb_params:
            self.base.state.pop(p, None)

    def _enter(self, *, labels: Sequence[Tensor], a: Sequence[Tensor], r_groups: Tensor, r: Tensor,
               a_scale: Sequence[Tensor] | None = None) -> None:
        """Build the mode space and move the param groups onto ``r`` (in place). ``a_scale``: ``a`` holds
        the int8 codes of a saved space in the 8-bit encoding, which it keeps (whatever ``coef_dtype``)."""
        space = ModeSpace(self.model, list(zip(self._emb_names, self._emb_params)), labels, a, r_groups, r,
                          coef_dtype=torch.int8 if a_scale is not None else self.coef_dtype, a_scale=a_scale)
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
        two loads does not matter. ``"cmd"`` is described in ``docs/optimizer.md`` ("Checkpoints and resume").
        """
        cmd = self._checkpoint_entry()
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
        self._restore(state_dict["cmd"], state_dict["base"])

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

