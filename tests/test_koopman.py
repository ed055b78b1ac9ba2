"""Koopman spectra of runs and the comparison of two runs' dynamics (modeopt.analysis.koopman, null_test)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from modeopt import ParamLayout, Trajectory
from modeopt.analysis import (
    DynamicsComparison, KoopmanSpectrum, Recording, compare_dynamics, koopman_spectrum, spectrum_distance,
)
from modeopt.analysis.observable import observable_gram, principal_coordinates
from modeopt.cli import main as cli

#: the test system's eigenvalues, in the order a spectrum sorts them (|lambda| desc, then angle desc)
TRUE = np.array([0.95 * np.exp(0.3j), 0.95 * np.exp(-0.3j), 0.9, 0.8])
OTHER = np.array([0.85 * np.exp(0.8j), 0.85 * np.exp(-0.8j), 0.6, 0.3])


def system_matrix(eigs: np.ndarray, seed: int = 0) -> np.ndarray:
    """A real 4x4 matrix with eigenvalues (a conjugate pair, two reals), in a random basis."""
    r, th = abs(eigs[0]), np.angle(eigs[0])
    a = np.zeros((4, 4))
    a[:2, :2] = r * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    a[2, 2], a[3, 3] = eigs[2].real, eigs[3].real
    p = np.random.default_rng(seed).standard_normal((4, 4))
    return p @ a @ np.linalg.inv(p)


def linear_states(a: np.ndarray, steps: int, *, seed: int, drive: float = 0.0) -> np.ndarray:
    """``(T, 4)`` states of ``s_{t+1} = A s_t (+ drive * noise)``."""
    rng = np.random.default_rng(seed)
    s = np.zeros((steps, 4))
    s[0] = rng.standard_normal(4)
    for t in range(steps - 1):
        s[t + 1] = a @ s[t] + drive * rng.standard_normal(4)
    return s


def lifted(states: np.ndarray, n: int, *, seed: int = 99, offset: float = 5.0) -> np.ndarray:
    """The states seen through a random linear map to n 'weights', each with a large constant offset."""
    rng = np.random.default_rng(seed)
    return states @ rng.standard_normal((4, n)) + offset * rng.standard_normal(n)


# ------------------------------------------------------------------ recovery
def test_linear_system_eigenvalues_recovered():
    s = linear_states(system_matrix(TRUE), 80, seed=1)
    x = lifted(s, 3000)
    layout = ParamLayout(["fc1.weight", "fc1.bias", "fc2.weight"], [(50, 40), (990,), (10,)])
    traj = Trajectory(torch.from_numpy(x.astype(np.float64)), layout, list(range(0, 800, 10)))
    cases = {
        "pca": koopman_spectrum(traj, observable="pca", rank=4, delays=1),
        "pca, 8 delays": koopman_spectrum(traj, rank=4, delays=8),
        "pca, rank by energy": koopman_spectrum(traj, delays=4, energy=1.0),
        "raw states": koopman_spectrum(s, observable="raw", rank=4, delays=1),
        "raw weights": koopman_spectrum(x, observable="raw", rank=4, delays=2),
        "layer": koopman_spectrum(traj, observable="layer", layer="fc1", rank=4, delays=1),
    }
    for name, spec in cases.items():
        assert isinstance(spec, KoopmanSpectrum)
        assert spec.rank == 4, name
        np.testing.assert_allclose(spec.eigenvalues, TRUE, atol=1e-6, rtol=0, err_msg=name)
        assert spec.reconstruction_error < 1e-6 and spec.free_run_error < 1e-6, name
        assert spec.n_steps == 80
    pca = cases["pca"]
    assert pca.n_components == 4 and pca.explained_variance == pytest.approx(1.0)  # 6 of 10 asked are empty
    assert pca.modes.shape == (4, 4) and pca.amplitudes.shape == (4,)
    assert pca.steps[:2] == [0, 10] and "10 principal coordinates of 3,000 weights" in pca.observable
    assert "fc1.weight, fc1.bias" in cases["layer"].observable
    # the amplitudes and modes rebuild the first "after" vector's modal content: conjugate pair conjugate
    assert pca.amplitudes[0] == pytest.approx(np.conj(pca.amplitudes[1]))
    d = pca.to_dict()
    json.dumps(d)
    assert d["rank"] == 4 and len(d["eigenvalues"]) == 4


def test_translation_does_not_change_the_spectrum():
    # The affine fit: the same dynamics around another fixed point have the same eigenvalues.
    s = linear_states(system_matrix(TRUE), 60, seed=2)
    a = koopman_spectrum(s, observable="raw", rank=4, delays=2)
    b = koopman_spectrum(s + 100.0, observable="raw", rank=4, delays=2)
    np.testing.assert_allclose(a.eigenvalues, b.eigenvalues, atol=1e-9)


# ------------------------------------------------------------------ PCA by Gram
def test_pca_by_gram_equals_svd():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(30, 500, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 500, dtype=torch.float64)
    x += 1e3  # large weights, small movements: the chunks are centred before their products
    traj = Trajectory(x)
    xc = x - x.mean(0)
    gram = observable_gram(traj)
    np.testing.assert_allclose(gram, (xc @ xc.T).numpy(), rtol=1e-9, atol=1e-9)
    z, explained = principal_coordinates(traj, 6)
    u, sv, _ = torch.linalg.svd(xc, full_matrices=False)
    ref = (u[:, :6] * sv[:6]).numpy()
    ref *= np.sign(ref[np.abs(ref).argmax(0), np.arange(6)])  # the same sign convention
    np.testing.assert_allclose(z, ref, atol=1e-8 * sv[0].item())
    assert explained == pytest.approx(float((sv[:6] ** 2).sum() / (sv ** 2).sum()), rel=1e-10)


def _peak_rss_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (the peak RSS) to the current RSS
        return True
    except OSError:
        return False


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def test_scales_to_millions_of_weights_without_n_by_n():
    n, steps = 2_000_000, 50
    s = linear_states(system_matrix(TRUE), steps, seed=4)
    lift = torch.from_numpy(np.random.default_rng(5).standard_normal((4, n)).astype(np.float32))
    data = torch.empty(steps, n, dtype=torch.float16)  # 200 MB; an N x T float64 copy would be 800 MB
    for i in range(0, n, 250_000):
        data[:, i : i + 250_000] = (torch.from_numpy(s).float() @ lift[:, i : i + 250_000]).half()
    del lift
    traj = Trajectory(data)
    measured = _peak_rss_reset()
    before = _status_kb("VmRSS") if measured else 0
    t0 = time.perf_counter()
    spec = koopman_spectrum(traj, rank=4, delays=4, progress=False)
    took = time.perf_counter() - t0
    if measured:
        extra_mb = (_status_kb("VmHWM") - before) / 1024
        assert extra_mb < 150, f"{extra_mb:.0f} MB beyond the input"
    assert took < 20
    # float16 storage rounds the weights to ~1e-3 relative: the eigenvalues follow
    np.testing.assert_allclose(spec.eigenvalues, TRUE, atol=2e-2)


# ------------------------------------------------------------------ distance
def test_distance_zero_symmetric_and_hand_computed():
    s = linear_states(system_matrix(TRUE), 80, seed=1)
    spec = koopman_spectrum(s, observable="raw", rank=4, delays=1)
    d0, pairs = spectrum_distance(spec, spec)
    assert d0 == 0.0 and pairs.tolist() == [[0, 0], [1, 1], [2, 2], [3, 3]]
    # Greedy nearest-first matching would pair 1 with 0.9 (cost 0.1 + 2 = 2.1); the optimum is
    # 0 <-> 0.9, 1 <-> 2 (0.9 + 1 = 1.9), mean 0.95.
    a, b = np.array([0.0, 1.0]), np.array([0.9, 2.0])
    d, pairs = spectrum_distance(a, b)
    assert d == pytest.approx(0.95) and pairs.tolist() == [[0, 0], [1, 1]]
    assert spectrum_distance(b, a)[0] == d
    # complex: each of three eigenvalues moved by 0.1 in its own direction
    a = np.array([0.9, 0.5 + 0.5j, 0.5 - 0.5j])
    b = np.array([0.6 - 0.5j, 0.8, 0.5 + 0.4j])
    d, pairs = spectrum_distance(a, b)
    assert d == pytest.approx(0.1) and pairs.tolist() == [[0, 1], [1, 2], [2, 0]]
    assert spectrum_distance(b, a)[0] == pytest.approx(d, abs=1e-15)
    s2 = linear_states(system_matrix(OTHER), 80, seed=1)
    other = koopman_spectrum(s2, observable="raw", rank=4, delays=1)
    assert spectrum_distance(spec, other)[0] == pytest.approx(spectrum_distance(other, spec)[0], abs=1e-15)
    assert spectrum_distance(spec, other)[0] == pytest.approx(spectrum_distance(TRUE, OTHER)[0], abs=1e-6)


def _noisy_run(eigs: np.ndarray, seed: int, steps: int = 400, n: int = 200) -> torch.Tensor:
    """A stationary run: the system driven by noise, lifted to n weights, plus small measurement noise."""
    s = linear_states(system_matrix(eigs), steps, seed=seed, drive=1.0)
    x = lifted(s, n)
    x += 0.01 * np.random.default_rng(seed + 1000).standard_normal(x.shape)
    return torch.from_numpy(x)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_same_system_is_closer_and_not_significant(seed):
    a, b, c = _noisy_run(TRUE, 10 * seed), _noisy_run(TRUE, 10 * seed + 1), _noisy_run(OTHER, 10 * seed + 2)
    same = compare_dynamics(a, b, delays=8, labels=("A", "A'"))
    diff = compare_dynamics(a, c, delays=8)
    assert isinstance(same, DynamicsComparison)
    assert same.distance < diff.distance
    assert same.statistic < diff.statistic
    assert same.p_value > 0.05, same
    assert diff.p_value <= 0.05, diff
    # the null: window pairs within a run; between-run distances at the same window positions
    assert len(same.null) == len(same.between) == 200
    assert same.window == 133 and same.spectrum_a.rank == same.spectrum_b.rank == same.rank
    assert diff.p_value == pytest.approx((1 + np.count_nonzero(diff.null >= diff.statistic)) / 201)


def test_compare_is_symmetric_and_zero_on_itself():
    a, b = _noisy_run(TRUE, 0), _noisy_run(OTHER, 1)
    ab = compare_dynamics(a, b, delays=4, rank=6, n_null=60)
    ba = compare_dynamics(b, a, delays=4, rank=6, n_null=60)
    assert ab.distance == pytest.approx(ba.distance, abs=1e-12)
    aa = compare_dynamics(a, a, delays=4, rank=6, n_null=60)
    assert aa.distance == 0.0
    np.testing.assert_allclose(np.sort(aa.null), np.sort(aa.between))  # a run vs. itself: between = null
    assert 0.4 < aa.p_value <= 1.0
    d = ab.to_dict()
    json.dumps(d)
    assert d["rank"] == 6 and len(d["pairs"]) == 6 and d["p_value"] == ab.p_value
    md = ab.markdown()
    assert "W1 distance" in md and "different dynamics" in md


# ------------------------------------------------------------------ bad input
def _err(match: str):
    return pytest.raises(ValueError, match=match)


def test_bad_inputs_say_what_to_change():
    s = linear_states(system_matrix(TRUE), 40, seed=1)
    with _err(r"too few samples .* 40 samples with delays=39 leave 2 delay vectors, and DMD at any rank needs at "
              r"least 3: use delays <= 38"):
        koopman_spectrum(s, observable="raw", delays=39)
    with _err(r"DMD at rank 10 needs at least 12: use delays <= 29, or rank <= 7"):
        koopman_spectrum(s, observable="raw", delays=32, rank=10)
    with _err(r"rank 6 asked, but .* has only 4 resolved directions: use rank <= 4"):
        koopman_spectrum(s, observable="raw", delays=1, rank=6)
    with _err("rank must be an integer >= 1"):
        koopman_spectrum(s, rank=0)
    with _err("delays must be an integer >= 1"):
        koopman_spectrum(s, delays=0)
    for e in (0, 1.5, -0.1):
        with _err(r"energy must be in \(0, 1\]"):
            koopman_spectrum(s, energy=e)
    with _err("n_components must be an integer >= 1"):
        koopman_spectrum(s, n_components=0)
    with _err("observable must be one of 'pca', 'layer', 'raw'"):
        koopman_spectrum(s, observable="weights")
    # constant observable
    const = np.ones((40, 30)) * np.arange(30)
    with _err(r"the observable does not move \(zero variance over its 40 samples of 30 weights\)"):
        koopman_spectrum(const, delays=4)
    # NaN: which tensor element, from which step
    layout = ParamLayout(["conv.weight", "fc.weight"], [(2, 5), (3, 10)])
    x = torch.from_numpy(lifted(s, 40)).float()
    x[25:, 17] = float("nan")
    x[31, 3] = float("inf")
    traj = Trajectory(x, layout, list(range(0, 400, 10)))
    with _err(r"NaN/inf from step 250 on \(sample 25; first at fc.weight\[0, 7\]\).*stop=250"):
        koopman_spectrum(traj, delays=4)
    with _err(r"layer 'fc2' is not a tensor \(or module prefix\) of this run; its tensors are: conv.weight, fc.weight"):
        koopman_spectrum(traj, observable="layer", layer="fc2")
    with _err("observable='layer' needs layer=NAME"):
        koopman_spectrum(traj, observable="layer")
    with _err("layer= is only used with observable='layer'"):
        koopman_spectrum(traj, layer="fc")
    with _err("needs tensor names, and this trajectory has none"):
        koopman_spectrum(s, observable="layer", layer="fc")
    with _err(r"an array observable must be 2-D, time-major \(T, d\)"):
        koopman_spectrum(np.zeros(10))


def test_compare_bad_inputs():
    s = linear_states(system_matrix(TRUE), 90, seed=1, drive=0.5)
    x = torch.from_numpy(lifted(s, 30)).float()
    ta = Trajectory(x, ParamLayout(["fc.weight", "fc.bias"], [(5, 5), (5,)]))
    tb = Trajectory(x, ParamLayout(["fc.weight", "fc.bias"], [(25,), (5,)]))
    tc = Trajectory(x, ParamLayout(["fc.weight", "head.bias"], [(5, 5), (5,)]))
    with _err(r"different observables: A has layer fc.weight \(5, 5\), B has layer fc.weight \(25,\)"):
        compare_dynamics(ta, tb, observable="layer", layer="fc.weight", delays=2)
    with _err("layer 'fc.bias' is not a tensor"):
        compare_dynamics(ta, tc, observable="layer", layer=["fc.weight", "fc.bias"], delays=2)
    with _err(r"different observables: A has raw with 30 columns, B has raw with 20 columns"):
        compare_dynamics(x, x[:, :20], observable="raw", delays=2)
    # pca compares any two models (eigenvalues do not depend on the basis), but not two k's
    a = koopman_spectrum(x, n_components=3, delays=2, rank=2)
    b = koopman_spectrum(x, n_components=4, delays=2, rank=2)
    with _err(r"different observables \(pca with n_components=3 vs. pca with n_components=4\)"):
        spectrum_distance(a, b)
    c = koopman_spectrum(x, n_components=3, delays=2, rank=3)
    with _err(r"different ranks \(2 vs. 3 eigenvalues\): compute both at one rank \(e.g. rank=2\)"):
        spectrum_distance(a, c)
    with _err("window=50 is too long: .* use window <= 45"):
        compare_dynamics(x, x, delays=2, window=50)
    with _err(r"a window of 20 samples \(the null's\): too few samples .* use delays <= 7, or rank <= 11"):
        compare_dynamics(x, x, delays=8, rank=12, window=20)
    with _err("null must be 'segments'"):
        compare_dynamics(x, x, null="permutation")
    with _err("n_null must be an integer >= 1"):
        compare_dynamics(x, x, n_null=0)


# ------------------------------------------------------------------ CLI
def _record(directory: Path, seed: int, steps: int = 90) -> None:
    """A real (tiny) training run: a linear regression trained by SGD + momentum, every step recorded."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
    x = torch.randn(256, 8, generator=g)
    y = torch.stack([x[:, 0] - x[:, 1], x[:, 2] * x[:, 3]], 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with Recording(model, every=1, initial=True, directory=directory) as rec:
        for _ in range(steps):
            idx = torch.randint(0, 256, (32,), generator=g)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x[idx]), y[idx]).backward()
            opt.step()
            rec.step()


def test_cli_compare_writes_figure_json_and_markdown(tmp_path, capsys):
    _record(tmp_path / "run_a", 0)
    _record(tmp_path / "run_b", 1)
    out = tmp_path / "cmp"
    code = cli(["compare", str(tmp_path / "run_a"), str(tmp_path / "run_b"), "--delays", "4", "--components", "5",
                "--null-samples", "40", "--out", str(out), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "comparison.json").read_text())
    assert f"W1 distance {data['distance']:.4g}  p = {data['p_value']:.3g}" in printed
    assert data["labels"] == ["run_a", "run_b"] and data["delays"] == 4 and len(data["null"]) == 40
    assert data["spectrum_a"]["n_steps"] == 91 and len(data["pairs"]) == data["rank"]
    md = (out / "comparison.md").read_text()
    assert "# Koopman spectra: run_a vs. run_b" in md and "![spectra and null](comparison.png)" in md
    pytest.importorskip("matplotlib")
    png = (out / "comparison.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # a layer observable, numbers only
    code = cli(["compare", str(tmp_path / "run_a"), str(tmp_path / "run_b"), "--observable", "layer", "--layer",
                "0.weight", "--delays", "2", "--rank", "3", "--no-figures", "--out", str(tmp_path / "cmp2"), "-q"])
    assert code == 0
    data = json.loads((tmp_path / "cmp2" / "comparison.json").read_text())
    assert data["rank"] == 3 and data["spectrum_a"]["observable"].startswith("layer: 0.weight (48 weights")
    assert not (tmp_path / "cmp2" / "comparison.png").exists()


def test_cli_compare_errors(tmp_path, capsys):
    _record(tmp_path / "run", 0, steps=20)
    assert cli(["compare", str(tmp_path / "run"), str(tmp_path / "run"), "--layer", "0.weight", "-q"]) == 1
    assert "modeopt compare: error: --layer needs --observable layer" in capsys.readouterr().err
    assert cli(["compare", str(tmp_path / "run"), str(tmp_path / "run"), "--no-figures", "-q",
                "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "modeopt compare: error: " in err and "use delays <=" in err
    assert cli(["compare", str(tmp_path / "run"), str(tmp_path / "nope"), "-q"]) == 1
    assert "does not exist" in capsys.readouterr().err
