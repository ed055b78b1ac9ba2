"""Blockwise CMD: fine-tune one block at a time, and keep every finished block moving in its modes.

:class:`BlockwiseCMD` wraps a ``torch.optim`` optimizer built on a model whose weights fall into
*blocks* (typically a transformer's layers). At any moment one block is *active*: the base
optimizer trains it, and its weights are recorded every ``snapshot_every`` steps. After
``steps_per_block`` steps the block's recording is decomposed into ``n_modes`` modes of its own
and the block enters mode space (``w_i = a_i * r[m(i)] + b_i``, only its M scalars ``r`` trained
from then on, by the same base optimizer), and the next block becomes active. Blocks not reached
yet are frozen. Parameters named in ``train_always`` (a classification head) train throughout;
the ``exclude``-d parameters of a block (by default its 1-D tensors: biases, norm scales) train
from the block's first step to the end and are never embedded.

Why: the training state at any time is that of one block (its gradients and base-optimizer
state, and its recording: ``steps_per_block // snapshot_every + 1`` snapshots of one block, not
of the model) plus ``a`` and labels of the finished blocks (3 bytes per weight with bf16 ``a``),
and unlike BAdam (arXiv 2404.02827) a finished block does not freeze: it goes on learning along
its modes. Measured against LoRA, BAdam and full fine-tuning in docs/finetuning.md.

The base optimizer's param groups keep their hyper-parameters and LR schedule; their ``params``
lists are rewritten in place at every change of block (schedulers and the HF Trainer hold the
group dicts, not the lists). Each mode of a finished block joins the group that holds most of
that mode's moving weights, so it gets that group's learning rate and weight decay (a block
split over groups has modes in each).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from modeopt.optim.wrapping import SharesBaseOptimizer
from .arguments import check_arguments, check_train_always
from .nonfinite import BlockwiseNonFinite
from .state import (check_base_groups, check_blockwise_state, check_recording, checked_counters, saved_param_names,
                    space_from_state, space_state)
from .embedding import embed_block
from modeopt.trajectories.layout import ParamLayout
from modeopt.modespace.space import ModeSpace
from modeopt.optim.nonfinite import check_optimizer_state_finite, evaluate_first
from modeopt.optim.settings import resolve_mode_scale
from modeopt.optim.param_groups import Exclude, exclusion_predicate, forget_whole_set_state
from modeopt.trajectories.snapshots import SnapshotBuffer

__all__ = ["BlockwiseCMD", "find_blocks"]

logger = logging.getLogger("modeopt")

R_PREFIX = "modeopt_block{}_r"


def find_blocks(model: nn.Module) -> list[str]:
    """The name prefixes of a model's repeated layers: the children of its largest ``nn.ModuleList``
    (by parameters) with at least two entries, e.g. ``["bert.encoder.layer.0.", ...]``.

    Raises ``ValueError`` when the model has no such list (give ``blocks=`` yourself). Warns when
    another list, outside that one, is at least a quarter as large (an encoder-decoder's other
    stack): its layers are in no block, so BlockwiseCMD would freeze them.
    """
    lists = [(name, len(mod), sum(p.numel() for p in mod.parameters()))
             for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList) and len(mod) >= 2]
    if not lists or max(size for *_, size in lists) == 0:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of layers to split into blocks: pass "
                         "blocks=[prefix, ...] (parameter-name prefixes, e.g. 'encoder.layer.0.')")
    best, n, size = max(lists, key=lambda t: t[2])  # the first of the largest
    prefix = f"{best}." if best else ""
    others = [o for o, _, s in lists if s * 4 >= size and o != best and prefix and not o.startswith(prefix)
              and not prefix.startswith(f"{o}.")]
    others = [o for o in others if not any(o.startswith(f"{q}.") for q in others)]  # not the lists inside them
    if others:
        warnings.warn(f"find_blocks: the blocks are the layers of {best!r}; {others} (as large) are in no block, so "
                      "BlockwiseCMD freezes them: pass blocks= with their layers' prefixes too (e.g. "
                      f"find_blocks(model) + ['{others[0]}.0.', ...])", stacklevel=2)
    return [f"{prefix}{i}." for i in range(n)]


def _prefixes(block) -> tuple[str, ...]:
    return (block,) if isinstance(block, str) else tuple(block)


class BlockwiseCMD(BlockwiseNonFinite, SharesBaseOptimizer):
    """Wraps a ``torch.optim`` optimizer: trains blocks one at a time, each then in its own mode space.

    Args:
        model: the model whose parameters ``base_optimizer`` trains.
        base_optimizer: any ``torch.optim.Optimizer`` built on parameters of ``model`` (param groups
            allowed). Its parameters outside every block and outside ``train_always`` are frozen
            (``requires_grad=False``) for the whole run: e.g. a transformer's embeddings; so are
            those already frozen when it is built. Single process: DDP / FSDP models are refused.
        blocks: the blocks, in training order: each a parameter-name prefix or a list of them
            (``"encoder.layer.3."``); ``None``: the model's layers (:func:`find_blocks`), **top layer
            first** (on both fine-tuning tasks of docs/finetuning.md it beat bottom-up at every LR).
        steps_per_block: steps the base optimizer trains each block before it is embedded.
        n_modes: M, modes per block.
        train_always: name prefixes of parameters trained by the base optimizer throughout.
        exclude: parameters of a block kept out of its embedding (trained from the block's first
            step on): a predicate ``f(name, param)`` or ``fnmatch`` patterns; default 1-D tensors.
        snapshot_every: record the active block every this many steps (plus once at its start).
        n_samples: K, weights sampled for each block's clustering.
        seed: seed of block ``b``'s sampling is ``seed + b``.
        record_dtype: storage of the active block's snapshots (bf16: movements from the block's start).
        coef_dtype: storage of ``a`` of the finished blocks: int8 (the default: 8-bit codes with a scale per
            tensor and mode, labels packed 4 bits per weight for ``n_modes <= 16``: 1.5 B per weight for ``a``
            and label together; :mod:`modeopt.modespace.kernels.encoding`; chosen by measurement, see
            docs/performance.md "The compact encoding"), bfloat16 (2 B + a 1 B label) or float32.
        mode_scale: ``"rms"`` (an Adam step of ``lr`` on ``r`` moves its weights by ~``lr``), ``"norm"``
            (SGD on ``r`` is the projection of the SGD step onto the modes; with ``"rms"`` it is ~N_m
            times larger) or ``"auto"``: ``"rms"`` for Adam-type bases, ``"norm"`` otherwise.

    Memory at any step, beyond the model and activations: the active block's gradients, base state
    and ``steps_per_block // snapshot_every + 1`` snapshots of it; ``a`` and label per weight of each
    finished block: 1.5 B with the default int8 encoding and M <= 16 (3 B with bf16 ``a``); the always-trained parameters' state.

    Attributes:
        phase: ``"block"`` while a block is active, ``"embedded"`` once every block is, ``"exported"``.
        active: index of the active block (``len(blocks)`` when none is).
        spaces: the finished blocks' :class:`~modeopt.modespace.space.ModeSpace`, in block order.
        history: per finished block, what its embedding found (step, mode sizes, references).
        skipped_steps, r_restores: steps skipped for a NaN/inf gradient; steps in which an overflowing
            ``r`` was put back (both saved in ``state_dict()``); ``max_consecutive_skips`` (10): skips in
            a row after which a step raises (docs/finetuning.md, "NaN/inf, checkpoints and arguments").
    """

    def __init__(
        self,
        model: nn.Module,
        base_optimizer: torch.optim.Optimizer,
        blocks: Sequence[str | Sequence[str]] | None = None,
        *,
        steps_per_block: int,
        n_modes: int = 10,
        train_always: Sequence[str] = (),
        exclude: Exclude = None,
        snapshot_every: int = 1,
        n_samples: int = 1000,
        seed: int = 0,
        record_dtype: torch.dtype = torch.bfloat16,
        coef_dtype: torch.dtype = torch.int8,
        mode_scale: str = "auto",
    ):
        check_arguments(model, base_optimizer, blocks=blocks, train_always=train_always, steps_per_block=steps_per_block,
                        n_modes=n_modes, snapshot_every=snapshot_every, n_samples=n_samples, seed=seed,
                        mode_scale=mode_scale, coef_dtype=coef_dtype, record_dtype=record_dtype)
        self.model = model
        self.steps_per_block, self.n_modes, self.snapshot_every = steps_per_block, n_modes, snapshot_every
        self.n_samples, self.seed = n_samples, int(seed)
        self.record_dtype, self.coef_dtype = record_dtype, coef_dtype
        self.mode_scale = resolve_mode_scale(mode_scale, base_optimizer)
        self.blocks = [_prefixes(b) for b in (find_blocks(model)[::-1] if blocks is None else blocks)]
        if not self.blocks:
            raise ValueError("blocks is empty: give at least one parameter-name prefix")
        self.train_always = tuple(train_always)
        self._plan(base_optimizer, exclusion_predicate(exclude if exclude is not None else (lambda n, p: p.ndim < 2)))
        self._init_shared(base_optimizer)
        self.phase, self.active, self._step, self._in_block = "block", 0, 0, 0
        self.spaces: list[ModeSpace] = []
        self.history: list[dict[str, Any]] = []
        #: steps skipped because the gradient of some ``r`` held NaN/inf (not counted in ``step_count``)
        self.skipped_steps = 0
        #: steps in which some finished block's ``r`` overflowed to NaN/inf from a finite gradient and was put back
        self.r_restores = 0
        self._buffers: list[SnapshotBuffer] = []  # the active block's recording, one per tensor
        self._regroup()
        self._start_block()

    # ------------------------------------------------------------ the plan
    def _plan(self, base: torch.optim.Optimizer, excluded: Callable[[str, Tensor], bool]) -> None:
        """Which block, group and role each of the base optimizer's parameters has."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        self._orig = [list(g["params"]) for g in base.param_groups]
        # requires_grad as the user left it, restored by export(); lists by position, not ids (a
        # deep copy or a pickled optimizer has new tensors, hence new ids)
        self._grad_before = [[p.requires_grad for p in params] for params in self._orig]
        self._emb_group: list[list[int]] = [[] for _ in self.blocks]  # per block, each _emb tensor's group
        self._always: list[Tensor] = []
        self._frozen: list[Tensor] = []
        self._emb: list[list[tuple[str, Tensor]]] = [[] for _ in self.blocks]  # embedded later
        self._free: list[list[Tensor]] = [[] for _ in self.blocks]  # a block's excluded parameters
        for gi, params in enumerate(self._orig):
            for p in params:
                if id(p) not in names:
                    raise ValueError("the base optimizer trains a tensor that is not a parameter of the model: "
                                     "build it on model.parameters()")
                name = names[id(p)]
                hits = [b for b, pre in enumerate(self.blocks) if name.startswith(pre)]
                always = name.startswith(self.train_always) if self.train_always else False
                if len(hits) > 1 or (hits and always):
                    where = [self.blocks[b] for b in hits] + (["train_always"] if always else [])
                    raise ValueError(f"parameter {name!r} matches several blocks or train_always: {where}; "
                                     "the prefixes must not overlap (end them with '.')")
                if not p.requires_grad:  # frozen by the user: stays frozen whatever block it is in
                    self._frozen.append(p)
                elif always:
                    self._always.append(p)
                elif not hits:
                    self._frozen.append(p)
                elif excluded(name, p):
                    self._free[hits[0]].append(p)
                else:
                    self._emb[hits[0]].append((name, p))
                    self._emb_group[hits[0]].append(gi)
        for b, emb in enumerate(self._emb):
            n = sum(p.numel() for _, p in emb)
            if n == 0:
                mine = [(names[id(p)], p) for params in self._orig for p in params if names[id(p)].startswith(self.blocks[b])]
                if mine and all(not p.requires_grad for _, p in mine):
                    raise ValueError(f"block {b} {list(self.blocks[b])} has no parameter to embed: its parameters are all "
                                     "frozen (requires_grad=False) and stay so: unfreeze them before wrapping, or leave "
                                     "the block out of blocks=")
                tied = [t for t, p in self.model.named_parameters(remove_duplicate=False)
                        if t.startswith(self.blocks[b]) and names.get(id(p)) != t]
                hint = (f"; {tied[:3]} are tied to (the same tensors as) parameters named earlier, whose block they "
                        "belong to: put the tied layers in one block (a list of prefixes)") if tied else ""
                raise ValueError(f"block {b} {list(self.blocks[b])} has no parameter of the base optimizer to embed "
                                 f"(none matches its prefixes, or all are excluded): check the prefixes{hint}")
            if n < self.n_modes:
                raise ValueError(f"block {b} has {n} weights to embed, fewer than n_modes={self.n_modes}")
        check_train_always(self.model, self.train_always, self._always, self._orig, names)

    def _trained(self) -> set[int]:
        """ids of the weights the base optimizer trains now (r not included)."""
        ids = {id(p) for p in self._always}
        for b in range(min(self.active + 1, len(self.blocks))):
            ids.update(id(p) for p in self._free[b])
        if self.active < len(self.blocks):
            ids.update(id(p) for _, p in self._emb[self.active])
        return ids

    def _regroup(self) -> None:
        """Rewrite the param groups' lists (in place) and ``requires_grad`` for the current block."""
        trained = self._trained()
        r_of: dict[int, list[Tensor]] = {}
        for space in self.spaces:
            for g, r in zip(space.groups, space.r_params):
                r_of.setdefault(g, []).append(r)
        keep_state = set(trained)
        for gi, group in enumerate(self.base.param_groups):
            group["params"][:] = [p for p in self._orig[gi] if id(p) in trained] + r_of.get(gi, [])
            keep_state.update(id(p) for p in group["params"])
        embedded = {id(p) for space in self.spaces for p in space.params}
        for params in self._orig:
            for p in params:
                if id(p) not in embedded:
                    p.requires_grad_(id(p) in trained)
                if id(p) not in trained:
                    p.grad = None
        for p in [p for p in self.base.state if id(p) not in keep_state]:
            del self.base.state[p]  # a finished block's optimizer state is freed here
        forget_whole_set_state(self.base)  # LBFGS: its history over the old set restarts

    # ----------------------------------------------------------- blocks
    def _start_block(self) -> None:
        self._in_block = 0
        self._buffers = []
        if self.active >= len(self.blocks):
            return
        # One recording per tensor: the embedding frees each as soon as its tensor is assigned.
        cap = self.steps_per_block // self.snapshot_every + 1
        self._buffers = [SnapshotBuffer(p.numel(), dtype=self.record_dtype, capacity=cap) for _, p in self._emb[self.active]]
        self._record()

    def _record(self) -> None:
        for buf, (name, p) in zip(self._buffers, self._emb[self.active]):
            buf.append(ParamLayout([name], [tuple(p.shape)]), [p], self._step)

    @torch.no_grad()
    def _embed_active(self) -> None:
        b, emb = self.active, self._emb[self.active]
        params = [p for _, p in emb]
        groups = self._emb_group[b]
        n = sum(p.numel() for p in params)
        for p in params:  # the block's last gradients: its mode space has its own
            p.grad = None

        def free_block_state() -> None:  # once the clustering succeeded: the embedding takes its place
            for p in params:
                self.base.state.pop(p, None)

        init = embed_block(self._buffers, [name for name, _ in emb], params, groups, len(self.base.param_groups),
                           n_modes=self.n_modes, n_samples=min(self.n_samples, n), seed=self.seed + b,
                           mode_scale=self.mode_scale, coef_dtype=self.coef_dtype,
                           before_assign=free_block_state)  # empties self._buffers
        space = ModeSpace(self.model, emb, init.labels, init.a, init.r_groups, init.r, coef_dtype=self.coef_dtype,
                          r_prefix=R_PREFIX.format(b), a_scale=init.a_scale)
        init.labels, init.a = [], []  # the space holds its own (packed) copies
        self.spaces.append(space)
        self.history.append({"block": b, "step": self._step, "n_modes": space.n_modes, "weights": n,
                             "sizes": init.label_counts})
        logger.info("modeopt: step %d: block %d (%s weights) embedded in %d modes", self._step, b, f"{n:,}",
                    space.n_modes)
        self.active += 1
        if self.active == len(self.blocks):
            self.phase = "embedded"
        self._regroup()
        self._start_block()

    # ------------------------------------------------------------- step
    @property
    def step_count(self) -> int:
        """Steps taken so far (read-only)."""
        return self._step

    def step(self, closure: Callable[[], Any] | None = None):
        """One base-optimizer step of the active block, the always-trained parameters and every
        finished block's ``r``; then the finished blocks' weights follow ``r``, the active block is
        recorded, and after ``steps_per_block`` steps it is embedded and the next one starts.

        NaN/inf (docs/finetuning.md): a non-finite gradient of any tensor the step would change skips
        the whole step, as ``GradScaler`` does (nothing changes, the step is not counted,
        ``skipped_steps`` counts it, one ``NonFiniteWarning``), also when a ``closure`` computes it;
        NaN/inf already in the weights raises ``ValueError`` naming the tensor (every later step
        would be skipped); an ``r`` that overflows from a finite gradient is put back (``r_restores``).
        """
        if self.phase == "exported":
            raise RuntimeError("this BlockwiseCMD was exported: its model holds plain weights now; build a new "
                               "optimizer to train it further")
        loss = None
        if closure is not None:  # evaluated now, so that its gradients are checked before anything changes
            closure, loss = evaluate_first(closure, self._sync_finite)
        trained = [p for group in self.base.param_groups for p in group["params"]]
        if self._skips_nonfinite(trained, self._step + 1):
            return loss
        loss = self._base_step(closure)
        self._check_new_values(trained)
        for space in self.spaces:
            # a non-finite r is never written into the weights (decided on r's device, no host sync)
            space.sync(finite_only=True)
        self._step += 1
        if self._buffers:
            self._in_block += 1
            if self._in_block % self.snapshot_every == 0:
                self._record()
            if self._in_block >= self.steps_per_block:
                self._embed_active()
        return loss

    @property
    def recording_bytes(self) -> int:
        """Bytes the active block's recording holds now."""
        return sum(b.nbytes for b in self._buffers)

    def trainable_parameters(self) -> int:
        """Number of scalars that require grad in the model now."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def export(self) -> nn.Module:
        """Leave mode space for good: hooks and ``r`` removed, every parameter plain and trainable as
        it was before; the weights are unchanged (they are maintained in place). Returns the model."""
        for space in self.spaces:
            space.sync()
            space.remove()
        for params, before in zip(self._orig, self._grad_before):
            for p, rg in zip(params, before):
                p.requires_grad_(rg)
        self.spaces, self._buffers, self.phase = [], [], "exported"
        for group, orig in zip(self.base.param_groups, self._orig):
            group["params"][:] = orig
        self.base.state.clear()
        forget_whole_set_state(self.base)
        return self.model

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # Copied together with its model (deepcopy, a pickled training state): this optimizer drives
        # the copied mode spaces, which are then no orphan copies (ModeSpace.__setstate__, as CMDOptimizer).
        for space in self.__dict__.get("spaces", []):
            space.__dict__["_copied"] = False

    def __repr__(self) -> str:
        return (f"BlockwiseCMD(phase={self.phase!r}, step={self._step}, block={self.active}/{len(self.blocks)}, "
                f"n_modes={self.n_modes}, base={type(self.base).__name__})")

    # ------------------------------------------------------- state dicts
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state and the wrapper's: step, active block, its recording, and per
        finished block its labels, ``a`` and ``r`` (the model's own state dict holds the weights)."""
        if self.phase == "exported":
            raise RuntimeError("this BlockwiseCMD was exported: it holds no training state any more (its model "
                               "holds plain weights; save model.state_dict())")
        return {"base": self.base.state_dict(), "blockwise": {
            "step": self._step, "active": self.active, "in_block": self._in_block,
            "skipped_steps": self.skipped_steps, "r_restores": self.r_restores, "n_modes": self.n_modes,
            "blocks": [list(b) for b in self.blocks],
            "buffer": [b.state_dict() for b in self._buffers] if self._buffers else None,
            "spaces": [space_state(s) for s in self.spaces], "history": [dict(h) for h in self.history]}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`, into an optimizer built the same way on a model whose
        weights were loaded from the same checkpoint (``model.load_state_dict`` first). Every check
        runs before anything changes: on ``ValueError`` (saying what does not fit) the training
        state is as it was."""
        if self.phase == "exported":
            raise RuntimeError("cannot load into an exported BlockwiseCMD: build a new one")
        if not isinstance(state_dict, dict) or not {"base", "blockwise"} <= set(state_dict):
            raise ValueError("not a BlockwiseCMD state_dict (expected the keys 'base' and 'blockwise'): load the "
                             "dict opt.state_dict() returned")
        st = check_blockwise_state(state_dict["blockwise"], blocks=self.blocks, emb=self._emb,
                                   n_groups=len(self.base.param_groups), steps_per_block=self.steps_per_block)
        counters = checked_counters(st, n_modes=self.n_modes, n_samples=self.n_samples, emb=self._emb)
        active = st["active"]
        if active < len(self.blocks):
            check_recording(st["buffer"], self._emb[active], self.record_dtype,
                            self.steps_per_block // self.snapshot_every + 1, active)
        now, self.active = self.active, active  # _trained() reads it
        try:
            trained = self._trained()
        finally:
            self.active = now
        want = [sum(id(p) in trained for p in orig) + sum(gi in s["r_groups"].tolist() for s in st["spaces"])
                for gi, orig in enumerate(self._orig)]
        check_base_groups(state_dict["base"], want, active)
        check_optimizer_state_finite(state_dict["base"], saved_param_names(self.model, self._orig, trained, st["spaces"],
                                                                           R_PREFIX))
        if counters["n_modes"] != self.n_modes:
            warnings.warn(f"modeopt: the checkpoint was trained with n_modes={counters['n_modes']}; this BlockwiseCMD "
                          f"was built with n_modes={self.n_modes}: opt.n_modes is now {counters['n_modes']}, as in "
                          "the checkpoint", stacklevel=3)
        self.n_modes, self.skipped_steps, self.r_restores = counters["n_modes"], counters["skipped_steps"], \
            counters["r_restores"]
        for space in self.spaces:
            space.remove()
        self.spaces = [space_from_state(self.model, self._emb[b], s, R_PREFIX.format(b))
                       for b, s in enumerate(st["spaces"])]
        self.active, self._step = active, st["step"]
        self.phase = "embedded" if active == len(self.blocks) else "block"
        self.history = [dict(h) for h in st["history"]]
        self._regroup()
        self.base.load_state_dict(state_dict["base"])
        self._start_block()
        for buf, saved in zip(self._buffers, st["buffer"] or []):
            buf.load_state_dict(saved)
        self._in_block = st["in_block"] if self._buffers else 0
