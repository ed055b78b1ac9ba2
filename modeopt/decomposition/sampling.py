"""Choosing the K weights whose correlations are clustered (CMD paper, appendix 8.2).

Half the budget is spread evenly over the layers (``K / (2 * n_layers)`` each), the other half
uniformly over all weights; when ``K / 2 <= n_layers`` all K are drawn uniformly. Only weights
that move are eligible: a constant profile has no defined correlation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["sample_weights"]


def sample_weights(
    moving: Tensor, layer_sizes: Sequence[int], k: int, rng: np.random.Generator
) -> Tensor:
    """Pick up to ``k`` distinct rows among the moving ones.

    Args:
        moving: ``(N,)`` bool, which rows are eligible.
        layer_sizes: number of rows of each layer, in order (they sum to N).
        k: sample budget.
        rng: the random source (pass a seeded generator for reproducibility).

    Returns:
        Sorted int64 row indices, ``min(k, moving.sum())`` of them.
    """
    n_moving = int(moving.sum())
    if n_moving <= k:
        return torch.nonzero(moving).flatten()
    chosen = np.zeros(0, dtype=np.int64)
    n_layers = len(layer_sizes)
    if k // 2 > n_layers:
        per_layer = k // (2 * n_layers)
        picks = []
        offset = 0
        for size in layer_sizes:
            rows = torch.nonzero(moving[offset : offset + size]).flatten().numpy() + offset
            take = min(per_layer, rows.size)
            if take:
                picks.append(rng.choice(rows, size=take, replace=False))
            offset += size
        if picks:
            chosen = np.concatenate(picks)
    # The rest uniformly over the moving weights not yet chosen.
    mask = moving.numpy().copy()
    mask[chosen] = False
    n = mask.size
    need = k - chosen.size
    if n_moving * 8 < n:
        # Few movers: listing them costs less than the N-byte mask already held.
        pool = np.flatnonzero(mask)
        extra = rng.choice(pool, size=need, replace=False)
    else:
        # Rejection sampling keeps memory at O(k) instead of listing ~N candidates.
        extra = np.zeros(0, dtype=np.int64)
        while extra.size < need:
            draw = rng.integers(0, n, size=2 * (need - extra.size) + 64)
            draw = draw[mask[draw]]
            _, first = np.unique(draw, return_index=True)
            draw = draw[np.sort(first)][: need - extra.size]  # keep draw order: distinct, unbiased
            mask[draw] = False
            extra = np.concatenate([extra, draw])
    out = np.concatenate([chosen, extra.astype(np.int64)])
    out.sort()
    return torch.from_numpy(out)
