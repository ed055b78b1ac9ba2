"""The CNN early-phase study (examples/studies/cnn_early_phase.py) in its --quick setting."""

import math

import pytest

from _studies import load_study


@pytest.fixture(scope="module")
def res(tmp_path_factory):
    out = tmp_path_factory.mktemp("cnn_early_phase")
    r = load_study('cnn_early_phase').main(["--quick", "--out", str(out)])
    for name in ("cnn_early_phase.json", "cnn_early_phase.md", "cnn_early_phase.png"):
        assert (out / name).is_file()
    return r


def test_training_learns(res):
    (p,) = res["per_seed"]
    assert p["accuracy"]["0"] < 0.3  # chance at initialisation
    assert p["final_accuracy"] > 0.7  # well above chance after 150 SGD steps
    assert sum(p["loss"][-20:]) / 20 < sum(p["loss"][:20]) / 20


def test_window_distances_are_computed(res):
    (p,) = res["per_seed"]
    starts = res["settings"]["window_starts"]
    W = res["settings"]["window"]
    assert [s for s, _ in p["consecutive"]] == [s for s in starts if s + W in starts]
    assert all(math.isfinite(d) and d >= 0 for _, d in p["consecutive"])
    n = len(res["settings"]["blocks"])
    heat = p["heat"]
    assert len(heat) == n and all(abs(heat[i][i]) < 1e-12 for i in range(n))
    assert all(abs(heat[i][j] - heat[j][i]) < 1e-9 for i in range(n) for j in range(n))
    seg = p["segments"][0]
    assert 0 < seg["p_value"] <= 1 and seg["distance"] >= 0
