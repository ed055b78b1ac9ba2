"""``OnlineCMDOptimizer``: an optimizer wrapper that hosts an :class:`~modeopt.OnlineCMD` (the shadow
model, swapped in by ``eval()`` and out by ``train()``, the schedule-free convention) and does
gradual embedding: every ``embed_every`` steps after the fit, the weights whose fit changed least
are frozen to ``a_i * r[m(i)] + b_i``; a frozen tensor leaves the autograd graph, the optimizer and
the running moments. A step synchronises with the host once to check its gradients for NaN/inf (as
``GradScaler`` does; ``skip_nonfinite = False`` leaves that out) and at an embedding check. Details
and measurements: ``docs/online.md``.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from modeopt.modespace import kernels
from modeopt.utils.checks import check_int, check_no_duplicates
from modeopt.utils.transfer import to_device
from modeopt.optim.nonfinite import SkipsNonFiniteSteps, evaluate_first
from modeopt.optim.wrapping import SharesBaseOptimizer, check_model_and_base
from .gradual_embedding import plan_hand_offs, relative_change, stop_training
from modeopt.trajectories.layout import named_tensors
from modeopt.distributed.wrappers import uses_fsdp2
from .shadow import OnlineCMD
from .optimizer_checkpoint import check_embedding_state
from modeopt.trajectories.trajectory import load_named_into

__all__ = ["OnlineCMDOptimizer"]


class OnlineCMDOptimizer(SkipsNonFiniteSteps, SharesBaseOptimizer):
    """Any torch optimizer plus an online CMD model of the training (and optional gradual embedding).

    Args:
        model, base_optimizer: the model and its optimizer (built on ``model.parameters()``).
        **online_args: ``n_modes``, ``fit_at`` (required), ``snapshot_every``, ``sample_every``,
            ``n_samples``, ``seed``, ``names``, ``max_snapshots``, ``record_dtype``: the keyword
            arguments of :class:`~modeopt.OnlineCMD`, passed to it (and checked by it).
        embed_every: if given, gradual embedding: every this many steps after the fit.
        embed_fraction: fraction of the still-free weights frozen at each check (paper: 0.1).
        granularity: ``"tensor"`` (whole tensors; saves gradient, state and update work) or
            ``"weight"`` (single weights, as in the paper).

    Use ``opt.eval()`` before evaluating (CMD weights in the model) and ``opt.train()`` after.
    ``opt.cmd_state_dict()`` gives the CMD weights as a plain state dict at any time.

    A step whose gradients hold NaN/inf is skipped, as ``GradScaler`` does: nothing changes (weights,
    base state, the shadow), the step is not counted, ``skipped_steps`` counts it, one
    ``NonFiniteWarning``; NaN/inf already in the weights raises ``ValueError`` naming the tensor.
    """

    #: Check every step's gradients for NaN/inf (one host synchronisation per device) and skip the step
    #: if one is; False: a NaN gradient reaches the weights and the shadow's moments, as with the bare base.
    skip_nonfinite: bool = True

    def __init__(
        self,
        model: nn.Module,
        base_optimizer: torch.optim.Optimizer,
        *,
        embed_every: int | None = None,
        embed_fraction: float = 0.1,
        granularity: str = "tensor",
        **online_args: Any,
    ):
        check_model_and_base(model, base_optimizer)
        if granularity not in ("tensor", "weight"):
            raise ValueError(f"granularity must be 'tensor' or 'weight', got {granularity!r}")
        if embed_every is not None:
            check_int("embed_every", embed_every, 1)
        if isinstance(embed_fraction, bool) or not isinstance(embed_fraction, (int, float)) \
                or not 0 < embed_fraction <= 1:
            raise ValueError(f"embed_fraction must be in (0, 1], got {embed_fraction!r}")
        if uses_fsdp2(model):
            raise TypeError("modeopt: OnlineCMDOptimizer (gradual embedding) does not support FSDP2: it freezes weights "
                            "one by one out of the base optimizer and hands references over between them, on plain "
                            "tensors; use modeopt.OnlineCMD beside your optimizer, which supports fully_shard "
                            "(docs/scaling-out.md)")
        check_no_duplicates(model, base_optimizer)  # torch only warns, and would step such a tensor twice
        owned = {id(p) for p in model.parameters()}
        for gi, group in enumerate(base_optimizer.param_groups):
            for p in group["params"]:
                if id(p) not in owned:
                    raise ValueError(
                        f"the base optimizer's param group {gi} holds a tensor of shape {tuple(p.shape)} that is "
                        "not a parameter of the model: build the base optimizer on model.parameters()")
        self._init_shared(base_optimizer)
        self.model = model
        self.online = OnlineCMD(model, **online_args)
        self.embed_every, self.embed_fraction, self.granularity = embed_every, embed_fraction, granularity
        in_opt = {id(p) for g in base_optimizer.param_groups for p in g["params"]}
        # Weights that gradual embedding may freeze: modelled, trainable, owned by the optimizer.
        self._candidates = [i for i, t in enumerate(self.online.tensors)
                            if isinstance(t, nn.Parameter) and t.requires_grad and id(t) in in_opt]
        self._orig_groups = [list(g["params"]) for g in base_optimizer.param_groups]
        self.frozen: dict[int, dict[str, Tensor]] = {}  # tensor -> {"mask", "a", "b"} (mask None: whole tensor)
        # partly frozen tensor -> positions of its frozen weights (int64, on its device): the per-step
        # assignment indexes with them (a boolean mask would need a host sync to count its entries)
        self._positions: dict[int, Tensor] = {}
        self._prev: dict[int, tuple[Tensor, Tensor]] = {}  # tensor -> (a, mean) at the last check
        self._swapped: dict[str, Tensor] | None = None
        self._swap_hook = None  # the model's state-dict hook while swapped (see eval())
        self.embed_history: list[dict[str, Any]] = []
        self.skipped_steps = 0  # steps skipped because a gradient held NaN/inf (not counted)

    # ------------------------------------------------------------- stepping
    def step(self, closure=None):
        """One training step: the base optimizer's step (``closure`` as in torch; its loss is returned),
        then the frozen weights follow their references, the online CMD is updated, and every
        ``embed_every`` steps after the fit more weights are frozen. ``RuntimeError`` while
        :meth:`eval` has the CMD weights in the model."""
        if self._swapped is not None:
            raise RuntimeError("the CMD weights are swapped into the model (opt.eval()): call opt.train() before "
                               "training steps")
        loss = None
        if self.skip_nonfinite:
            if closure is not None:  # evaluated now, so that its gradients are checked before anything changes
                closure, loss = evaluate_first(closure)
            if self._skips_nonfinite([p for g in self.base.param_groups for p in g["params"]], self.online.calls + 1):
                return loss
        loss = self._base_step(closure)
        if self.frozen:
            self._apply_frozen()
        self.online.update()
        if (self.embed_every is not None and self.online.phase == "fitted"
                and (self.online.calls - self.online.fit_at) % self.embed_every == 0
                and self.online.calls > self.online.fit_at):
            self._embed_more()
        return loss

    @torch.no_grad()
    def _apply_frozen(self) -> None:
        """Frozen weights follow their references: w = a * r_now[m] + b (whole tensors: one fused pass)."""
        r = self.online.references_now()
        tensors, labels = self.online.tensors, self.online.labels
        by_device: dict[torch.device, list[int]] = {}
        for t, f in self.frozen.items():
            if f["mask"] is None:
                by_device.setdefault(tensors[t].device, []).append(t)
        for dev, whole in by_device.items():
            kernels.assign([tensors[t] for t in whole], [self.frozen[t]["a"] for t in whole],
                           [self.frozen[t]["b"] for t in whole], [labels[t] for t in whole], to_device(r, dev))
        r32: dict[torch.device, Tensor] = {}
        for t, f in self.frozen.items():
            if f["mask"] is not None:
                w, pos = tensors[t], self._positions[t]
                if w.device not in r32:
                    r32[w.device] = to_device(r, w.device, torch.float32)
                lab = kernels.as_index(labels[t].index_select(0, pos))
                value = torch.addcmul(f["b"], f["a"], r32[w.device][lab])
                w.view(-1).index_copy_(0, pos, value.to(w.dtype))

    # --------------------------------------------------- gradual embedding
    @torch.no_grad()
    def _embed_more(self) -> None:
        labels, a_all, b_all = self.online.coefficients()
        refs = self._reference_tensors()
        changes, free = {}, 0
        for t in self._candidates:
            f = self.frozen.get(t)
            if f is not None and f["mask"] is None:
                continue
            change = relative_change(self.online.labels[t], self.online.reference_variance(), a_all[t],
                                     self.online.mean[t], self._prev.get(t))
            change[torch.tensor(refs.get(t, []), dtype=torch.long, device=change.device)] = float("inf")  # refs stay
            if f is not None:
                change[f["mask"]] = float("inf")
            changes[t] = change
            free += int(torch.isfinite(change).sum()) if t in self._prev else a_all[t].numel()
            self._prev[t] = (a_all[t].clone(), self.online.mean[t].clone())
        target = int(self.embed_fraction * free)
        if target == 0 or not any(t in self._prev for t in changes):
            return
        newly, handed = 0, 0
        if self.granularity == "tensor":
            # A tensor's references are finite-change weights too: judge the tensor by its other weights.
            ranked = sorted((float(c[torch.isfinite(c)].median()), t) for t, c in changes.items()
                            if t in self._prev and int(torch.isfinite(c).sum()) > 0
                            and int(torch.isfinite(c).sum()) + len(refs.get(t, [])) == c.numel())
            for _, t in ranked:
                if newly >= target:
                    break
                if t in refs:
                    plan = self._plan_hand_offs({t}, labels, a_all, b_all)
                    if plan is None:  # a mode would lose its last free weight: keep the tensor free
                        continue
                    for args in plan:
                        self.online.hand_off(*args)
                    handed += len(plan)
                    refs = self._reference_tensors()
                self._freeze_tensor(t, a_all[t], b_all[t])
                newly += a_all[t].numel()
        else:
            rdev = self.online.reference_device
            flat = torch.cat([to_device(changes[t], rdev) for t in changes])
            k = min(target, int(torch.isfinite(flat).sum()))
            if k == 0:
                return
            cut = float(torch.kthvalue(flat[torch.isfinite(flat)], k).values)  # a plain number: any device
            for t, c in changes.items():
                pick = c <= cut
                if bool(pick.any()):
                    newly += int(pick.sum())
                    self._freeze_weights(t, pick, a_all[t], b_all[t])
        self.embed_history.append({"step": self.online.calls, "newly_frozen": newly, "hand_offs": handed,
                                   "frozen_fraction": self.frozen_fraction()})

    def _reference_tensors(self) -> dict[int, list[int]]:
        refs: dict[int, list[int]] = {}
        for t, i in self.online.ref_index:
            refs.setdefault(t, []).append(i)
        return refs

    def _plan_hand_offs(self, leaving: set[int], labels, a_all, b_all) -> list[tuple] | None:
        """New reference weights for the modes whose reference lies in the tensors ``leaving`` (see
        :func:`~modeopt.online.gradual_embedding.plan_hand_offs`)."""
        whole = {u for u, f in self.frozen.items() if f["mask"] is None}
        partly = {u: f["mask"] for u, f in self.frozen.items() if f["mask"] is not None}
        return plan_hand_offs(self.online.ref_index, self._candidates, leaving, whole, partly, labels, a_all, b_all)

    def freeze(self, names: Sequence[str], *, allow_references: bool = False) -> None:
        """Freeze whole tensors now: from here on they follow ``a * r[m] + b`` with their current fit
        and stop costing (no gradient, optimizer state, update or moments).

        A tensor holding a mode's reference hands it off first: the free weight of the mode (in a
        tensor that stays free) with the largest ``|a|`` carries the mode's profile from then on
        (:meth:`OnlineCMD.hand_off`). If a mode has no such weight left, the tensor is refused unless
        ``allow_references=True``: freezing it then stops that mode and every frozen weight of it.
        """
        self.online.check_fitted()
        labels, a, b = self.online.coefficients()
        for name in names:
            if name not in self.online.names:
                raise KeyError(f"{name!r} is not modelled by this OnlineCMDOptimizer")
            t = self.online.names.index(name)
            if t not in self._candidates:
                raise ValueError(f"{name!r} is not a trainable parameter of the base optimizer: nothing to freeze")
            f = self.frozen.get(t)
            if f is not None and f["mask"] is None:
                continue
            if t in self._reference_tensors():
                plan = self._plan_hand_offs({t}, labels, a, b)
                if plan is not None:
                    for args in plan:
                        self.online.hand_off(*args)
                elif not allow_references:
                    raise ValueError(f"{name!r} holds the reference weight of a mode that has no other free weight "
                                     "to carry it: freezing it would stop that mode (pass allow_references=True to "
                                     "do it anyway)")
            self._freeze_tensor(t, a[t], b[t])

    def _freeze_tensor(self, t: int, a: Tensor, b: Tensor) -> None:
        p = self.online.tensors[t]
        self.frozen[t] = {"mask": None, "a": a.to(torch.float32), "b": b.to(torch.float32)}
        self._positions.pop(t, None)
        self._detach(t, p)

    def _detach(self, t: int, p: nn.Parameter) -> None:
        """The tensor stops costing: no gradient, no optimizer state or update, no running moments."""
        stop_training(p, self.base)
        self.online.freeze_tensor(t)
        self._prev.pop(t, None)

    def _freeze_weights(self, t: int, pick: Tensor, a: Tensor, b: Tensor) -> None:
        f = self.frozen.get(t)
        if f is None:
            full_a = torch.zeros(a.numel(), dtype=torch.float32, device=a.device)
            full_b = torch.zeros(a.numel(), dtype=torch.float32, device=a.device)
            mask = torch.zeros(a.numel(), dtype=torch.bool, device=a.device)
        else:
            mask, full_a, full_b = f["mask"], f["a_full"], f["b_full"]
        mask = mask | pick
        full_a[pick], full_b[pick] = a[pick].to(torch.float32), b[pick].to(torch.float32)
        if bool(mask.all()):  # the whole tensor is frozen now: stop its gradient and state too
            self.frozen[t] = {"mask": None, "a": full_a, "b": full_b}
            self._positions.pop(t, None)
            self._detach(t, self.online.tensors[t])
        else:
            self.frozen[t] = {"mask": mask, "a": full_a[mask], "b": full_b[mask], "a_full": full_a, "b_full": full_b}
            self._positions[t] = mask.nonzero().view(-1)

    @property
    def embeddable(self) -> list[int]:
        """Indices (into ``online.tensors``) of the tensors gradual embedding may freeze: modelled,
        trainable parameters held by the base optimizer."""
        return self._candidates

    @property
    def swapped(self) -> bool:
        """Whether :meth:`eval` has the CMD weights in the model now."""
        return self._swapped is not None

    def frozen_fraction(self) -> float:
        """Fraction of the embeddable weights that are frozen now."""
        total = sum(self.online.tensors[t].numel() for t in self._candidates)
        frozen = sum(self.online.tensors[t].numel() if f["mask"] is None else int(f["mask"].sum())
                     for t, f in self.frozen.items())
        return frozen / max(total, 1)

    # ------------------------------------------------------- eval / train
    def eval(self) -> None:
        """Put the CMD weights into the model (for evaluation); raw weights are kept aside.

        While they are swapped in, ``model.state_dict()`` still reports the raw weights (a model
        state-dict hook puts them in): a checkpoint taken then (the HF ``Trainer`` saves right after
        an evaluation, before it calls ``train()``) resumes the training exactly. The CMD weights
        are :meth:`cmd_state_dict`; ``model.state_dict(keep_vars=True)`` gives the live tensors.
        """
        if self._swapped is None and self.online.phase == "fitted":
            self._swapped = {n: t.detach().clone() for n, t in zip(self.online.names, self.online.tensors)}
            self.online.load_into(self.model)
            self._swap_hook = self.model.register_state_dict_post_hook(_RawWhileSwapped(self))

    def train(self) -> None:
        """Restore the raw weights (exactly) for training."""
        if self._swapped is not None:
            load_named_into(self.model, self._swapped)
            self._swapped = None
        if self._swap_hook is not None:
            self._swap_hook.remove()
            self._swap_hook = None

    def _raw_entries(self) -> list[tuple[str, Tensor, Tensor]]:
        """While swapped: ``(key, live tensor, raw value)`` for every name of every modelled tensor
        (a tied weight under each of its names)."""
        if self._swapped is None:
            return []
        raw = {id(t): self._swapped[n] for n, t in zip(self.online.names, self.online.tensors)}
        return [(k, t, raw[id(t)]) for k, t in named_tensors(self.model) if id(t) in raw]

    def cmd_state_dict(self) -> dict[str, Tensor]:
        """The CMD weights as a plain ``{name: tensor}`` (the model's own values before the fit)."""
        return self.online.cmd_state_dict()

    # ---------------------------------------------------------- state dicts
    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values (``weights_only``-loadable): the base optimizer's state, the online
        CMD's (:meth:`OnlineCMD.state_dict`), the frozen tensors' coefficients and the embedding
        history. It holds no weights (those are the model's; while swapped, ``model.state_dict()`` holds
        the raw ones), so it may be taken in either mode of :meth:`eval` / :meth:`train`."""
        frozen = {str(t): {k: v for k, v in f.items() if v is not None} for t, f in self.frozen.items()}
        return {"base": self.base.state_dict(), "online": self.online.state_dict(), "frozen": frozen,
                "frozen_whole": [t for t, f in self.frozen.items() if f["mask"] is None],
                "prev": {str(t): [a, m] for t, (a, m) in self._prev.items()},
                "embed_history": [dict(h) for h in self.embed_history], "skipped_steps": self.skipped_steps}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`. Everything is checked first: a state that does not fit this
        model and optimizer raises ``ValueError`` and changes nothing."""
        if self._swapped is not None:
            raise RuntimeError("the CMD weights are swapped into the model (opt.eval()): call opt.train() before "
                               "load_state_dict(), or train() would put the old raw weights back afterwards")
        checked = self._checked_state(sd)
        whole = set(sd["frozen_whole"])
        leaving = {id(self.online.tensors[t]) for t in whole}
        # The base optimizer's load is the one step that may still raise (torch's own checks of its
        # state): it goes first, with its param groups as they will be, and they are put back if it fails.
        before = [list(g["params"]) for g in self.base.param_groups]
        for group in self.base.param_groups:
            group["params"][:] = [q for q in group["params"] if id(q) not in leaving]
        try:
            self.base.load_state_dict(sd["base"])
        except Exception as e:
            for group, params in zip(self.base.param_groups, before):
                group["params"][:] = params
            raise ValueError(f"the state's base optimizer does not load into this one ({type(e).__name__}: {e}): "
                             "nothing was changed; build the base optimizer as in the saved run") from e
        # from here on nothing raises
        self.online.load_checked_state(checked)
        self.frozen, self._positions = {}, {}
        devs = [t.device for t in self.online.tensors]
        for key, f in sd["frozen"].items():
            t = int(key)
            entry = {k: v.to(devs[t], copy=True) for k, v in f.items()}  # on the frozen tensor's device
            entry.setdefault("mask", None)
            if t in whole:
                entry["mask"] = None
                self.frozen[t] = entry
                stop_training(self.online.tensors[t], self.base)
            else:
                self.frozen[t] = entry
                self._positions[t] = entry["mask"].nonzero().view(-1)
        self._prev = {int(k): (v[0].to(devs[int(k)], copy=True), v[1].to(devs[int(k)], copy=True))
                      for k, v in sd["prev"].items()}
        self.embed_history = [dict(h) for h in sd["embed_history"]]
        self.skipped_steps = sd.get("skipped_steps", 0)  # absent in states saved before it was

    def _checked_state(self, sd: Any):
        """Validate a :meth:`state_dict` without changing anything (the online part, the frozen tensors,
        the base optimizer's groups); returns the online part, checked (:meth:`OnlineCMD.check_state_dict`)."""
        keys = ("base", "online", "frozen", "frozen_whole", "prev", "embed_history")
        if not isinstance(sd, dict) or any(k not in sd for k in keys):
            missing = [k for k in keys if not isinstance(sd, dict) or k not in sd]
            raise ValueError(f"not an OnlineCMDOptimizer state dict (it lacks {missing}); to load a plain "
                             "optimizer's state use opt.base.load_state_dict(...)")
        checked = self.online.check_state_dict(sd["online"])
        check_embedding_state(sd, names=self.online.names, tensors=self.online.tensors, embeddable=self._candidates,
                              param_groups=self.base.param_groups,
                              param_names={id(p): n for n, p in self.model.named_parameters()})
        return checked


class _RawWhileSwapped:
    """State-dict post-hook of the model while :meth:`OnlineCMDOptimizer.eval` has the CMD weights in
    it: the state dict gets the raw weights set aside, so that a checkpoint taken then (the HF
    ``Trainer`` saves after evaluating, before its next ``train()``) resumes the training exactly.

    ``keep_vars=True`` (the live tensors themselves) is left alone. The hook holds the optimizer
    weakly and acts only on that optimizer's model: a ``copy.deepcopy`` of the model carries an
    inert copy, a pickled one an inert hook (no optimizer is pickled with it).
    """

    def __init__(self, opt: OnlineCMDOptimizer | None = None):
        self._opt = None if opt is None else weakref.ref(opt)

    def __reduce__(self):
        return (_RawWhileSwapped, ())

    def __call__(self, module, state_dict, prefix, local_metadata) -> None:
        opt = None if self._opt is None else self._opt()
        if opt is None or module is not opt.model:
            return
        for key, live, raw in opt._raw_entries():
            key = prefix + key
            if key in state_dict and state_dict[key] is not live:
                state_dict[key] = raw


def _signature_with_online_args(init):
    """``init``'s signature with ``**online_args`` spelled out as :class:`OnlineCMD`'s keyword arguments
    (what ``help()`` and IDEs show)."""
    own = inspect.signature(init)
    online = [p for p in inspect.signature(OnlineCMD.__init__).parameters.values() if p.kind is p.KEYWORD_ONLY]
    params = [p for p in own.parameters.values() if p.kind is not p.VAR_KEYWORD]
    return own.replace(parameters=params + online)


OnlineCMDOptimizer.__init__.__signature__ = _signature_with_online_args(OnlineCMDOptimizer.__init__)
