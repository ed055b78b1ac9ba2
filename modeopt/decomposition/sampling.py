"""Choosing the K weights whose correlations are clustered (CMD paper, appendix 8.2).

Half the budget is spread evenly over the layers (``K / (2 * n_layers)`` each), the other half
uniformly over all weights; when ``K / 2 <= n_layers`` all K are drawn uniformly. Only weights
that move are eligible: a constant profile has no defined correlation.

Memory: O(K) beside the masks, whatever N is. Listing a layer's moving rows (8 bytes per weight)
or copying the mask (1 byte per weight) would be the largest allocation of a switch at scale, so the
per-layer draws pick ranks among the movers and locate them chunk by chunk, and the uniform draws
are rejected against the mask and the rows taken so far. The result is the one the direct
formulation gives: ``rng.choice(rows, k)`` equals ``rows[rng.choice(len(rows), k)]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["sample_weights"]

#: mask entries scanned at once when locating ranks (int64 cumulative counts: 8 MiB)
_CHUNK = 1 << 20


def sample_weights(
    moving: Tensor | Sequence[Tensor], layer_sizes: Sequence[int] | None, k: int, rng: np.random.Generator
) -> Tensor:
    """Pick up to ``k`` distinct rows among the moving ones.

    Args:
        moving: ``(N,)`` bool, which rows are eligible; or one bool tensor per layer (the layers are
            then those tensors, in order, and ``layer_sizes`` may be None).
        layer_sizes: number of rows of each layer, in order (they sum to N).
        k: sample budget.
        rng: the random source (pass a seeded generator for reproducibility).

    Returns:
        Sorted int64 row indices (rows of the concatenated layers), ``min(k, number moving)`` of them.
    """
    if isinstance(moving, Tensor):
        flat = moving.reshape(-1).cpu().numpy()
        sizes = [int(s) for s in (layer_sizes if layer_sizes is not None else [flat.size])]
        if sum(sizes) != flat.size:
            raise ValueError(f"layer_sizes sum to {sum(sizes)}, but moving has {flat.size} rows")
        bounds = np.cumsum([0] + sizes)
        masks = [flat[bounds[i] : bounds[i + 1]] for i in range(len(sizes))]
    else:
        masks = [m.reshape(-1).cpu().numpy() for m in moving]
        bounds = np.cumsum([0] + [m.size for m in masks])
    counts = [int(np.count_nonzero(m)) for m in masks]
    n_moving, n = sum(counts), int(bounds[-1])
    if n_moving <= k:
        return torch.from_numpy(np.concatenate([np.flatnonzero(m) + off for m, off in zip(masks, bounds)] or
                                               [np.zeros(0, dtype=np.int64)]).astype(np.int64))
    chosen = np.zeros(0, dtype=np.int64)
    n_layers = len(masks)
    if k // 2 > n_layers:
        per_layer = k // (2 * n_layers)
        picks = []
        for mask, off, count in zip(masks, bounds, counts):
            take = min(per_layer, count)
            if take:
                picks.append(_nth_moving(mask, rng.choice(count, size=take, replace=False)) + off)
        if picks:
            chosen = np.concatenate(picks)
    # The rest uniformly over the moving weights not yet chosen.
    need = k - chosen.size
    if n_moving * 8 < n:
        # Few movers: listing them costs less than a mask of all N rows.
        pool = np.setdiff1d(np.concatenate([np.flatnonzero(m) + off for m, off in zip(masks, bounds)]), chosen)
        extra = rng.choice(pool, size=need, replace=False)
    else:
        # Rejection sampling keeps memory at O(k) instead of listing ~N candidates.
        extra = np.zeros(0, dtype=np.int64)
        taken = np.sort(chosen)
        while extra.size < need:
            draw = rng.integers(0, n, size=2 * (need - extra.size) + 64)
            draw = draw[_moves(masks, bounds, draw) & ~_member(draw, taken)]
            _, first = np.unique(draw, return_index=True)
            draw = draw[np.sort(first)][: need - extra.size]  # keep draw order: distinct, unbiased
            taken = np.union1d(taken, draw)
            extra = np.concatenate([extra, draw])
    out = np.concatenate([chosen, extra.astype(np.int64)])
    out.sort()
    return torch.from_numpy(out)


def _nth_moving(mask: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """Positions of the ``ranks``-th True entries of ``mask`` (0-based, any order), chunk by chunk."""
    order = np.argsort(ranks, kind="stable")
    wanted = ranks[order]
    out = np.empty(ranks.size, dtype=np.int64)
    seen, j = 0, 0
    for c0 in range(0, mask.size, _CHUNK):
        if j == wanted.size:
            break
        counts = np.cumsum(mask[c0 : c0 + _CHUNK], dtype=np.int64)
        hi = int(np.searchsorted(wanted, seen + int(counts[-1]), side="left"))
        if hi > j:  # the first position whose running count passes each rank
            out[order[j:hi]] = c0 + np.searchsorted(counts, wanted[j:hi] - seen + 1, side="left")
            j = hi
        seen += int(counts[-1])
    return out


def _moves(masks: list[np.ndarray], bounds: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Whether each of the (global) ``rows`` moves."""
    layer = np.searchsorted(bounds, rows, side="right") - 1
    out = np.empty(rows.size, dtype=bool)
    for i in np.unique(layer):
        sel = layer == i
        out[sel] = masks[i][rows[sel] - bounds[i]]
    return out


def _member(rows: np.ndarray, taken_sorted: np.ndarray) -> np.ndarray:
    """Whether each of ``rows`` is in the sorted array ``taken_sorted``."""
    if taken_sorted.size == 0:
        return np.zeros(rows.size, dtype=bool)
    pos = np.minimum(np.searchsorted(taken_sorted, rows), taken_sorted.size - 1)
    return taken_sorted[pos] == rows
