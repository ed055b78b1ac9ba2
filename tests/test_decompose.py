"""The decomposition engine on planted modes, its edge cases and its error messages."""

import math

import numpy as np
import pytest
import torch

import modeopt
from modeopt import ParamLayout, Trajectory, decompose
from modeopt.decomposition.sampling import sample_weights

from conftest import planted_trajectory, same_partition


@pytest.mark.parametrize("m", [1, 3, 7])
def test_recovers_planted_partition_and_reconstructs(m):
    w, labels, a, b, _ = planted_trajectory(n=20_000, t=30, m=m, noise=1e-4, seed=m)
    d = decompose(w, n_modes=m, seed=0)
    assert d.n_modes == m
    assert same_partition(d.labels, labels)
    rel = float((d.reconstruct() - w).norm() / w.norm())
    assert rel < 2e-4, rel  # the planted noise is 1e-4 of the signal
    # the fitted coefficients are the planted ones, up to each mode's scale and offset
    for mode in range(m):
        idx = torch.nonzero(d.labels == mode).flatten()
        ratio = d.a[idx].double() / a[idx]
        assert float(ratio.std() / ratio.abs().mean()) < 1e-3


def test_threshold_finds_the_number_of_modes():
    w, labels, *_ = planted_trajectory(n=10_000, t=25, m=4, noise=1e-3, seed=3)
    d = decompose(w, threshold=0.5, seed=1)
    assert d.n_modes == 4
    assert same_partition(d.labels, labels)
    # a threshold of 1 or more can only give a single mode
    assert decompose(w, threshold=1.0, seed=1).n_modes == 1


def test_references_are_members_with_unit_fit():
    w, *_ = planted_trajectory(n=5_000, t=20, m=3, seed=4)
    d = decompose(w, n_modes=3, seed=0)
    assert torch.equal(d.labels[d.reference], torch.arange(3))
    assert torch.all(d.a[d.reference] == 1) and torch.all(d.b[d.reference] == 0)
    assert torch.allclose(d.profiles, w[d.reference].double())
    # modes are numbered by decreasing size
    assert torch.all(d.sizes[:-1] >= d.sizes[1:])
    assert int(d.sizes.sum()) == 5_000


def test_anticorrelated_weights_join_their_mode_with_negative_a():
    w, labels, a, *_ = planted_trajectory(n=4_000, t=20, m=2, seed=5)
    d = decompose(w, n_modes=2, seed=0)
    ref_sign = torch.sign(a[d.reference])
    for mode in range(2):
        idx = torch.nonzero(d.labels == mode).flatten()
        assert torch.equal(torch.sign(d.a[idx]).double(), torch.sign(a[idx]) * ref_sign[mode])


def test_constant_weights_get_an_exact_fit_and_no_nan():
    w, *_ = planted_trajectory(n=3_000, t=12, m=2, seed=6)
    w[:500] = torch.linspace(-1, 1, 500)[:, None]  # never move
    w[500] = 0.0
    d = decompose(w, n_modes=2, seed=0)
    assert torch.all(d.constant[:501]) and not torch.any(d.constant[501:])
    assert torch.all(d.a[:501] == 0)
    assert torch.equal(d.b[:501], w[:501, 0])
    rec = d.reconstruct()
    assert torch.isfinite(rec).all() and torch.isfinite(d.a).all() and torch.isfinite(d.b).all()
    assert torch.equal(rec[:501], w[:501])
    assert not bool(d.constant[d.samples].any())  # constants are never sampled
    assert int(d.sizes.sum()) == 3_000 - 501


def test_rounding_noise_counts_as_constant():
    w, *_ = planted_trajectory(n=1_000, t=10, m=2, seed=7)
    base = torch.full((10,), 0.37)
    base[3] = torch.nextafter(base[3], torch.tensor(1.0))  # one ulp of jitter
    w[0] = base
    d = decompose(w, n_modes=2, seed=0)
    assert bool(d.constant[0]) and float(d.a[0]) == 0.0


def test_seed_makes_it_deterministic():
    w, *_ = planted_trajectory(n=8_000, t=15, m=4, noise=1e-2, seed=8)
    d1, d2 = decompose(w, n_modes=4, seed=11), decompose(w, n_modes=4, seed=11)
    assert torch.equal(d1.samples, d2.samples) and torch.equal(d1.labels, d2.labels)
    assert torch.equal(d1.a, d2.a) and torch.equal(d1.b, d2.b)
    d3 = decompose(w, n_modes=4, seed=12)
    assert not torch.equal(d1.samples, d3.samples)


def test_numpy_and_memmap_input(tmp_path):
    w, labels, *_ = planted_trajectory(n=6_000, t=16, m=3, seed=9)
    d_np = decompose(w.numpy(), n_modes=3, seed=0)
    assert same_partition(d_np.labels, labels)
    mm = np.lib.format.open_memmap(tmp_path / "w.npy", mode="w+", dtype=np.float32, shape=tuple(w.shape))
    mm[:] = w.numpy()
    mm.flush()
    d_mm = decompose(np.load(tmp_path / "w.npy", mmap_mode="r"), n_modes=3, seed=0)
    assert torch.equal(d_mm.labels, d_np.labels) and torch.equal(d_mm.a, d_np.a)


def test_chunking_does_not_change_the_result(monkeypatch):
    w, *_ = planted_trajectory(n=9_000, t=16, m=3, noise=1e-2, seed=10)
    whole = decompose(w, n_modes=3, seed=0)
    import modeopt.decomposition.algorithm as dec

    monkeypatch.setattr(dec, "CHUNK_ELEMENTS", 1024 * 16)  # 1024-row chunks
    chunked = decompose(w, n_modes=3, seed=0)
    assert torch.equal(whole.labels, chunked.labels)
    assert torch.equal(whole.a, chunked.a) and torch.equal(whole.b, chunked.b)


def test_reconstruct_at_one_sample_matches_the_full_reconstruction():
    w, *_ = planted_trajectory(n=2_000, t=10, m=2, seed=11)
    d = decompose(w, n_modes=2, seed=0)
    full = d.reconstruct()
    assert torch.allclose(d.reconstruct(-1), full[:, -1]) and torch.allclose(d.reconstruct(3), full[:, 3])


def test_state_dict_round_trip_is_weights_only_safe(tmp_path):
    w, *_ = planted_trajectory(n=2_000, t=10, m=2, seed=12)
    layout = ParamLayout(["x", "y"], [(1000,), (20, 50)])
    d = decompose(Trajectory.from_matrix(w, layout), n_modes=2, seed=0)
    torch.save(d.state_dict(), tmp_path / "d.pt")
    d2 = modeopt.Decomposition.from_state_dict(torch.load(tmp_path / "d.pt", weights_only=True))
    assert torch.equal(d2.reconstruct(), d.reconstruct()) and d2.layout == layout


# ---------------------------------------------------------------- sampling
def test_sampling_covers_every_layer_and_skips_constants():
    sizes = [10, 50_000, 7, 300, 20_000]
    moving = torch.ones(sum(sizes), dtype=torch.bool)
    moving[:5] = False  # half of the first layer never moves
    rng = np.random.default_rng(0)
    s = sample_weights(moving, sizes, 1000, rng)
    assert s.numel() == 1000 and torch.unique(s).numel() == 1000
    assert torch.all(moving[s])
    bounds = np.cumsum([0] + sizes)
    per_layer = np.histogram(s.numpy(), bins=bounds)[0]
    # K/(2 * 5 layers) = 100 per layer where available, the tiny layers give all their movers
    assert per_layer.tolist()[0] == 5 and per_layer[2] == 7 and per_layer[3] >= 100
    assert per_layer.sum() == 1000


def test_sampling_uniform_when_layers_outnumber_half_the_budget():
    sizes = [3] * 400
    moving = torch.ones(1200, dtype=torch.bool)
    s = sample_weights(moving, sizes, 600, np.random.default_rng(0))
    assert s.numel() == 600 and torch.unique(s).numel() == 600


def test_sampling_with_few_movers_takes_them_from_the_list():
    moving = torch.zeros(1_000_000, dtype=torch.bool)
    moving[torch.randperm(1_000_000)[:2_000]] = True
    s = sample_weights(moving, [1_000_000], 1_000, np.random.default_rng(0))
    assert s.numel() == 1_000 and torch.all(moving[s]) and torch.unique(s).numel() == 1_000


def test_trajectory_layers_are_all_represented():
    w, *_ = planted_trajectory(n=30_000, t=10, m=3, seed=13)
    layout = ParamLayout([f"t{i}" for i in range(6)], [(5_000,)] * 6)
    d = decompose(Trajectory.from_matrix(w, layout), n_modes=3, n_samples=600, seed=0)
    per_layer = torch.bincount(d.samples // 5_000, minlength=6)
    assert torch.all(per_layer >= 50)  # 600 / (2 * 6)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "give exactly one of n_modes=M or threshold=t, got neither"),
        ({"n_modes": 3, "threshold": 0.5}, "got both"),
        ({"n_modes": 0}, "n_modes must be an integer >= 1, got 0"),
        ({"n_modes": 2.5}, "n_modes must be an integer >= 1"),
        ({"threshold": -0.1}, "threshold must be a finite number >= 0"),
        ({"threshold": math.nan}, "threshold must be a finite number >= 0"),
        ({"n_modes": 50, "n_samples": 40}, "n_modes=50 > n_samples=40"),
        ({"n_modes": 2, "n_samples": 0}, "n_samples must be an integer >= 1"),
    ],
)
def test_bad_arguments_say_what_to_do(kwargs, message):
    w, *_ = planted_trajectory(n=500, t=8, m=2)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        decompose(w, **kwargs)


def test_more_modes_than_moving_weights():
    w = torch.zeros(100, 5)
    w[:4] = torch.randn(4, 5)
    with pytest.raises(ValueError, match=r"n_modes=5 > the 4 weights that move and could be sampled"):
        decompose(w, n_modes=5)


def test_too_few_time_samples():
    with pytest.raises(ValueError, match=r"T=2 time samples; CMD needs at least 3"):
        decompose(torch.randn(100, 2), n_modes=2)


def test_nan_names_the_parameter_and_sample():
    w, *_ = planted_trajectory(n=3_000, t=8, m=2)
    layout = ParamLayout(["encoder.weight", "head.bias"], [(2_000,), (1_000,)])
    w[2_417, 5] = float("inf")
    with pytest.raises(ValueError, match=r"NaN/inf in parameter 'head.bias' at index \(417,\), sample 5"):
        decompose(Trajectory.from_matrix(w, layout), n_modes=2)
    w[2_417, 5] = 0.0
    w[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"NaN/inf in row 3, sample 1"):
        decompose(w, n_modes=2)


def test_non_floating_and_empty_and_constant_inputs():
    with pytest.raises(ValueError, match=r"floating-point values, got torch.int64: cast it with .float\(\)"):
        decompose(torch.ones(10, 5, dtype=torch.int64), n_modes=1)
    with pytest.raises(ValueError, match=r"floating point, got numpy dtype int32"):
        decompose(np.ones((10, 5), dtype=np.int32), n_modes=1)
    with pytest.raises(ValueError, match=r"empty trajectory"):
        decompose(torch.zeros(0, 5), n_modes=1)
    with pytest.raises(ValueError, match=r"every weight is constant"):
        decompose(torch.ones(10, 5), n_modes=1)
    with pytest.raises(ValueError, match=r"2-D \(N, T\) matrix"):
        decompose(torch.ones(10), n_modes=1)
