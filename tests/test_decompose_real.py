"""CMD on a real recorded training (MNIST subset) and at scale (N = 2 M)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeopt import TrajectoryRecorder, decompose
from workloads import SmallCNN, batches, evaluate, train_steps

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def recorded_cnn(mnist):
    xtr, ytr, xte, yte = mnist
    torch.manual_seed(0)
    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rec = TrajectoryRecorder(model, every=5)
    train_steps(model, opt, batches(xtr, ytr, 64, seed=0), steps=4 * 62, on_step=lambda i, l: rec.step())
    return model, rec.trajectory(), evaluate(model, xte, yte)


@pytest.mark.parametrize("m", [3, 5, 10])
def test_reconstruction_of_a_real_training_keeps_its_accuracy(recorded_cnn, mnist, m):
    """4 epochs of Adam on 4,000 real digits, 49 snapshots. Measured here (seed 0): raw 0.967,
    CMD at the last sample 0.961 / 0.966 / 0.963 for M = 3 / 5 / 10; allow 1.5 points below raw."""
    model, traj, raw_acc = recorded_cnn
    *_, xte, yte = mnist
    assert traj.n_samples == 49 and raw_acc > 0.95
    d = decompose(traj, n_modes=m, seed=0)
    cmd_model = SmallCNN()
    cmd_model.load_state_dict(model.state_dict())
    d.load_into(cmd_model, -1)
    with torch.no_grad():
        moved = max(float((p - q).abs().max()) for p, q in zip(cmd_model.parameters(), model.parameters()))
    assert moved > 1e-3  # the modelled weights really differ from the raw ones
    cmd_acc = evaluate(cmd_model, xte, yte)
    print(f"M={m}: raw {raw_acc:.3f}  CMD {cmd_acc:.3f}")
    assert cmd_acc >= raw_acc - 0.015


def test_later_window_models_as_well(recorded_cnn, mnist):
    """The paper: the later part of the history models the weights as well."""
    model, traj, raw_acc = recorded_cnn
    *_, xte, yte = mnist
    d = decompose(traj.window(traj.n_samples // 2), n_modes=5, seed=0)
    cmd_model = SmallCNN()
    d.load_into(cmd_model, -1)
    assert evaluate(cmd_model, xte, yte) >= raw_acc - 0.015


def test_two_million_weights_in_seconds_and_bounded_memory():
    """N = 2,000,000 x T = 20 (160 MB): measured ~1 s and 0.7x the input in extra peak RSS."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "decompose_scale.py"), "--child", "--n", "2000000",
         "--t", "20", "--modes", "10"],
        capture_output=True, text=True, check=True, timeout=300,
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(r)
    assert r["modes_found"] == 10
    assert r["seconds"] < 15
    assert r["extra_over_input"] < 1.5
