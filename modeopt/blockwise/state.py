"""Checkpoints of :class:`~modeopt.BlockwiseCMD`: what a finished block's mode space saves, and the
checks that a saved state fits the optimizer it is loaded into, all made before anything changes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from modeopt.modespace.kernels.encoding import PACK_MAX_MODES, is_packed, unpack_labels
from modeopt.modespace.half import check_base_state
from modeopt.modespace.space import ModeSpace
from modeopt.utils.checks import check_int
from modeopt.trajectories.snapshots import SnapshotBuffer

__all__ = ["DAMAGED", "space_state", "check_blockwise_state", "space_from_state", "check_recording",
           "check_base_groups", "checked_counters", "saved_param_names"]

DAMAGED = "damaged checkpoint, or one saved by an optimizer built differently"


def space_state(space: ModeSpace) -> dict[str, Any]:
    """A finished block's mode space: parameter names, per tensor its labels and ``a`` (as stored),
    per mode its param group, ``r`` and the ``r`` its weights hold (those ``model.state_dict()`` gives);
    for bfloat16/float16 weights their frozen bases (``half_base``: :meth:`ModeSpace.base_state`, the
    parameters themselves; None without such weights, and absent in older checkpoints); with the 8-bit
    encoding also ``"a_scale"`` (per tensor the ``(M,)`` scales of the int8 codes ``a``; labels packed for M <= 16)."""
    out = {"names": list(space.names), "labels": list(space.labels), "a": list(space.a),
           "r_groups": space.r_groups.clone(), "r": space.r_full().detach().clone(),
           "r_in_weights": space.r_in_weights.clone(), "half_base": space.base_state() if space.half else None}
    if space.a_scale is not None:
        out["a_scale"] = list(space.a_scale)
    return out


def _plain(labels: Tensor, n: int) -> Tensor:
    """Saved labels of a tensor of ``n`` weights, one per weight (packed 4-bit ones unpacked)."""
    return unpack_labels(labels, n) if is_packed(labels, n) else labels


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
    scales = saved.get("a_scale")  # the 8-bit encoding (absent in float spaces and older checkpoints)
    if scales is not None and not (
            isinstance(scales, Sequence) and len(scales) == len(emb)
            and all(isinstance(t, Tensor) and tuple(t.shape) == (m,) and t.is_floating_point()
                    and bool(torch.isfinite(t).all()) and bool((t >= 0).all()) for t in scales)):
        raise ValueError(f"block {b}'s saved a_scale must hold one finite, non-negative ({m},) float tensor per "
                         f"tensor: {DAMAGED}")
    ts = saved["a"]
    if not (isinstance(ts, Sequence) and len(ts) == len(emb)
            and all(isinstance(t, Tensor) and t.numel() == p.numel() for t, (_, p) in zip(ts, emb))):
        raise ValueError(f"block {b}'s saved a do not match its {len(emb)} tensors' sizes: {DAMAGED}")
    ts = saved["labels"]
    if not (isinstance(ts, Sequence) and len(ts) == len(emb) and all(
            isinstance(t, Tensor) and (t.numel() == p.numel() or (scales is not None and m <= PACK_MAX_MODES
                                                                  and is_packed(t, p.numel())))
            for t, (_, p) in zip(ts, emb))):
        raise ValueError(f"block {b}'s saved labels do not match its {len(emb)} tensors' sizes: {DAMAGED}")
    if any(t.is_floating_point() or t.is_complex() for t in saved["labels"]):
        raise ValueError(f"block {b}'s saved labels must be integers: {DAMAGED}")
    for t, (name, _) in zip(saved["a"], emb):
        if scales is None:
            if not t.is_floating_point():
                raise ValueError(f"block {b}'s saved coefficients a of {name!r} must be floats, got {t.dtype}: {DAMAGED}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"block {b}'s saved coefficients a of {name!r} hold NaN/inf (non-finite): {DAMAGED}")
        elif t.dtype != torch.int8:
            raise ValueError(f"block {b}'s saved a of {name!r} must be int8 codes with its a_scale (the 8-bit "
                             f"encoding): {DAMAGED}")
    for t, (_, p) in zip(saved["labels"], emb):
        t = _plain(t, p.numel())
        if t.numel() and not (0 <= int(t.min()) and int(t.max()) < m):
            raise ValueError(f"block {b}'s saved labels must lie in [0, {m}): {DAMAGED}")
    if saved.get("half_base") is not None:
        check_base_state(saved["half_base"], [n for n, _ in emb], [p for _, p in emb], m, f"block {b}'s checkpoint")


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
    labels = [_plain(t, p.numel()).to(p.device) for t, (_, p) in zip(saved["labels"], emb)]
    space = ModeSpace(model, list(emb), labels, a, saved["r_groups"].to(torch.int64), saved["r"].to(torch.float32),
                      coef_dtype=saved["a"][0].dtype, r_prefix=r_prefix, a_scale=saved.get("a_scale"))
    space.r_in_weights.copy_(saved["r_in_weights"])
    space.load_base_state(saved.get("half_base"))
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


def checked_counters(st: Mapping[str, Any], *, n_modes: int, n_samples: int,
                     emb: Sequence[Sequence[tuple[str, Tensor]]]) -> dict[str, int]:
    """The run's counters and M (absent in checkpoints from before they were saved: 0 skips, this n_modes)."""
    out = {}
    for key, low, default in (("skipped_steps", 0, 0), ("r_restores", 0, 0), ("n_modes", 1, n_modes)):
        value = st.get(key, default)
        try:
            check_int(f"the checkpoint's {key}", value, low)
        except ValueError as e:
            raise ValueError(f"{e}: damaged checkpoint") from None
        out[key] = value
    m = out["n_modes"]
    if m > n_samples or any(m > sum(p.numel() for _, p in block) for block in emb[st["active"]:]):
        raise ValueError(f"the checkpoint's n_modes={m} exceeds this optimizer's n_samples={n_samples} or "
                         "the weights of a block still to embed: build the model and BlockwiseCMD as in the saved run")
    if any(s["r"].numel() > m for s in st["spaces"]):
        raise ValueError(f"the checkpoint has a block with more mode scalars than its n_modes={m}: damaged checkpoint")
    return out


def saved_param_names(model: nn.Module, orig: Sequence[Sequence[Tensor]], trained: set[int],
                      spaces: Sequence[Mapping[str, Any]], r_prefix: str) -> list[str]:
    """The names of the base optimizer's tensors in a saved phase, in param-group order (``_regroup``'s)."""
    names = {id(p): n for n, p in model.named_parameters()}
    owner = list(model.named_modules())[-1][0]  # where a ModeSpace registers its r (ModeSpace.r_owner)
    r_of: dict[int, list[str]] = {}
    for b, saved in enumerate(spaces):
        for j, g in enumerate(sorted(set(saved["r_groups"].tolist()))):
            r = f"{r_prefix.format(b)}{j}"
            r_of.setdefault(g, []).append(f"{owner}.{r}" if owner else r)
    return [n for gi, params in enumerate(orig)
            for n in [names.get(id(p), "?") for p in params if id(p) in trained] + r_of.get(gi, [])]
