"""Checkpoints of :class:`~modeopt.BlockwiseCMD`: what a finished block's mode space saves, and the
checks that a saved state fits the optimizer it is loaded into, all made before anything changes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .modespace import ModeSpace

__all__ = ["DAMAGED", "space_state", "check_blockwise_state", "space_from_state"]

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
    if not bool(torch.isfinite(saved["r_in_weights"]).all()):
        raise ValueError(f"block {b}'s saved r_in_weights holds NaN/inf: {DAMAGED}")
    if r_groups.is_floating_point() or not bool(((r_groups >= 0) & (r_groups < n_groups)).all()):
        raise ValueError(f"block {b}'s saved r_groups must be integers in [0, {n_groups}): {DAMAGED}")
    for key in ("labels", "a"):
        ts = saved[key]
        if not (isinstance(ts, Sequence) and len(ts) == len(emb)
                and all(isinstance(t, Tensor) and t.numel() == p.numel() for t, (_, p) in zip(ts, emb))):
            raise ValueError(f"block {b}'s saved {key} do not match its {len(emb)} tensors' sizes: {DAMAGED}")
    if any(t.is_floating_point() or t.is_complex() for t in saved["labels"]):
        raise ValueError(f"block {b}'s saved labels must be integers: {DAMAGED}")
    if any(not t.is_floating_point() or not bool(torch.isfinite(t).all()) for t in saved["a"]):
        raise ValueError(f"block {b}'s saved coefficients a must be finite floats: {DAMAGED}")
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
