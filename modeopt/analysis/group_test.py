"""Whether two *conditions* have the same dynamics, from several runs (seeds) of each.

:func:`~modeopt.analysis.compare_dynamics` judges two single runs against a null made of the runs'
own windows; that null needs long runs and fails when a run's windows differ as much as two runs do
(docs/koopman.md, the width and conjugacy studies). With several independent runs per condition the
stronger design is a permutation test over runs: if the condition makes no difference, the runs are
exchangeable, so every split of the pooled runs into two groups of the original sizes is as likely
as the observed one.

Statistic: the mean W1 distance between runs of different groups minus the mean W1 distance between
runs of the same group (both groups' within pairs pooled). ``p`` is the share of splits whose
statistic is at least the observed one: exact over every split when there are at most
``max_splits`` of them, else estimated from ``max_splits`` random splits (seeded) as
``(1 + #{>=}) / (1 + n)``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from modeopt.utils.checks import check_int
from .koopman import KoopmanSpectrum
from .spectrum_matching import spectrum_distance

__all__ = ["GroupComparison", "compare_groups"]


@dataclass
class GroupComparison:
    """The result of :func:`compare_groups`.

    Attributes:
        statistic: mean between-group W1 minus mean within-group W1 (positive: groups farther apart
            than runs of one group are from each other).
        p_value: share of splits of the pooled runs with a statistic at least ``statistic``.
        between, within: the two means the statistic is made of.
        distances: ``(n_a + n_b, n_a + n_b)`` W1 distances between all runs (group A first).
        n_splits: splits the null was formed from; ``exact`` whether that was every split.
        labels: names of the two groups; ``n_a`` the number of runs of group A.
    """

    statistic: float
    p_value: float
    between: float
    within: float
    distances: np.ndarray = field(repr=False)
    n_splits: int = 0
    exact: bool = True
    labels: tuple[str, str] = ("A", "B")
    n_a: int = 0

    @property
    def min_p_value(self) -> float:
        """The smallest p this design can give: exact, the observed split and (for equal group sizes) its
        mirror image among all splits; sampled, ``1 / (1 + n)``."""
        if not self.exact:
            return 1.0 / (1 + self.n_splits)
        n_a, n = self.group_sizes[0], sum(self.group_sizes)
        return (2 if 2 * n_a == n else 1) / self.n_splits

    @property
    def group_sizes(self) -> tuple[int, int]:
        """``(n_a, n_b)``, the number of runs of each group."""
        n_a = self.n_a
        return n_a, self.distances.shape[0] - n_a


def _statistic(d: np.ndarray, in_a: np.ndarray) -> tuple[float, float, float]:
    """``(between - within, between, within)`` for the split ``in_a`` (bool, True = group A)."""
    same = in_a[:, None] == in_a[None, :]
    upper = np.triu(np.ones_like(same), k=1)
    between = float(d[~same & upper].mean())
    within = float(d[same & upper].mean())
    return between - within, between, within


def compare_groups(runs_a: Sequence, runs_b: Sequence, *, max_splits: int = 20_000, seed: int = 0,
                   labels: tuple[str, str] = ("A", "B")) -> GroupComparison:
    """Do the runs of condition A and of condition B follow the same dynamics? (module doc)

    Args:
        runs_a, runs_b: at least two runs each, as :class:`KoopmanSpectrum` objects (computed with the
            same observable, delays and ``rank``) or 1-D complex eigenvalue arrays of equal size.
        max_splits: enumerate every split when there are at most this many, else sample this many.
        seed: seed of the sampled splits.
        labels: names of the two groups.

    Raises:
        ValueError: fewer than two runs in a group; spectra that :func:`spectrum_distance` refuses
            (other observable, delays or size).
    """
    check_int("max_splits", max_splits, 1)
    runs = list(runs_a) + list(runs_b)
    n_a, n = len(runs_a), len(runs)
    if n_a < 2 or n - n_a < 2:
        raise ValueError(f"compare_groups needs at least two runs per group (got {n_a} and {n - n_a}): with one "
                         "run of a condition there is no within-group distance; use compare_dynamics for two runs")
    for i, r in enumerate(runs):
        if not isinstance(r, KoopmanSpectrum) and np.asarray(r).ndim != 1:
            raise ValueError(f"run {i} must be a KoopmanSpectrum or a 1-D eigenvalue array, got {type(r).__name__}")
    d = np.zeros((n, n))
    for i, j in itertools.combinations(range(n), 2):
        d[i, j] = d[j, i] = spectrum_distance(runs[i], runs[j])[0]
    observed = np.arange(n) < n_a
    stat, between, within = _statistic(d, observed)
    total = math.comb(n, n_a)
    if total <= max_splits:
        null = [_statistic(d, np.isin(np.arange(n), g))[0] for g in itertools.combinations(range(n), n_a)]
        p, splits, exact = float(np.mean(np.asarray(null) >= stat - 1e-12)), total, True
    else:
        rng = np.random.default_rng(seed)
        null = [_statistic(d, np.isin(np.arange(n), rng.permutation(n)[:n_a]))[0] for _ in range(max_splits)]
        p = float((1 + np.sum(np.asarray(null) >= stat - 1e-12)) / (1 + max_splits))
        splits, exact = max_splits, False
    return GroupComparison(statistic=stat, p_value=p, between=between, within=within, distances=d,
                           n_splits=splits, exact=exact, labels=labels, n_a=n_a)
