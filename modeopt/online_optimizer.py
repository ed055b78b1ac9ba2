"""``OnlineCMDOptimizer``: online CMD owned by the optimizer, and gradual embedding.

* **Shadow model.** Wraps any torch optimizer and keeps an :class:`~modeopt.OnlineCMD` of the
  model up to date after every step. ``opt.eval()`` puts the CMD weights into the model and
  ``opt.train()`` restores the raw weights exactly. This is the schedule-free convention, so the
  HF ``Trainer``, which calls both around evaluation, evaluates the CMD model.
* **Gradual embedding** (the follow-up paper's "embedded CMD"), with ``embed_every=L``. Every L
  steps after the fit, the fraction ``embed_fraction`` of still-free weights whose fit changed
  least since the last check is frozen to ``a_i * r[m(i)] + b_i``. The references stay free; a
  frozen weight follows its reference. With ``granularity="tensor"`` (default), freezing happens a
  whole tensor at a time. Such a tensor leaves the autograd graph (``requires_grad=False``: no
  weight gradient), the optimizer (no state, no update) and the running moments. That is where
  the work saving comes from. ``granularity="weight"`` freezes single weights, as in the paper;
  it saves little, since a tensor still computes its gradient until every element is frozen.

Devices: the frozen coefficients live on their tensor's device, like the online moments. A step
synchronises with the host only at an embedding check (every ``embed_every`` steps after the fit:
ranking the weights reads values back); the other steps - the base step, the frozen weights'
assignment and the online update - do not.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import kernels
from ._wrapping import SharesBaseOptimizer
from .online import OnlineCMD, _to, default_names
from ._checks import check_no_duplicates

__all__ = ["OnlineCMDOptimizer"]


class OnlineCMDOptimizer(SharesBaseOptimizer):
    """Any torch optimizer plus an online CMD model of the training (and optional gradual embedding).

    Args:
        model, base_optimizer: the model and its optimizer (built on ``model.parameters()``).
        n_modes, fit_at, snapshot_every, sample_every, n_samples, seed, names, max_snapshots,
            record_dtype: as in :class:`~modeopt.OnlineCMD`.
        embed_every: if given, gradual embedding: every this many steps after the fit.
        embed_fraction: fraction of the still-free weights frozen at each check (paper: 0.1).
        granularity: ``"tensor"`` (whole tensors; saves gradient, state and update work) or
            ``"weight"`` (single weights, as in the paper).

    Use ``opt.eval()`` before evaluating (CMD weights in the model) and ``opt.train()`` after.
    ``opt.cmd_state_dict()`` gives the CMD weights as a plain state dict at any time.
    """

    def __init__(
        self,
        model: nn.Module,
        base_optimizer: torch.optim.Optimizer,
        *,
        n_modes: int = 10,
        fit_at: int,
        snapshot_every: int = 1,
        sample_every: int | None = None,
        n_samples: int = 1000,
        seed: int | None = None,
        names: Sequence[str] | Callable[[str, Tensor], bool] | None = None,
        max_snapshots: int | None = None,
        record_dtype: torch.dtype = torch.float32,
        embed_every: int | None = None,
        embed_fraction: float = 0.1,
        granularity: str = "tensor",
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(base_optimizer, OnlineCMDOptimizer):
            raise TypeError("base_optimizer is already an OnlineCMDOptimizer")
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer).__name__}")
        if granularity not in ("tensor", "weight"):
            raise ValueError(f"granularity must be 'tensor' or 'weight', got {granularity!r}")
        if embed_every is not None and (not isinstance(embed_every, int) or isinstance(embed_every, bool)
                                        or embed_every < 1):
            raise ValueError(f"embed_every must be an integer >= 1, got {embed_every!r}")
        if isinstance(embed_fraction, bool) or not isinstance(embed_fraction, (int, float)) \
                or not 0 < embed_fraction <= 1:
            raise ValueError(f"embed_fraction must be in (0, 1], got {embed_fraction!r}")
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
        self.online = OnlineCMD(model, n_modes=n_modes, fit_at=fit_at, snapshot_every=snapshot_every,
                                sample_every=sample_every, n_samples=n_samples, seed=seed,
                                names=default_names(model) if names is None else names,
                                max_snapshots=max_snapshots, record_dtype=record_dtype)
        self.embed_every, self.embed_fraction, self.granularity = embed_every, embed_fraction, granularity
        in_opt = {id(p) for g in base_optimizer.param_groups for p in g["params"]}
        # Weights that gradual embedding may freeze: modelled, trainable, owned by the optimizer.
        self._candidates = [i for i, t in enumerate(self.online._tensors)
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

    # ------------------------------------------------------------- stepping
    def step(self, closure=None):
        if self._swapped is not None:
            raise RuntimeError("the CMD weights are swapped into the model (opt.eval()): call opt.train() before "
                               "training steps")
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
        tensors, labels = self.online._tensors, self.online.labels
        by_device: dict[torch.device, list[int]] = {}
        for t, f in self.frozen.items():
            if f["mask"] is None:
                by_device.setdefault(tensors[t].device, []).append(t)
        for dev, whole in by_device.items():
            kernels.assign([tensors[t] for t in whole], [self.frozen[t]["a"] for t in whole],
                           [self.frozen[t]["b"] for t in whole], [labels[t] for t in whole], _to(r, dev))
        r32: dict[torch.device, Tensor] = {}
        for t, f in self.frozen.items():
            if f["mask"] is not None:
                w, pos = tensors[t], self._positions[t]
                if w.device not in r32:
                    r32[w.device] = _to(r, w.device, torch.float32)
                lab = kernels.as_index(labels[t].index_select(0, pos))
                value = torch.addcmul(f["b"], f["a"], r32[w.device][lab])
                w.view(-1).index_copy_(0, pos, value.to(w.dtype))

    # --------------------------------------------------- gradual embedding
    def _relative_change(self, t: int, a: Tensor, mean: Tensor) -> Tensor:
        """How much a weight's fitted trajectory moved since the last check, relative to its own
        movement: (|da| sd_r + |d mean|) / (|a| sd_r)."""
        lab = kernels.as_index(self.online.labels[t])
        sd = _to(self.online.mode_m2 / max(self.online.count, 1), lab.device).sqrt()[lab]
        prev = self._prev.get(t)
        if prev is None:
            return torch.full_like(a, float("inf"))
        return ((a - prev[0]).abs() * sd + (mean - prev[1]).abs()) / (a.abs() * sd).clamp(min=1e-30)

    @torch.no_grad()
    def _embed_more(self) -> None:
        labels, a_all, b_all = self.online.coefficients()
        refs = self._reference_tensors()
        changes, free = {}, 0
        for t in self._candidates:
            f = self.frozen.get(t)
            if f is not None and f["mask"] is None:
                continue
            change = self._relative_change(t, a_all[t], self.online.mean[t])
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
            flat = torch.cat([_to(changes[t], rdev) for t in changes])
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
        """New reference weights for the modes whose reference lies in the tensors ``leaving``.

        For each such mode: the free weight of the mode, in a trainable tensor that stays free,
        with the largest ``|a|`` (its profile carries r with the least relative noise). None if a
        mode has no such weight left (or only ones with a ~ 0).
        """
        plan = []
        for m, (t_ref, _) in enumerate(self.online.ref_index):
            if t_ref not in leaving:
                continue
            best = (0.0, None)
            for u in self._candidates:
                f = self.frozen.get(u)
                if u in leaving or (f is not None and f["mask"] is None):
                    continue
                score = a_all[u].abs() * (kernels.as_index(labels[u]) == m)
                if f is not None:
                    score = score.masked_fill(f["mask"], 0.0)
                i = int(score.argmax())
                if float(score[i]) > best[0]:
                    best = (float(score[i]), (m, u, i, float(a_all[u][i]), float(b_all[u][i])))
            # |a| relative to the old reference's own slope (1): a ~ 0 would amplify noise without bound
            if best[1] is None or best[0] < 1e-3:
                return None
            plan.append(best[1])
        return plan

    def freeze(self, names: Sequence[str], *, allow_references: bool = False) -> None:
        """Freeze whole tensors now: from here on they follow ``a * r[m] + b`` with their current fit
        and stop costing (no gradient, optimizer state, update or moments).

        A tensor holding a mode's reference hands it off first: the free weight of the mode (in a
        tensor that stays free) with the largest ``|a|`` carries the mode's profile from then on
        (:meth:`OnlineCMD.hand_off`). If a mode has no such weight left, the tensor is refused unless
        ``allow_references=True``: freezing it then stops that mode and every frozen weight of it.
        """
        self.online._need_fit()
        labels, a, b = self.online.coefficients()
        for name in names:
            if name not in self.online._names:
                raise KeyError(f"{name!r} is not modelled by this OnlineCMDOptimizer")
            t = self.online._names.index(name)
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
        p = self.online._tensors[t]
        self.frozen[t] = {"mask": None, "a": a.to(torch.float32), "b": b.to(torch.float32)}
        self._positions.pop(t, None)
        self._detach(t, p)

    def _detach(self, t: int, p: nn.Parameter) -> None:
        """The tensor stops costing: no gradient, no optimizer state or update, no running moments."""
        p.requires_grad_(False)
        p.grad = None
        for group in self.base.param_groups:
            group["params"][:] = [q for q in group["params"] if q is not p]
        self.base.state.pop(p, None)
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
            self._detach(t, self.online._tensors[t])
        else:
            self.frozen[t] = {"mask": mask, "a": full_a[mask], "b": full_b[mask], "a_full": full_a, "b_full": full_b}
            self._positions[t] = mask.nonzero().view(-1)

    def frozen_fraction(self) -> float:
        """Fraction of the embeddable weights that are frozen now."""
        total = sum(self.online._tensors[t].numel() for t in self._candidates)
        frozen = sum(self.online._tensors[t].numel() if f["mask"] is None else int(f["mask"].sum())
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
            self._swapped = {n: t.detach().clone() for n, t in zip(self.online._names, self.online._tensors)}
            self.online.load_into(self.model)
            self._swap_hook = self.model.register_state_dict_post_hook(_RawWhileSwapped(self))

    def train(self) -> None:
        """Restore the raw weights (exactly) for training."""
        if self._swapped is not None:
            from .trajectory import load_named_into

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
        raw = {id(t): self._swapped[n] for n, t in zip(self.online._names, self.online._tensors)}
        named = list(self.model.named_parameters(remove_duplicate=False))
        named += list(self.model.named_buffers(remove_duplicate=False))
        return [(k, t, raw[id(t)]) for k, t in named if id(t) in raw]

    def cmd_state_dict(self) -> dict[str, Tensor]:
        """The CMD weights as a plain ``{name: tensor}`` (the model's own values before the fit)."""
        return self.online.cmd_state_dict()

    # ---------------------------------------------------------- state dicts
    def state_dict(self) -> dict[str, Any]:
        # Nothing in it depends on the eval()/train() swap (no weights: those are the model's, and the
        # model's state dict holds the raw ones while swapped), so it may be taken in either mode.
        frozen = {str(t): {k: v for k, v in f.items() if v is not None} for t, f in self.frozen.items()}
        return {"base": self.base.state_dict(), "online": self.online.state_dict(), "frozen": frozen,
                "frozen_whole": [t for t, f in self.frozen.items() if f["mask"] is None],
                "prev": {str(t): [a, m] for t, (a, m) in self._prev.items()},
                "embed_history": [dict(h) for h in self.embed_history]}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`. Everything is checked first: a state that does not fit this
        model and optimizer raises ``ValueError`` and changes nothing."""
        if self._swapped is not None:
            raise RuntimeError("the CMD weights are swapped into the model (opt.eval()): call opt.train() before "
                               "load_state_dict(), or train() would put the old raw weights back afterwards")
        buffer = self._checked_state(sd)
        whole = set(sd["frozen_whole"])
        leaving = {id(self.online._tensors[t]) for t in whole}
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
        self.online._apply_state(sd["online"], buffer)
        self.frozen, self._positions = {}, {}
        devs = [t.device for t in self.online._tensors]
        for key, f in sd["frozen"].items():
            t = int(key)
            entry = {k: v.to(devs[t], copy=True) for k, v in f.items()}  # on the frozen tensor's device
            entry.setdefault("mask", None)
            if t in whole:
                entry["mask"] = None
                self.frozen[t] = entry
                p = self.online._tensors[t]
                p.requires_grad_(False)
                p.grad = None
            else:
                self.frozen[t] = entry
                self._positions[t] = entry["mask"].nonzero().view(-1)
        self._prev = {int(k): (v[0].to(devs[int(k)], copy=True), v[1].to(devs[int(k)], copy=True))
                      for k, v in sd["prev"].items()}
        self.embed_history = [dict(h) for h in sd["embed_history"]]

    def _checked_state(self, sd: Any):
        """Validate a :meth:`state_dict` without changing anything (the online part, the frozen tensors,
        the base optimizer's groups); returns the online recording window, loaded into a new buffer."""
        keys = ("base", "online", "frozen", "frozen_whole", "prev", "embed_history")
        if not isinstance(sd, dict) or any(k not in sd for k in keys):
            missing = [k for k in keys if not isinstance(sd, dict) or k not in sd]
            raise ValueError(f"not an OnlineCMDOptimizer state dict (it lacks {missing}); to load a plain "
                             "optimizer's state use opt.base.load_state_dict(...)")
        buffer = self.online._checked_state(sd["online"])
        names, tensors = self.online._names, self.online._tensors
        frozen, whole = sd["frozen"], sd["frozen_whole"]
        if not isinstance(frozen, dict) or not isinstance(whole, (list, tuple)) or not isinstance(sd["prev"], dict):
            raise ValueError("the state's 'frozen', 'frozen_whole' and 'prev' must be a dict, a list and a dict: "
                             "damaged checkpoint")

        def index(key, what):
            try:
                t = int(key)
            except (TypeError, ValueError):
                t = None
            if t is None or t not in self._candidates:
                raise ValueError(f"{what} {key} is not a tensor this optimizer may freeze (a trainable parameter of "
                                 "the base optimizer): the state is from a different model or set-up")
            return t

        def sized(name, what, v, n, dtype, owner="frozen tensor"):
            # exactly what state_dict() saves: 1-D, of the dtype the per-step code computes in
            if not isinstance(v, Tensor) or v.dtype != dtype or v.dim() != 1:
                got = f"a {v.dtype} tensor of shape {tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__
                raise ValueError(f"{owner} {name!r}: the state's {what} must be a 1-D {dtype} tensor, got {got}: "
                                 "damaged or edited checkpoint; load an intact one")
            if v.numel() != n:
                raise ValueError(f"{owner} {name!r} has {v.numel()} {what}, the model's tensor has {n}: the state "
                                 "is from a different model; build the same model as the saved run")
            if dtype != torch.bool and not bool(torch.isfinite(v).all()):
                raise ValueError(f"{owner} {name!r}: its {what} hold NaN/inf: damaged checkpoint")

        f32, f64 = torch.float32, torch.float64
        history = sd["embed_history"]
        if not isinstance(history, (list, tuple)) or not all(isinstance(h, dict) for h in history):
            raise ValueError(f"the state's 'embed_history' must be a list of dicts, got {history!r:.80}: damaged "
                             "checkpoint")

        whole_set = {index(t, "frozen tensor") for t in whole}
        for key, f in frozen.items():
            t = index(key, "frozen tensor")
            name, n = names[t], tensors[t].numel()
            if not isinstance(f, dict) or "a" not in f or "b" not in f:
                raise ValueError(f"frozen tensor {name!r} lacks its coefficients 'a' and 'b': damaged checkpoint")
            if t in whole_set:
                sized(name, "coefficients a", f["a"], n, f32)
                sized(name, "offsets b", f["b"], n, f32)
            else:
                if any(k not in f for k in ("mask", "a_full", "b_full")):
                    raise ValueError(f"partly frozen tensor {name!r} lacks 'mask', 'a_full' or 'b_full': "
                                     "damaged checkpoint")
                sized(name, "mask entries", f["mask"], n, torch.bool)
                k = int(f["mask"].sum())
                sized(name, "coefficients a", f["a"], k, f32)
                sized(name, "offsets b", f["b"], k, f32)
                sized(name, "coefficients a_full", f["a_full"], n, f32)
                sized(name, "offsets b_full", f["b_full"], n, f32)
        if not whole_set <= {int(k) for k in frozen}:
            raise ValueError("the state lists whole frozen tensors without their coefficients: damaged checkpoint")
        if whole_set != set(sd["online"].get("frozen_tensors", [])):
            raise ValueError("the state's whole frozen tensors differ from those its online CMD stopped tracking: "
                             "damaged checkpoint")
        for key, v in sd["prev"].items():
            t = index(key, "tracked tensor")
            if not isinstance(v, (list, tuple)) or len(v) != 2:
                raise ValueError(f"the state's 'prev' entry of {names[t]!r} must be [a, mean]: damaged checkpoint")
            sized(names[t], "previous coefficients", v[0], tensors[t].numel(), f64, "tracked tensor")
            sized(names[t], "previous means", v[1], tensors[t].numel(), f64, "tracked tensor")
        base = sd["base"]
        if not isinstance(base, dict) or not isinstance(base.get("param_groups"), (list, tuple)) or "state" not in base:
            raise ValueError("the state's 'base' entry is not an optimizer state dict: damaged checkpoint")
        groups = base["param_groups"]
        if len(groups) != len(self.base.param_groups):
            raise ValueError(f"the state's base optimizer has {len(groups)} param group(s), this one "
                             f"{len(self.base.param_groups)}: build the base optimizer with the same param groups "
                             "as the saved run")
        leaving = {id(tensors[t]) for t in whole_set}
        for gi, (g, mine) in enumerate(zip(groups, self.base.param_groups)):
            want = sum(id(p) not in leaving for p in mine["params"])
            got = len(g.get("params", ())) if isinstance(g, dict) else -1
            if got != want:
                raise ValueError(f"param group {gi} of the state's base optimizer holds {got} tensor(s), this "
                                 f"optimizer's would hold {want} after the load: the state is from a different model "
                                 "or set-up")
        return buffer


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
