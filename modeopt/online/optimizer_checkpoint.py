"""Validation of :class:`~modeopt.OnlineCMDOptimizer` checkpoints (the gradual-embedding part), before
anything is loaded: a state that does not fit the model and base optimizer raises ``ValueError``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from modeopt.optim.nonfinite import check_optimizer_state_finite

__all__ = ["check_embedding_state"]


def check_embedding_state(sd: dict[str, Any], *, names: Sequence[str], tensors: Sequence[Tensor],
                          embeddable: Sequence[int], param_groups: Sequence[dict[str, Any]],
                          param_names: Mapping[int, str]) -> None:
    """Check the frozen tensors, tracked fits, embedding history, base-optimizer groups and state
    (no NaN/inf, named by ``param_names``: id -> the model's parameter name) and the skip counter of an
    :meth:`OnlineCMDOptimizer.state_dict <modeopt.OnlineCMDOptimizer.state_dict>` ``sd`` (whose keys are
    present) against the modelled ``names``/``tensors``, the indices of the ``embeddable`` ones and the
    base optimizer's ``param_groups``. Raises ``ValueError`` saying what does not fit."""
    frozen, whole = sd["frozen"], sd["frozen_whole"]
    if not isinstance(frozen, dict) or not isinstance(whole, (list, tuple)) or not isinstance(sd["prev"], dict):
        raise ValueError("the state's 'frozen', 'frozen_whole' and 'prev' must be a dict, a list and a dict: "
                         "damaged checkpoint")

    def index(key, what):
        try:
            t = int(key)
        except (TypeError, ValueError):
            t = None
        if t is None or t not in embeddable:
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
    if len(groups) != len(param_groups):
        raise ValueError(f"the state's base optimizer has {len(groups)} param group(s), this one "
                         f"{len(param_groups)}: build the base optimizer with the same param groups "
                         "as the saved run")
    leaving = {id(tensors[t]) for t in whole_set}
    for gi, (g, mine) in enumerate(zip(groups, param_groups)):
        want = sum(id(p) not in leaving for p in mine["params"])
        got = len(g.get("params", ())) if isinstance(g, dict) else -1
        if got != want:
            raise ValueError(f"param group {gi} of the state's base optimizer holds {got} tensor(s), this "
                             f"optimizer's would hold {want} after the load: the state is from a different model "
                             "or set-up")
    check_optimizer_state_finite(base, [param_names.get(id(p), "?") for g in param_groups for p in g["params"]
                                        if id(p) not in leaving])
    skipped = sd.get("skipped_steps", 0)  # absent in states saved before it was
    if not isinstance(skipped, int) or isinstance(skipped, bool) or skipped < 0:
        raise ValueError(f"the state's skipped_steps must be an integer >= 0, got {skipped!r}: damaged checkpoint")
