"""compare_groups: a permutation test over runs, checked on answers known by construction."""

from __future__ import annotations

import math

import numpy as np
import pytest

from modeopt import Trajectory
from modeopt.analysis import compare_groups, koopman_spectrum


def _eigs(center: complex, seed: int, spread: float = 0.002, r: int = 4) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.array([center, np.conj(center), 0.9 * center, 0.9 * np.conj(center)])[:r]
    return base + spread * (rng.standard_normal(r) + 1j * rng.standard_normal(r))


def test_separated_groups_reach_the_smallest_p_of_the_design():
    a = [_eigs(0.95 * np.exp(0.10j), s) for s in range(5)]
    b = [_eigs(0.95 * np.exp(0.20j), s + 10) for s in range(5)]
    res = compare_groups(a, b)
    assert res.exact and res.n_splits == math.comb(10, 5) == 252
    # the observed split and its mirror are the two most extreme of the 252: p = 2/252 (the study's 0.008)
    assert res.p_value == pytest.approx(2 / 252) == res.min_p_value
    assert res.between > 5 * res.within and res.statistic == pytest.approx(res.between - res.within)
    assert res.distances.shape == (10, 10) and np.allclose(res.distances, res.distances.T)


def test_one_condition_split_in_two_is_not_significant():
    runs = [_eigs(0.95 * np.exp(0.10j), s, spread=0.01) for s in range(12)]
    ps = [compare_groups(runs[:k], runs[k:2 * k] if 2 * k <= 12 else runs[k:]).p_value for k in (3, 4, 6)]
    assert all(p > 0.05 for p in ps), ps


def test_unequal_groups_and_sampled_null():
    a = [_eigs(0.9 * np.exp(0.05j), s) for s in range(3)]
    b = [_eigs(0.9 * np.exp(0.30j), s + 20) for s in range(4)]
    exact = compare_groups(a, b)
    assert exact.n_splits == 35 and exact.p_value == pytest.approx(1 / 35) == exact.min_p_value
    # more splits than max_splits: sampled, p = (1 + #{>=}) / (1 + n), near the exact p
    a6 = [_eigs(0.9 * np.exp(0.05j), s) for s in range(6)]
    b6 = [_eigs(0.9 * np.exp(0.30j), s + 20) for s in range(6)]
    exact6 = compare_groups(a6, b6)
    sampled = compare_groups(a6, b6, max_splits=300, seed=1)
    assert exact6.exact and exact6.n_splits == 924 and exact6.p_value == pytest.approx(2 / 924)
    assert not sampled.exact and sampled.n_splits == 300 and sampled.min_p_value == pytest.approx(1 / 301)
    k = sampled.p_value * 301 - 1
    assert abs(k - round(k)) < 1e-9 and 0 <= round(k) <= 6  # ~300 * 2/924 = 0.65 splits expected as extreme


def test_real_spectra_of_two_linear_systems():
    """Runs of x_{t+1} = A x_t (+ noise) with two different rotation speeds, 3 seeds each."""
    def run(theta: float, seed: int) -> Trajectory:
        rng = np.random.default_rng(seed)
        rot = 0.97 * np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        mix = rng.standard_normal((40, 2))
        x, xs = rng.standard_normal(2), []
        for _ in range(120):
            xs.append(mix @ x + 1e-4 * rng.standard_normal(40))
            x = rot @ x
        return Trajectory.from_matrix(np.stack(xs, 1).astype(np.float64))

    spec = lambda tr: koopman_spectrum(tr, observable="raw", delays=2, rank=2)  # noqa: E731
    slow = [spec(run(0.1, s)) for s in range(3)]
    fast = [spec(run(0.3, s + 5)) for s in range(3)]
    res = compare_groups(slow, fast, labels=("0.1 rad/step", "0.3 rad/step"))
    assert res.p_value == pytest.approx(res.min_p_value) == pytest.approx(2 / 20)
    assert res.within < 1e-3 < 0.1 < res.between


def test_bad_input_says_what_to_do():
    one = [_eigs(0.9, 0)]
    with pytest.raises(ValueError, match="at least two runs per group .* use compare_dynamics"):
        compare_groups(one, one * 3)
    with pytest.raises(ValueError, match="different ranks"):
        compare_groups([_eigs(0.9, 0), _eigs(0.9, 1)], [_eigs(0.9, 2, r=2), _eigs(0.9, 3, r=2)])
    with pytest.raises(ValueError, match="max_splits"):
        compare_groups([_eigs(0.9, 0)] * 2, [_eigs(0.9, 1)] * 2, max_splits=0)
