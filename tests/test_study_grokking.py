"""The grokking study's --quick setting (examples/studies/grokking.py): what must hold even when short."""

import math

import numpy as np
import pytest

from _studies import load_study

torch = pytest.importorskip("torch")
pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    mod = load_study('grokking')
    s = mod.Settings(**{**mod.QUICK, "seeds": [0], "n_null": 30})
    out = tmp_path_factory.mktemp("grokking")
    res = mod.run_study(s, out)
    clean = {k: v for k, v in res.items() if not k.startswith("_")}
    (out / "grokking.md").write_text(mod.markdown(clean))
    return mod, s, res, out


def test_training_fits_the_training_set(study):
    _, _, res, _ = study
    for r in res["runs"]:
        log = r["log"]
        assert log["train_acc"][-1] > log["train_acc"][0] + 0.2, r["run"]
        if not r["run"].startswith("constrained"):
            assert r["final_train_acc"] >= 0.99 and r["t_mem"] is not None, r["run"]
            assert all(math.isfinite(v) for v in log["train_loss"])


def test_weight_decay_generalises_better_than_none(study):
    _, _, res, _ = study
    acc = {r["run"]: r["final_test_acc"] for r in res["runs"]}
    assert acc["grok s0"] > acc["no-wd s0"] + 0.2


def test_spectra_are_finite_and_comparisons_complete(study):
    _, _, res, _ = study
    rows = res["early"]["W_out"] + res["early"]["pca"] + res["full"]
    assert len(res["early"]["W_out"]) == 2 and len(res["full"]) == 1
    for q in rows:
        assert q["finite"] and math.isfinite(q["distance"]) and q["distance"] >= 0
        assert 0 < q["p_value"] <= 1
        assert len(q["eigenvalues_a"]) == len(q["eigenvalues_b"]) == q["rank"]
        assert max(q["max_abs_a"], q["max_abs_b"]) < 1.5  # training does not blow up


def test_decomposition_reconstructs_the_recorded_weights(study):
    _, s, res, _ = study
    for c in res["cmd"]:
        assert c["n_modes"] == s.modes and sum(c["sizes"]) + c["n_constant"] == res["n_weights"]
        assert c["rel_error"] < 0.25
        # every tensor's weights are spread over the modes, and every weight has one mode
        assert sum(sum(v) for v in c["tensors"].values()) == res["n_weights"]
        # the reconstructed model fits the training set at the end about as well as the real one
        assert c["reconstructed_accuracy"][-1]["train"] > 0.8
        assert c["reconstructed_accuracy"][0]["step"] == 0


def test_outputs_written(study):
    _, _, _, out = study
    for name in ("accuracy.png", "modes.png", "mode_fourier.png", "grokking.md"):
        assert (out / name).stat().st_size > 1000, name
