"""Checkpoints of :class:`~modeopt.BlockwiseCMD`: what a finished block's mode space saves, and the
checks that a saved state fits the optimizer it is loaded into, all made before anything changes."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from modeopt.modespace.space import ModeSpace
from modeopt.trajectories.snapshots import SnapshotBuffer

__all__ = ["DAMAGED", "space_state", "check_blockwise_state", "space_from_state", "check_recording",
           "check_base_groups", "check_base_values"]

DAMAGED = "damaged checkpoint, or one saved by an optimizer built differently"


def space_state(space: ModeSpace) -> dict[str, Any]:
    """A finished block's mode space: parameter names, per tensor its labels and ``a`` (as stored),
    per mode its param group, ``r`` and the ``r`` its weights hold."""
    return {"names": list(space.names), "labels": list(space.labels), "a": list(space.a),
            "r_groups": space.r_groups.clone(), "r": space.r_full().detach().clone(),
            "r_in_weights": space.r_in_weights.clone()}


def _check_space(b: int, saved: Any, emb: Sequence[tuple[str, Tensor]], n_groups: int) -> None:
    if not isinstance(saved, Mapping) or not {"names", "labels", "a", "r_groups", "r", "r_in_weights"} <= set(saved):
        raise ValueError(f"block {b}'s saved mode space is not a mode-space state: {DAMAGED}")
    names = [n for n, _ in emb]
    if not isinstance(saved["names"], Sequence) or list(saved["names"]) != names:
        raise ValueError(f"block {b}'s saved mode space embeds {saved['names']!r:.80}, this optimizer's block "
                         f"{names[:3]}...: {DAMAGED}")
    r, r_groups = saved["r"], saved["r_groups"]
    if not (isinstance(r, Tensor) and r.dim() == 1 and r.is_floating_point() and r.numel() >= 1):
        raise ValueError(f"block {b}'s saved r must be a 1-D float tensor: {DAMAGED}")
    m = r.numel()
    for key in ("r_in_weights", "r_groups"):
        t = saved[key]
        if not (isinstance(t, Tensor) and tuple(t.shape) == (m,)):
            raise ValueError(f"block {b}'s saved {key} must have shape ({m},): {DAMAGED}")
    for key in ("r", "r_in_weights"):
        if not bool(torch.isfinite(saved[key]).all()):
            raise ValueError(f"block {b}'s saved {key} holds NaN/inf: {DAMAGED} (a diverged run's r is never saved: "
                             "BlockwiseCMD puts back an r that overflows); resume from an intact checkpoint")
    if r_groups.is_floating_point() or not bool(((r_groups >= 0) & (r_groups < n_groups)).all()):
        raise ValueError(f"block {b}'s saved r_groups must be integers in [0, {n_groups}): {DAMAGED}")
    for key in ("labels", "a"):
        ts = saved[key]
        if not (isinstance(ts, Sequence) and len(ts) == len(emb)
                and all(isinstance(t, Tensor) and t.numel() == p.numel() for t, (_, p) in zip(ts, emb))):
            raise ValueError(f"block {b}'s saved {key} do not match its {len(emb)} tensors' sizes: {DAMAGED}")
    if any(t.is_floating_point() or t.is_complex() for t in saved["labels"]):
        raise ValueError(f"block {b}'s saved labels must be integers: {DAMAGED}")
    for t, (name, _) in zip(saved["a"], emb):
        if not t.is_floating_point():
            raise ValueError(f"block {b}'s saved coefficients a of {name!r} must be floats, got {t.dtype}: {DAMAGED}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"block {b}'s saved coefficients a of {name!r} hold NaN/inf (non-finite): {DAMAGED}")
    for t in saved["labels"]:
        if t.numel() and not (0 <= int(t.min()) and int(t.max()) < m):
            raise ValueError(f"block {b}'s saved labels must lie in [0, {m}): {DAMAGED}")


def check_blockwise_state(state: Any, *, blocks: Sequence[Sequence[str]], emb: Sequence[Sequence[tuple[str, Tensor]]],
                          n_groups: int, steps_per_block: int) -> dict[str, Any]:
    """Validate the ``"blockwise"`` part of a saved state; returns it. ``ValueError`` says what is wrong."""
    keys = {"step", "active", "in_block", "blocks", "buffer", "spaces", "history"}
    if not isinstance(state, Mapping) or not keys <= set(state):
        raise ValueError(f"not a BlockwiseCMD state (expected the keys {sorted(keys)}): {DAMAGED}")
    saved_blocks = state["blocks"]
    if not (isinstance(saved_blocks, Sequence) and all(isinstance(b, Sequence) for b in saved_blocks)
            and [list(b) for b in saved_blocks] == [list(b) for b in blocks]):
        raise ValueError(f"the checkpoint was saved with blocks {state['blocks']}, this optimizer has {blocks}: "
                         "build it with the same blocks")
    step, active, in_block, spaces = state["step"], state["active"], state["in_block"], state["spaces"]
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (step, active, in_block))
    if not ints or step < 0 or not 0 <= active <= len(blocks) or not 0 <= in_block < steps_per_block:
        raise ValueError(f"the checkpoint's step={step!r}, active={active!r}, in_block={in_block!r} are out of range "
                         f"({len(blocks)} blocks of {steps_per_block} steps): {DAMAGED}")
    if not isinstance(spaces, Sequence) or len(spaces) != active:
        n = len(spaces) if isinstance(spaces, Sequence) else repr(spaces)
        raise ValueError(f"the checkpoint has block {active} active but {n} finished block(s): {DAMAGED}")
    for b, saved in enumerate(spaces):
        _check_space(b, saved, emb[b], n_groups)
    if (state["buffer"] is None) != (active == len(blocks)):
        raise ValueError(f"the checkpoint's recording does not fit its phase (block {active} of {len(blocks)}): "
                         f"{DAMAGED}")
    if not isinstance(state["history"], list) or not all(isinstance(h, Mapping) for h in state["history"]):
        raise ValueError(f"the checkpoint's history must be a list of dicts: {DAMAGED}")
    return dict(state)


def space_from_state(model: nn.Module, emb: Sequence[tuple[str, nn.Parameter]], saved: Mapping[str, Any],
                     r_prefix: str) -> ModeSpace:
    """Rebuild a finished block's mode space from :func:`space_state` (checked before), exactly."""
    a = [t.to(device=p.device) for t, (_, p) in zip(saved["a"], emb)]
    space = ModeSpace(model, list(emb), [t.to(p.device) for t, (_, p) in zip(saved["labels"], emb)], a,
                      saved["r_groups"].to(torch.int64), saved["r"].to(torch.float32),
                      coef_dtype=saved["a"][0].dtype, r_prefix=r_prefix)
    space.r_in_weights.copy_(saved["r_in_weights"])
    return space


def check_recording(saved: Any, emb: Sequence[tuple[str, Tensor]], record_dtype: torch.dtype, capacity: int,
                    block: int) -> None:
    """The saved recording of the active block: one buffer state per tensor, of its size."""
    if not isinstance(saved, list) or len(saved) != len(emb):
        raise ValueError(f"the checkpoint's recording of block {block} must hold {len(emb)} tensors' snapshots: "
                         "damaged checkpoint, or other blocks")
    first = None
    for state, (name, p) in zip(saved, emb):
        try:
            _, dropped = SnapshotBuffer(p.numel(), dtype=record_dtype, capacity=capacity).checked_state(state)
        except ValueError as e:
            raise ValueError(f"the checkpoint's recording of {name!r}: {e}") from None
        data = state["data"]
        if data.dim() != 2 or data.shape[1] != p.numel() or not 1 <= data.shape[0] <= capacity:
            raise ValueError(f"the checkpoint's recording of {name!r} has shape {tuple(data.shape)}, expected "
                             f"(<= {capacity}, {p.numel()}): damaged checkpoint, or other blocks")
        if dropped:
            # CMDOptimizer drops such a snapshot on load; here each tensor has its own recording, and a row
            # dropped from one of them only would break the block's embedding later (sizes no longer match).
            raise ValueError(f"the checkpoint's recording of {name!r} holds NaN/inf (the snapshots of steps {dropped}, "
                             f"or its baseline): {DAMAGED}; resume from an intact checkpoint")
        steps = (list(state["steps"]), state["count"])
        if first is None:
            first = (name, steps)
        elif steps != first[1]:
            raise ValueError(f"the checkpoint's recording of {name!r} was taken at steps {steps[0]}, that of "
                             f"{first[0]!r} at {first[1][0]}: the block's tensors are recorded together; {DAMAGED}")


def check_base_groups(base_state: Any, want: Sequence[int], saved_active: int) -> None:
    """The saved base optimizer state must hold, per param group, ``want[g]`` tensors (what the saved
    phase trains there) and be a torch.optim state_dict."""
    groups = base_state.get("param_groups") if isinstance(base_state, dict) else None
    saved_state = base_state.get("state") if isinstance(base_state, dict) else None
    if not isinstance(groups, list) or len(groups) != len(want):
        raise ValueError(f"the checkpoint's base optimizer state has {len(groups or [])} param groups, this one "
                         f"{len(want)}: build the base optimizer the same way")
    if not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        raise ValueError(f"the checkpoint's base param groups are not dicts with a 'params' list: {DAMAGED}")
    for gi, (g, n) in enumerate(zip(groups, want)):
        if len(g["params"]) != n:
            raise ValueError(f"the checkpoint's base param group {gi} holds {len(g['params'])} tensors, "
                             f"block {saved_active} trains {n} there: damaged checkpoint, or other param groups")
    ids = [i for g in groups for i in g["params"]]
    if (not isinstance(saved_state, dict) or not all(isinstance(i, int) for i in ids)
            or len(set(ids)) != len(ids) or not set(saved_state) <= set(ids)
            or not all(isinstance(v, dict) for v in saved_state.values())):
        raise ValueError("the checkpoint's base optimizer state is not a torch.optim state_dict (a 'state' dict "
                         f"of dicts, keyed by distinct ids of its param groups' 'params'): {DAMAGED}")


def check_base_values(base_state: Mapping[str, Any], names: Sequence[str]) -> None:
    """No NaN/inf in the saved base optimizer's state, nor NaN in its hyper-parameters (checked by
    :func:`check_base_groups` first). ``names``: the name of each saved parameter id's tensor, in the
    order of the saved param groups' ``params``.

    Loaded, a NaN moment would make its tensor NaN at the next step (a finished block's ``r``: the
    block would never move again).
    """
    ids = [i for g in base_state["param_groups"] for i in g["params"]]
    name_of = dict(zip(ids, names))
    for i, st in base_state["state"].items():
        for key, v in st.items():
            if _nonfinite(v, nan_only=False):
                raise ValueError(f"the checkpoint's base optimizer's state {key!r} of {name_of.get(i, i)!r} holds "
                                 f"NaN/inf: {DAMAGED}; resume from an intact checkpoint")
    for gi, g in enumerate(base_state["param_groups"]):
        for key, v in g.items():
            if key != "params" and _nonfinite(v, nan_only=True):
                raise ValueError(f"the checkpoint's base param group {gi} has {key}={v!r} (NaN): {DAMAGED}")


def _nonfinite(v: Any, *, nan_only: bool) -> bool:
    """Whether a state value (tensor, float, or a tuple/list of them) holds NaN (or inf unless ``nan_only``)."""
    if isinstance(v, Tensor):
        if not (v.is_floating_point() or v.is_complex()) or v.numel() == 0:
            return False
        return bool(torch.isnan(v).any()) if nan_only else not bool(torch.isfinite(v).all())
    if isinstance(v, float):
        return math.isnan(v) if nan_only else not math.isfinite(v)
    if isinstance(v, (list, tuple)):
        return any(_nonfinite(x, nan_only=nan_only) for x in v)
    return False
