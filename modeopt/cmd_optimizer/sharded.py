"""``CMDOptimizer`` on a model sharded by FSDP2 (``fully_shard``): every rank works on its own shards.

``modeopt.CMDOptimizer(model, base, ...)`` returns a :class:`ShardedCMDOptimizer` when the model's
parameters are FSDP2 DTensors. FSDP2 keeps owning the weights in every phase: it all-gathers them
before each forward and reduce-scatters their gradients after the backward.

* warm-up: the base optimizer steps the DTensor parameters (as it would without modeopt); every
  ``snapshot_every`` steps each rank records its local shards (``p.to_local()``), ``(T, N/world)``;
* the switch: :func:`~modeopt.distributed.sharded_switch.decompose_shards` - the same modes, ``a`` and ``b`` as
  :func:`~modeopt.decompose` on the whole recording in one process, each rank holding its rows only;
* embedded: the weights stay FSDP parameters with ``requires_grad``. When FSDP2 has written a
  shard's gradient, a post-accumulate-grad hook reduces it onto the M modes
  (:func:`modeopt.modespace.kernels.reduce`, ``sum a_i g_i`` per mode) and drops it, so no weight gradient
  outlives its layer's reduce-scatter. At ``step()`` one all-reduce of M float32 partial sums
  (4 M bytes) gives every rank the same ``dL/dr``; the base optimizer steps ``r``, and each rank
  applies ``w += a * dr[m]`` to its float32 shards in place (:func:`modeopt.modespace.kernels.update`).
  bfloat16/float16 shards are exact instead (:mod:`~modeopt.cmd_optimizer.sharded_half`): each keeps
  its value at the switch (the base) and FSDP2 all-gathers ``round(base + a * (r - r_base)[m])``,
  formed in float32 and rounded once, as :class:`~modeopt.modespace.space.ModeSpace` forms them.

Checkpoints: :mod:`~modeopt.cmd_optimizer.sharded_checkpoint` (``torch.distributed.checkpoint``, resharding).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from modeopt.modespace import kernels
from modeopt.modespace.half import HALF_DTYPES
from modeopt.optim.nonfinite import NonFiniteWarning, finite
from modeopt.optim.wrapping import SharesBaseOptimizer
from modeopt.trajectories.layout import ParamLayout
from modeopt.optim.settings import check_settings, resolve_mode_scale
from modeopt.distributed.wrappers import check_supported
from modeopt.optim.param_groups import Exclude, ParamGroupGuard
from modeopt.optim.phase_hooks import PhaseHooks
from .sharded_checkpoint import ShardedCheckpointing
from .sharded_half import ShardedHalf
from modeopt.distributed.sharded_switch import decompose_shards, shard_mode_space
from modeopt.distributed.sharding import ShardMap
from modeopt.trajectories.trajectory import Trajectory

__all__ = ["ShardedCMDOptimizer", "UNSUPPORTED_OPTIONS"]

logger = logging.getLogger("modeopt")

#: CMDOptimizer options that the FSDP2 path refuses, and why.
UNSUPPORTED_OPTIONS = {
    "recluster_every": "re-clustering under FSDP2 is not implemented",
    "recluster_steps": "re-clustering under FSDP2 is not implemented",
    "max_snapshots": "the sharded recording keeps every snapshot of the warm-up (no ring)",
    "record_dir": "the sharded recording is held in RAM (each rank T x N/world floats)",
}


class ShardedCMDOptimizer(PhaseHooks, ParamGroupGuard, ShardedCheckpointing, ShardedHalf, SharesBaseOptimizer):
    """:class:`~modeopt.CMDOptimizer` for an FSDP2 model (build it through ``modeopt.CMDOptimizer``).

    Takes CMDOptimizer's arguments except ``recluster_every``/``recluster_steps``, ``max_snapshots``
    and ``record_dir`` (:data:`UNSUPPORTED_OPTIONS`); ``record_dtype`` must be float32. Every rank
    must build it, step it and save it together (the switch and each embedded step are collective).

    Per rank it holds: in warm-up the recording of its shards, ``T * N/world * 4`` bytes; in mode
    space its shards' ``a`` (``coef_dtype``) and labels (1 byte for M <= 256), and ``r``.
    """

    sharded = True  #: what :mod:`modeopt.integrations.hf` checks (no DDP to attach)
    #: drop each weight's gradient shard as soon as it is reduced onto the modes (False keeps it until
    #: the step, as a plain optimizer would: 4 N/world bytes more; benchmarks/fsdp_memory.py measures both)
    drop_weight_grads = True

    def __init__(self, model: nn.Module, base_optimizer: torch.optim.Optimizer, *, n_modes: int = 10,
                 warmup_steps: int = 500, snapshot_every: int = 10, n_samples: int = 1000, seed: int | None = None,
                 exclude: Exclude = None, record_dtype: torch.dtype = torch.float32, init: str = "keep",
                 mode_scale: str = "auto", coef_dtype: torch.dtype = torch.float32, progress: bool | None = None,
                 **options: Any):
        for name, value in options.items():
            if name not in UNSUPPORTED_OPTIONS:
                raise TypeError(f"CMDOptimizer() got an unexpected keyword argument {name!r}")
            if value is not None:
                raise ValueError(f"modeopt: {name}= is not supported with FSDP2 ({UNSUPPORTED_OPTIONS[name]}); "
                                 "see docs/scaling-out.md")
        check_supported(model, base_optimizer, fsdp2_ok=True)  # FSDP1 / ZeRO / tensor parallelism: refused
        if record_dtype != torch.float32:
            raise ValueError("modeopt: under FSDP2 the recording is float32 (record_dtype=torch.float32)")
        if coef_dtype == torch.int8:
            raise ValueError("modeopt: coef_dtype=torch.int8 (the 8-bit encoding) is not supported with FSDP2: its "
                             "scales per tensor and mode would be per shard and would not reshard with the "
                             "checkpoint; use coef_dtype=torch.bfloat16 (see docs/scaling-out.md)")
        check_settings(n_modes=n_modes, warmup_steps=warmup_steps, snapshot_every=snapshot_every,
                       n_samples=n_samples, max_snapshots=None, recluster_every=None, recluster_steps=None,
                       init=init, mode_scale=mode_scale, coef_dtype=coef_dtype, record_dtype=record_dtype)
        self._init_shared(base_optimizer)
        self.model = model
        self.n_modes, self.warmup_steps, self.snapshot_every = n_modes, warmup_steps, snapshot_every
        self.n_samples, self.init, self.coef_dtype, self.progress = n_samples, init, coef_dtype, progress
        self.seed = int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None else int(seed)
        self.mode_scale = resolve_mode_scale(mode_scale, base_optimizer)
        self.recluster_every = None
        self._select(exclude)
        self.shards = ShardMap(self._emb_params)
        self._local_layout = ParamLayout.from_named_tensors(
            [(n, x) for n, x in zip(self._emb_names, self.shards.local_views())])
        self.phase, self.cycle, self._step, self._phase_step = "warmup", 0, 0, 0
        self.capacity = warmup_steps // snapshot_every
        self.recording: Tensor | None = None  # (capacity, n_local) float32, allocated at the first snapshot
        self.recorded_steps: list[int] = []
        self.history: list[dict[str, Any]] = []
        self.space: dict[str, Any] | None = None
        self._hooks: list = []
        self._half: list[int] = []  # in mode space: the embedded indices of bf16/fp16 parameters (exact forming)
        self._half_units: list[dict] = []
        self._comm_formed: set[int] = set()
        self._phase_hooks: list[Callable[[Any, str], None]] = []
        self.comm_bytes = 0  #: bytes this optimizer handed to collectives (the switch and the steps)
        #: embedded steps skipped because r's gradient (all-reduced: the same on every rank) or new value held
        #: NaN/inf (not counted, as with GradScaler; see CMDOptimizer)
        self.skipped_steps = 0
        self._warned_skip, self._consecutive_skips = False, 0
        #: skipped embedded steps in a row after which a step raises ValueError (the run is stuck), as BlockwiseCMD
        self.max_consecutive_skips = 10
        self._group_sizes = self._current_group_sizes()

    @property
    def recording_bytes(self) -> int:
        """Bytes of this rank's warm-up recording."""
        return 0 if self.recording is None else self.recording.numel() * self.recording.element_size()

    def trainable_parameters(self) -> int:
        """Scalars trained now (all ranks together): M plus what is not embedded, or every parameter."""
        if self.space is None:
            return sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        emb = {id(p) for p in self._emb_params}
        return self.space["r"].numel() + sum(p.numel() for p in self.model.parameters()
                                             if p.requires_grad and id(p) not in emb)

    def state_bytes(self) -> dict[str, int]:
        """This rank's training state by kind, in bytes (weights = its shards of every parameter)."""
        def size(ts):
            return sum(t.numel() * t.element_size() for t in ts)
        out = {"weights": size(p.to_local() for p in self.model.parameters()),
               "grads": size(p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                             for p in self.model.parameters() if p.grad is not None),
               "optimizer": size(v.to_local() if hasattr(v, "to_local") else v for s in self.base.state.values()
                                 for v in s.values() if isinstance(v, Tensor)),
               "recording": self.recording_bytes, "a": 0, "labels": 0, "r": 0}
        if self.space is not None:
            out.update(a=size(self.space["a"]), labels=size(self.space["labels"]),
                       r=size([self.space[k] for k in ("r", "applied", "partial", "r_base", "delta")]))
        return out

    # ---------------------------------------------------------------- step
    def step(self, closure: Callable[[], Any] | None = None):
        """One step: of every parameter in warm-up, of ``r`` in mode space (collective there)."""
        if self.phase == "embedded":
            if closure is not None:
                raise ValueError("modeopt: closures are not supported in mode space under FSDP2")
            self._reduce_r_grad()
            s = self.space
            # Decided alike on every rank: dL/dr is all-reduced, and r and its optimizer state are replicated.
            if not finite(r.grad for r in s["r_params"]):
                self._skip_step("the gradient of the mode scalars r")
                return None
            self._consecutive_skips = 0
            loss = self._base_step()
            if not finite(s["r_params"]):
                with torch.no_grad():
                    for idx, r in zip(s["group_modes"], s["r_params"]):
                        r.copy_(s["applied"][idx.to(s["applied"].device)])
                        st = self.base.state.get(r)
                        if st and not finite(v for v in st.values() if isinstance(v, Tensor) and v.is_floating_point()):
                            self.base.state.pop(r)
                self._skip_step("the new value of the mode scalars r")
                return loss
            self.sync()
        else:
            loss = self._base_step(closure)
        self._step += 1
        self._phase_step += 1
        if self.phase == "warmup":
            if self._phase_step % self.snapshot_every == 0:
                self._record()
            if self._phase_step >= self.warmup_steps:
                self._embed()
        return loss

    def _skip_step(self, what: str) -> None:
        """An embedded step not taken (weights and r as before it, not counted): counted, warned about once;
        ``ValueError`` (on every rank: the decision is the same everywhere) once the run of skips is too long."""
        if self._consecutive_skips >= self.max_consecutive_skips:
            raise ValueError(f"modeopt (FSDP2): step {self._step + 1}: the last {self._consecutive_skips + 1} embedded steps "
                             f"were all skipped ({what} held NaN/inf): the training is stuck. Lower the learning rate "
                             "or clip gradients and resume from a checkpoint; raise opt.max_consecutive_skips to allow "
                             "longer runs of skips")
        self._consecutive_skips += 1
        self.skipped_steps += 1
        if not self._warned_skip:
            self._warned_skip = True
            warnings.warn(f"modeopt (FSDP2): step {self._step + 1}: {what} holds NaN/inf on every rank: the step is "
                          "skipped on every rank, like GradScaler does (weights and r unchanged, the step is not "
                          "counted). Later skips are counted in opt.skipped_steps without a warning",
                          NonFiniteWarning, stacklevel=3)

    def _first_bad_anywhere(self, local: int | None) -> int | None:
        """The smallest of the ranks' ``local`` indices (None: none), agreed by one all-reduce of 8 bytes."""
        n = len(self._emb_names)
        flag = torch.tensor([n if local is None else local], dtype=torch.int64, device=self.shards.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.shards.group)
        self.comm_bytes += 8
        return None if int(flag) >= n else int(flag)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The base optimizer's ``zero_grad``, and the mode gradients gathered since the last step."""
        self.base.zero_grad(set_to_none=set_to_none)
        if self.space is not None:
            self.space["partial"].zero_()

    @torch.no_grad()
    def _record(self) -> None:
        if self.recording is None:
            self.recording = torch.zeros(self.capacity, self.shards.n_local, dtype=torch.float32)
        t = len(self.recorded_steps)
        for view, x in zip(self.shards.split(self.recording[t]), self.shards.local_views()):
            view.copy_(x)
        self.recorded_steps.append(self._step)

    # -------------------------------------------------------------- switch
    @torch.no_grad()
    def _embed(self) -> None:
        # NaN/inf in one rank's recording or shards would make that rank raise inside the decomposition and
        # the others wait for it in a collective: every rank checks its own and all agree, first.
        t = len(self.recorded_steps)
        rows = self.recording[:t] if self.recording is not None else torch.zeros(0, self.shards.n_local)
        views = [rows[:, o : o + n] for o, n in zip(self.shards.local_offsets, self.shards.local_numels)]
        local = next((j for j, (view, x) in enumerate(zip(views, self.shards.local_views())) if not finite([view, x])),
                     None)
        bad = self._first_bad_anywhere(local)
        if bad is not None:
            raise ValueError(f"modeopt refuses to embed at step {self._step}: parameter {self._emb_names[bad]!r} holds "
                             "NaN/inf (in its recording or now, on some rank). The training state is unchanged "
                             "(still in warm-up); fix the divergence (lower the learning rate, clip gradients) and "
                             "resume from a checkpoint")
        self.seed = int(self.shards.broadcast(torch.tensor([self.seed], dtype=torch.int64)))
        t = len(self.recorded_steps)
        traj = Trajectory(self.recording[:t], self._local_layout, list(self.recorded_steps))
        d = decompose_shards(traj, self.shards, self._layout.numels, n_modes=self.n_modes, n_samples=self.n_samples,
                             seed=self.seed + self.cycle, progress=self.progress)
        row_group = torch.tensor(self._emb_group, dtype=torch.int64).repeat_interleave(
            torch.tensor(self.shards.local_numels, dtype=torch.int64))
        init = shard_mode_space(d, self.shards, row_group, len(self.base.param_groups), self.mode_scale)
        k, m = d.samples.numel(), d.n_modes
        self.comm_bytes += 8 + self.shards.n_global + 8 * k * t + 8 * m + 8 * (3 * m + m * len(self.base.param_groups))
        self._enter(init.labels, init.a, init.r_groups, init.r)
        if self.init == "fit":
            ref_now = init.reference_values.to(torch.float32)
            for x, a, b, lab in zip(self.shards.local_views(), self.shards.split(d.a), self.shards.split(d.b),
                                    self.shards.split(d.labels)):
                x.copy_(torch.addcmul(b, a, ref_now[lab]))
        self.recording, self.recorded_steps = None, []
        info = {"step": self._step, "cycle": self.cycle, "n_modes": m,
                "sizes": d.sizes.tolist(), "scale": init.scale.tolist(),
                "references": [self._layout.locate(int(i))[0] for i in d.reference]}
        self.history.append(info)
        logger.info("modeopt: step %d: embedded the %s weights of %d FSDP2-sharded tensors into %d modes "
                    "(this rank holds %s of them)", self._step, f"{self.shards.n_global:,}", len(self._layout), m,
                    f"{self.shards.n_local:,}")
        self._fire("embedded")

    def _enter(self, labels: Tensor, a: Tensor, r_groups: Tensor, r: Tensor) -> None:
        """Enter mode space: this rank's flat ``(n_local,)`` labels and ``a``, the ``(M,)`` r_groups and r."""
        m = int(r.numel())
        groups = sorted(set(r_groups.tolist()))
        group_modes = [torch.nonzero(r_groups == g).flatten() for g in groups]
        dev = self.shards.device  # a, labels, r and the partial sums live with the shards (as in ModeSpace)
        r_params = [nn.Parameter(r[idx].detach().to(dev, copy=True)) for idx in group_modes]
        self.space = {
            "labels": [x.to(kernels.label_dtype(m)).to(dev).contiguous() for x in self.shards.split(labels)],
            "a": [x.to(self.coef_dtype).to(dev).contiguous() for x in self.shards.split(a)],
            "r_groups": r_groups.to(torch.int64).clone(), "groups": groups, "group_modes": group_modes,
            "r_params": r_params, "applied": r.detach().to(dev, torch.float32, copy=True),
            "partial": torch.zeros(m, dtype=torch.float64, device=dev), "n_modes": m,
            # the r the half-precision bases hold, and r - r_base (what their formed values add): M floats each
            "r_base": r.detach().to(dev, torch.float32, copy=True),
            "delta": torch.zeros(m, dtype=torch.float32, device=dev),
        }
        self.space["r"] = self.r_full()
        emb = {id(p) for p in self._emb_params}
        for gi, group in enumerate(self.base.param_groups):
            kept = [p for p in self._orig_params[gi] if id(p) not in emb]
            if gi in groups:
                kept.append(r_params[groups.index(gi)])
            group["params"][:] = kept
        for p in self._emb_params:
            self.base.state.pop(p, None)
            p.grad = None
        for j, p in enumerate(self._emb_params):
            self._hooks.append(p.register_post_accumulate_grad_hook(
                lambda param, j=j: self._consume_grad(j, param)))
        self._params_changed()
        self.phase, self._phase_step = "embedded", 0
        self._half = [j for j, p in enumerate(self._emb_params) if p.dtype in HALF_DTYPES]
        if self._half and not self._install_half():
            low = sorted({str(self._emb_params[j].dtype).replace("torch.", "") for j in self._half})
            self._half = []  # this torch lacks FSDPModule.set_custom_all_gather: updated in place, as before
            if not getattr(self, "_warned_low_precision", False):
                self._warned_low_precision = True
                warnings.warn(
                    f"modeopt: the embedded FSDP2 weights are {'/'.join(low)}, and this torch's FSDP2 has no "
                    "FSDPModule.set_custom_all_gather: mode space applies each change of r to the shards in place "
                    "(w += a * dr), and in half precision the rounding of every step accumulates. Use a torch "
                    "whose FSDPModule has set_custom_all_gather, or keep float32 parameters with fully_shard(..., "
                    "mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16)); see docs/scaling-out.md",
                    stacklevel=4)

    def r_full(self) -> Tensor:
        """``(M,)`` the mode scalars in mode order (a copy)."""
        s = self.space
        out = torch.empty(s["n_modes"], dtype=torch.float32, device=self.shards.device)
        for idx, r in zip(s["group_modes"], s["r_params"]):
            out[idx] = r.detach()
        return out

    @torch.no_grad()
    def _consume_grad(self, j: int, param: Tensor) -> None:
        """FSDP2 wrote this rank's shard of parameter ``j``'s gradient: reduce it onto the modes, drop it."""
        g = param.grad
        if g is None:
            return
        local = g.to_local() if hasattr(g, "to_local") else g
        s = self.space
        s["partial"] += kernels.reduce([local.reshape(-1)], [s["a"][j]], [s["labels"][j]], s["n_modes"])
        if self.drop_weight_grads:
            param.grad = None

    def _reduce_r_grad(self) -> None:
        """One all-reduce of the M partial sums (float32, 4 M bytes): every rank gets the same dL/dr."""
        s = self.space
        g = s["partial"].to(torch.float32)
        dist.all_reduce(g, group=self.shards.group)
        self.comm_bytes += g.numel() * g.element_size()
        s["partial"].zero_()
        if not self.drop_weight_grads:  # reduced already: FSDP2 must not add the next backward to them
            for p in self._emb_params:
                p.grad = None
        # Set, not added: the gradient since the last step (the Trainer clears only model.zero_grad(),
        # and r is not a parameter of the model here)
        for idx, r in zip(s["group_modes"], s["r_params"]):
            r.grad = g[idx.to(g.device)].clone()

    @torch.no_grad()
    def sync(self) -> None:
        """Write ``w += a * (r - applied)[m]`` into this rank's float32 shards, and set ``delta = r - r_base``
        for the half-precision ones (formed at each all-gather); no communication."""
        s = self.space
        r = self.r_full()
        half = set(self._half)
        js = [j for j in range(len(self._emb_params)) if j not in half]
        views = self.shards.local_views()
        kernels.update([views[j] for j in js], [s["a"][j] for j in js], [s["labels"][j] for j in js], r - s["applied"])
        s["applied"].copy_(r)
        s["delta"].copy_(r - s["r_base"])  # in place: FSDP2's all-gathers read it (on their stream)
        s["r"] = r

    # -------------------------------------------------------------- export
    def _leave(self) -> None:
        self._remove_half()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for group, orig in zip(self.base.param_groups, self._orig_params):
            group["params"][:] = orig
        for r in self.space["r_params"]:
            self.base.state.pop(r, None)
        self._params_changed()
        self.space = None

    def export(self) -> nn.Module:
        """Leave mode space for good: plain FSDP2 parameters, the base optimizer trains them again."""
        if self.space is not None:
            self.rebase()  # the half-precision shards get their formed (current) values
            self._leave()
        self.recording, self.recorded_steps = None, []
        self.phase = "exported"
        self._fire("exported")
        return self.model
