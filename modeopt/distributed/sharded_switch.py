"""The switch to mode space when each rank holds only its shards of the recording (FSDP2).

:func:`decompose_shards` computes, on every rank, what :func:`~modeopt.decompose` computes on the
whole recording in one process, but for this rank's rows only:

1. each rank scans its rows for the ones that move; the ``(N,)`` moving mask is all-gathered (N
   bytes, once) so that :func:`~modeopt.decomposition.sampling.sample_weights` draws, from the same seed, exactly
   the rows a single process would draw;
2. each rank fills in the sampled rows it holds and one all-reduce of the ``(K, T)`` float64
   profiles (zeros elsewhere: the sum is exact) gives every rank the same samples, so every rank
   clusters them identically (:func:`~modeopt.decomposition.clustering.cluster_samples`) and knows the M
   reference trajectories;
3. each rank assigns and fits its own rows (:func:`~modeopt.decomposition.algorithm.assign_and_fit`); an
   all-reduce of the M mode sizes numbers the modes as :func:`~modeopt.decompose` does.

:func:`shard_mode_space` then normalises ``a`` per mode (all-reduce of 2M float64 sums) and reads
the references' current values (all-reduce of M float64), as :func:`~modeopt.modespace.switch.initial_mode_space`.
No rank ever holds more than its shard of ``a``, the labels or the recording.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from modeopt.utils.chunking import ASSIGN_CHUNK_ELEMENTS
from modeopt.decomposition.clustering import cluster_samples
from modeopt.decomposition.algorithm import NOTHING_MOVED, assign_and_fit, mode_order, scan_moving
from modeopt.decomposition.sampling import sample_weights
from .sharding import ShardMap
from modeopt.trajectories.trajectory import Trajectory

__all__ = ["ShardDecomposition", "decompose_shards", "ShardModeSpace", "shard_mode_space"]


@dataclass
class ShardDecomposition:
    """One rank's part of a CMD decomposition: its rows' modes and fit, and the shared references.

    Attributes:
        labels, a, b: ``(n_local,)`` mode (int64), affine coefficients (float32) of this rank's rows.
        constant: ``(n_local,)`` bool, rows that did not move.
        reference: ``(M,)`` int64 global rows of the references (same on every rank).
        profiles: ``(M, T)`` float64 reference trajectories (same on every rank).
        samples: ``(K,)`` int64 global rows that were clustered (same on every rank).
        sizes: ``(M,)`` int64 moving weights in each mode, over all ranks.
    """

    labels: Tensor
    a: Tensor
    b: Tensor
    constant: Tensor
    reference: Tensor
    profiles: Tensor
    samples: Tensor
    sizes: Tensor

    @property
    def n_modes(self) -> int:
        """M."""
        return int(self.reference.numel())


def decompose_shards(trajectory: Trajectory, shards: ShardMap, layer_numels: list[int], *, n_modes: int,
                     n_samples: int, seed: int, progress: bool | None = None) -> ShardDecomposition:
    """CMD of the recording of this rank's rows (``trajectory``, ``(T, n_local)``), jointly with the
    other ranks (collective: every rank of ``shards.group`` calls it with the same arguments).

    ``layer_numels`` are the embedded tensors' global sizes (the sampling spreads half of K over them).
    """
    t, n_local = trajectory.data.shape
    if t < 3:
        raise ValueError(f"trajectory has T={t} time samples; CMD needs at least 3: record more snapshots")
    cpu = torch.device("cpu")
    moving_local = scan_moving(trajectory, cpu, progress=progress)
    moving = shards.gather_rows(moving_local.to(torch.uint8)).bool()
    if not bool(moving.any()):
        raise ValueError(NOTHING_MOVED)
    samples = sample_weights(moving, layer_numels, int(n_samples), np.random.default_rng(seed))
    del moving
    k = samples.numel()
    if n_modes > k:
        raise ValueError(f"n_modes={n_modes} > the {k} weights that move and could be sampled: ask for at most {k} modes")
    owned, local_rows = shards.to_local(samples)  # samples are sorted: so are local_rows
    prof = torch.zeros(k, t, dtype=torch.float64)
    if local_rows.numel():
        prof[owned] = trajectory.take(local_rows, torch.float64)
    prof = shards.all_reduce(prof)  # exact: each row is nonzero on one rank only
    clustering = cluster_samples(prof, n_modes=n_modes)
    m = clustering.n_modes
    reference = samples[clustering.reference]
    profiles = prof[clustering.reference]
    chunk = max(1024, ASSIGN_CHUNK_ELEMENTS // (t + m))  # as decompose() on the CPU
    bounds = [(i, min(i + chunk, n_local)) for i in range(0, n_local, chunk)]
    labels, a, b, _ = assign_and_fit(trajectory, profiles, local_rows, clustering.labels[owned], moving_local,
                                     bounds, progress=progress, device=cpu)
    sizes = torch.bincount(labels[moving_local], minlength=m)
    sizes = shards.all_reduce(sizes)
    order = mode_order(sizes, reference)
    relabel = torch.empty(m, dtype=torch.int64)
    relabel[order] = torch.arange(m)
    labels = relabel[labels]
    labels.masked_fill_(~moving_local, 0)
    reference, profiles = reference[order], profiles[order]
    ref_owned, ref_local = shards.to_local(reference)
    a[ref_local], b[ref_local] = 1.0, 0.0
    return ShardDecomposition(labels=labels, a=a, b=b, constant=~moving_local, reference=reference,
                              profiles=profiles, samples=samples, sizes=sizes[order])


@dataclass
class ShardModeSpace:
    """This rank's initial mode space: normalised ``a`` and labels of its rows, and the shared ``r``.

    Attributes:
        labels: ``(n_local,)`` int64. a: ``(n_local,)`` float32, ``a / scale[label]``.
        r: ``(M,)`` float32 initial mode scalars; r_groups: ``(M,)`` int64 param group of each.
        reference_values: ``(M,)`` float64 each reference weight now. scale: ``(M,)`` float64.
    """

    labels: Tensor
    a: Tensor
    r: Tensor
    r_groups: Tensor
    reference_values: Tensor
    scale: Tensor


def shard_mode_space(d: ShardDecomposition, shards: ShardMap, row_group: Tensor, n_groups: int,
                     mode_scale: str) -> ShardModeSpace:
    """:func:`~modeopt.modespace.switch.initial_mode_space` for this rank's rows (collective).

    ``row_group``: ``(n_local,)`` int64, the param group of each local row.
    """
    m = d.n_modes
    views = shards.local_views()
    current = torch.cat([x.to(torch.float64) for x in views]).cpu() if views else torch.zeros(0, dtype=torch.float64)
    owned, local = shards.to_local(d.reference)
    ref_now = torch.zeros(m, dtype=torch.float64)
    ref_now[owned] = current[local]
    moving = ~d.constant
    stats = torch.cat([ref_now,
                       torch.bincount(d.labels, weights=d.a.to(torch.float64) ** 2, minlength=m),
                       torch.bincount(d.labels[moving], minlength=m).to(torch.float64),
                       torch.bincount(d.labels[moving] * n_groups + row_group[moving],
                                      minlength=m * n_groups).to(torch.float64)])
    stats = shards.all_reduce(stats)
    ref_now, sq, count, votes = stats[:m], stats[m : 2 * m], stats[2 * m : 3 * m].clamp(min=1), stats[3 * m :]
    scale = (sq / count).sqrt() if mode_scale == "rms" else sq.sqrt()
    a_scaled = d.a / scale.to(torch.float32)[d.labels]
    r_groups = votes.view(m, n_groups).argmax(dim=1)
    return ShardModeSpace(labels=d.labels, a=a_scaled, r=(ref_now * scale).to(torch.float32), r_groups=r_groups,
                          reference_values=ref_now, scale=scale)
