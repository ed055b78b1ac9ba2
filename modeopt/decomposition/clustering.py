"""Clustering the sampled weights into modes (CMD paper, Algorithm 1 steps 2-4).

Distance ``1 - |corr|`` between centred profiles, complete ("farthest point") linkage, cut to
M clusters (``maxclust``) or at a cophenetic distance ``t`` (``distance``). Each mode's
reference weight is the member with the largest summed ``|corr|`` to its mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform
from torch import Tensor

__all__ = ["SampleClustering", "cluster_samples", "centred_unit"]


def centred_unit(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Centre rows over time and scale them to unit norm.

    Args:
        x: ``(n, T)`` float64 profiles.
    Returns:
        ``(unit, mean, norm)``: ``(n, T)`` unit-norm centred rows (zero rows stay zero),
        ``(n,)`` means, ``(n,)`` centred norms.
    """
    mean = x.mean(dim=1)
    xc = x - mean[:, None]
    norm = torch.linalg.vector_norm(xc, dim=1)
    unit = xc / torch.where(norm > 0, norm, torch.ones_like(norm))[:, None]
    return unit, mean, norm


@dataclass
class SampleClustering:
    """The clustering of the K sampled weights.

    Attributes:
        labels: ``(K,)`` int64 mode of each sample, ``0..M-1``.
        reference: ``(M,)`` int64 position (within the samples) of each mode's reference.
        corr: ``(K, K)`` float64 signed centred correlation of the samples.
        linkage: ``(K-1, 4)`` scipy linkage matrix (complete linkage on ``1 - |corr|``).
    """

    labels: Tensor
    reference: Tensor
    corr: Tensor
    linkage: np.ndarray

    @property
    def n_modes(self) -> int:
        """M, the number of clusters (one reference each)."""
        return int(self.reference.numel())


def cluster_samples(
    profiles: Tensor, *, n_modes: int | None = None, threshold: float | None = None
) -> SampleClustering:
    """Cluster sampled profiles by correlation.

    Args:
        profiles: ``(K, T)`` float64, every row non-constant.
        n_modes: cut the dendrogram into at most this many modes, or
        threshold: cut it so no two members of a mode are farther than ``threshold`` apart.

    Modes are numbered by decreasing number of members (ties: by reference position).
    """
    unit, _, norm = centred_unit(profiles)
    corr = (unit @ unit.T).clamp_(-1.0, 1.0)
    dist = 1.0 - corr.abs()
    dist.fill_diagonal_(0.0)
    dist = 0.5 * (dist + dist.T)  # exact symmetry for squareform
    k = profiles.shape[0]
    if k == 1:
        z = np.zeros((0, 4))
        raw = np.ones(1, dtype=np.int64)
    else:
        z = linkage(squareform(dist.numpy(), checks=False), method="complete")
        if n_modes is not None:
            raw = fcluster(z, t=n_modes, criterion="maxclust")
        else:
            raw = fcluster(z, t=threshold, criterion="distance")
    raw = torch.from_numpy(raw.astype(np.int64)) - 1
    m = int(raw.max()) + 1
    abs_corr = corr.abs()
    # Reference: largest summed |corr| within the mode. Exact ties (e.g. several members with
    # |corr| = 1 to everyone) go to the member that moves most, whose profile carries the
    # least relative rounding noise.
    same = raw[:, None] == raw[None, :]
    score = (abs_corr * same).sum(dim=1)
    refs = []
    for mode in range(m):
        members = torch.nonzero(raw == mode).flatten()
        s = score[members]
        best = s.max()
        tied = members[s >= best - 1e-9 * best.abs().clamp(min=1.0)]
        refs.append(int(tied[norm[tied].argmax()]))
    refs_t = torch.tensor(refs, dtype=torch.int64)
    sizes = torch.bincount(raw, minlength=m)
    order = sorted(range(m), key=lambda j: (-int(sizes[j]), refs[j]))
    relabel = torch.empty(m, dtype=torch.int64)
    relabel[torch.tensor(order)] = torch.arange(m)
    return SampleClustering(
        labels=relabel[raw], reference=refs_t[torch.tensor(order)], corr=corr, linkage=z
    )
