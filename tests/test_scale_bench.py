"""benchmarks/scale.py --smoke: the scale benchmark's harness on a 1.3 M-weight Llama, end to end.

Marked slow: each method is a fresh process that imports torch, transformers and peft (~3-9 s each,
more on a loaded machine), so even one method does not fit the default suite's budget.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("transformers")


@pytest.mark.slow
def test_smoke_run_measures_every_phase(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    cmd = [sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--smoke", "--methods", "plain", "cmd_disk",
           "--steps", "2", "--threads", "1", "--out", str(tmp_path), "--log-dir", str(tmp_path / "logs")]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, timeout=600, capture_output=True)
    rows = json.loads((tmp_path / "scale.json").read_text())["sizes"]["smoke"]
    assert list(rows) == ["plain", "cmd_disk"]
    plain, cmd = rows["plain"], rows["cmd_disk"]
    n = plain["n_weights"]
    assert n == cmd["n_weights"] > 1_000_000
    # plain AdamW on bf16 weights holds a bf16 gradient and two bf16 moments per weight: 6 B, counted exactly
    assert plain["phases"]["train"]["census_max"] == {"grads": 2 * n, "optimizer_state": 4 * n, "extra_params": 0}
    assert list(cmd["phases"]) == ["warmup", "switch", "embedded"]
    assert cmd["phases"]["embedded"]["steps"] == 2
    emb = cmd["info"]["embedded_weights"]
    # the warm-up's bf16 recording lives in the file: T = 3 movements of 2 B and a float32 anchor
    assert cmd["phases"]["warmup"]["census_max"]["recording_file"] == (2 * 3 + 4) * emb
    end = cmd["phases"]["embedded"]["census_end"]
    assert end["a"] == 2 * emb and end["labels"] == emb and end.get("recording_file", 0) == 0
    for r in (plain, cmd):
        assert r["reset_ok"] and r["peak_mib"] > 0 and r["peak_mib"] >= r["peak_sampled"]["VmRSS"] - 1
    md = (tmp_path / "scale.md").read_text()
    assert "cmd_disk: RAM peak with record_dir <= plain AdamW's" in md
