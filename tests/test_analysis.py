"""Analysis tools: recording to memory/directories, the DMD baseline, the figures' data, the CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modeopt import ParamLayout, Trajectory, decompose
from modeopt.analysis import (
    Recording, analyze, correlation_data, dmd, layer_distribution, load_snapshots, load_trajectory,
    profile_bands, reconstruction_errors,
)
from modeopt.analysis.evaluation import accuracy_curves, resolve_eval
from modeopt.cli import main as cli
from workloads import SmallCNN, batches

from conftest import planted_trajectory

#: the example evaluation (SmallCNN on the MNIST subset's held-out digits), by absolute path
MNIST_EVAL = f"{Path(__file__).resolve().parents[1] / 'examples' / 'mnist_eval.py'}:evaluation"
FIGURES = ["correlation.png", "profiles.png", "modes.png", "errors.png", "cmd_vs_dmd.png", "accuracy.png"]


def _nudge(model: nn.Module, k: int) -> None:
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(0.01 * (k + 1) * (i + 1))
            p.mul_(1 + 1e-3 * np.sin(k + i))


def _planted_with_layout(n_const: int = 20):
    """Planted modes in a 3-tensor layout, the first ``n_const`` weights constant."""
    w, labels, *_ = planted_trajectory(n=6000, t=24, m=4, noise=1e-4, seed=11)
    w[:n_const] = w[:n_const, :1]
    layout = ParamLayout(["a.weight", "a.bias", "b.weight"], [(50, 100), (50,), (950,)])
    return Trajectory(w.T.contiguous(), layout, list(range(0, 240, 10))), labels


# ------------------------------------------------------------------ recording
def test_recording_to_directory_round_trips_and_matches_memory(tmp_path):
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
    mem = Recording(model, every=3, start=4)
    with Recording(model, every=3, start=4, directory=tmp_path / "run") as disk:
        for k in range(16):
            _nudge(model, k)
            assert mem.step() == disk.step()
    a, b = mem.trajectory(), load_snapshots(tmp_path / "run")
    assert a.steps == b.steps == [4, 7, 10, 13, 16]
    assert torch.equal(a.data, b.data) and a.layout == b.layout == ParamLayout.from_model(model)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["manifest.json"] + [
        f"snapshot-{i:06d}.pt" for i in range(5)]
    # window and sub-sampling at load time, by step value
    assert load_snapshots(tmp_path / "run", start=7, every=2).steps == [7, 13]
    assert load_trajectory(tmp_path / "run", stop=11)[0].steps == [4, 7, 10]
    # a training resumed from step 10 replaces the snapshots taken after it, keeps the others
    with pytest.raises(ValueError, match="already holds 5 snapshots of another recording: record into an empty "
                                         "directory, or pass resume_from=STEP"):
        Recording(model, every=3, start=4, directory=tmp_path / "run")
    more = Recording(model, every=3, start=4, directory=tmp_path / "run", resume_from=10)
    assert load_snapshots(tmp_path / "run").steps == [4, 7, 10]
    for _ in range(4):
        _nudge(model, 0)
        more.step()
    again = load_snapshots(tmp_path / "run")
    assert again.steps == [4, 7, 10, 13] and torch.equal(again.data[:3], b.data[:3])
    assert not torch.equal(again.data[3], b.data[3])
    with pytest.raises(ValueError, match="already holds snapshots of a different model"):
        Recording(nn.Linear(2, 2), directory=tmp_path / "run", resume_from=0)


def test_recording_by_epoch_initial_and_half_precision(tmp_path):
    lin = nn.Linear(32, 32)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    rec = Recording(lin, unit="epoch", every=2, initial=True, dtype=torch.bfloat16, directory=tmp_path / "bf16")
    exact = Recording(lin, unit="epoch", every=2, initial=True)
    for epoch in range(6):
        for _ in range(4):
            with torch.no_grad():
                lin.weight.add_(1e-3)  # below bf16's resolution at 1.0: kept as movements from the anchor
            rec.step(), exact.step()
        rec.epoch(), exact.epoch()
    back, ref = load_snapshots(tmp_path / "bf16"), exact.trajectory()
    assert back.steps == ref.steps == [0, 2, 4, 6] and back.data.dtype == torch.bfloat16
    assert back.offset is not None
    moved = (back.matrix - back.matrix[:, :1])[0]
    assert torch.allclose(moved, torch.tensor([0.0, 8e-3, 16e-3, 24e-3]), atol=2e-4)
    traj, unit = load_trajectory(tmp_path / "bf16")
    assert unit == "epoch"
    with pytest.raises(ValueError, match="every must be an integer >= 1"):
        Recording(lin, every=0)
    with pytest.raises(ValueError, match="unit must be 'step' or 'epoch'"):
        Recording(lin, unit="batch")
    with pytest.raises(ValueError, match="give one of directory= or max_snapshots="):
        Recording(lin, directory=tmp_path / "x", max_snapshots=5)


def test_bad_inputs_get_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no snapshots and no checkpoints"):
        load_trajectory(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_trajectory(tmp_path / "nope")
    model = nn.Linear(4, 3)
    run = tmp_path / "run"
    rec = Recording(model, directory=run)
    for k in range(4):
        _nudge(model, k)
        rec.step()
    torch.save({"step": 9, "epoch": 0, "data": torch.zeros(7)}, run / "snapshot-000004.pt")
    with pytest.raises(ValueError, match=r"snapshot-000004.pt holds \(7,\) values, but the manifest's model has "
                                         r"15 weights: the directory mixes snapshots of different models"):
        load_snapshots(run)
    (run / "snapshot-000004.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read snapshot .*snapshot-000004.pt"):
        load_snapshots(run)
    for f in run.glob("snapshot-*"):
        f.unlink()
    with pytest.raises(ValueError, match="has a manifest but no snapshot files"):
        load_snapshots(run)
    with pytest.raises(ValueError, match="no sample lies in the window"):
        load_trajectory(_checkpoints(tmp_path / "ck", 3), start=100)
    # checkpoints: a single file, and files of two different models
    one = tmp_path / "one.pt"
    torch.save(model.state_dict(), one)
    with pytest.raises(ValueError, match="is not a trajectory .* but a single file"):
        load_trajectory(one)
    other = tmp_path / "other.pt"
    torch.save(nn.Linear(5, 3).state_dict(), other)
    with pytest.raises(ValueError, match=r"other.pt does not match .*one.pt: tensor 'weight' has shape \(3, 5\)"):
        load_trajectory([one, one, other], keep_order=True)


def _checkpoints(d, n):
    d.mkdir()
    m = nn.Linear(3, 2)
    for k in range(1, n + 1):
        _nudge(m, k)
        torch.save({"model": m.state_dict(), "epoch": k}, d / f"ep{k}.pt")
    return d


def test_checkpoint_directory_in_natural_order(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    m = nn.Linear(3, 2)
    sds = {}
    for k in (1, 2, 10, 11):
        _nudge(m, k)
        sds[k] = {n: p.clone() for n, p in m.state_dict().items()}
        torch.save({"model": sds[k], "epoch": k}, d / f"ep{k}.pt")  # a training checkpoint
    traj, unit = load_trajectory(d)
    assert traj.steps == [1, 2, 10, 11] and unit == "step"  # ep10 after ep2, steps from the names
    assert torch.equal(traj.state_dict_at(2)["weight"], sds[10]["weight"])
    files = [d / "ep11.pt", d / "ep1.pt", d / "ep2.pt"]
    assert load_trajectory(files)[0].steps == [1, 2, 11]
    assert load_trajectory(files, keep_order=True)[0].steps == [0, 1, 2]  # names not increasing: 0..T-1


# ------------------------------------------------------------------ DMD
def test_dmd_reconstructs_an_exactly_linear_trajectory():
    g = torch.Generator().manual_seed(0)
    n, T = 4000, 25
    theta = 0.3
    rot = 0.98 * torch.tensor([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    lam = torch.tensor([1.0, 0.9, 0.75], dtype=torch.float64)
    z = torch.zeros(5, T, dtype=torch.float64)  # 3 real decays + one rotating pair: x_{k+1} = A x_k
    z[:3] = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)[:, None] * lam[:, None] ** torch.arange(T)
    z[3:, 0] = torch.tensor([1.0, 0.0], dtype=torch.float64)
    for k in range(1, T):
        z[3:, k] = rot @ z[3:, k - 1]
    w = torch.randn(n, 5, generator=g, dtype=torch.float64) @ z
    d = dmd(w, 5)
    assert d.rank == 5 and d.coef.shape == (T - 1, T)
    err = float((d.reconstruct().double() - w).norm() / w.norm())
    assert err < 1e-6, err
    ev = sorted(d.eigenvalues.tolist(), key=lambda c: (c.real, c.imag))
    want = sorted([0.75, 0.9, 1.0, 0.98 * np.exp(1j * theta), 0.98 * np.exp(-1j * theta)],
                  key=lambda c: (complex(c).real, complex(c).imag))
    assert np.allclose(ev, want, atol=1e-8)
    assert torch.allclose(d.reconstruct(7).double(), w[:, 7], atol=1e-5)
    assert d.modes().shape == (n, 5)
    with pytest.raises(ValueError, match=r"rank must be an integer in \[1, 24\]"):
        dmd(w, 25)


def test_cmd_beats_dmd_on_planted_modes():
    traj, _ = _planted_with_layout()
    cmd = decompose(traj, n_modes=4, seed=0)
    e_cmd = reconstruction_errors(traj, cmd, name="CMD")
    e_dmd = reconstruction_errors(traj, dmd(traj, 4), name="DMD")
    assert e_cmd.total_rel < 1e-3 < 0.3 < e_dmd.total_rel
    assert np.nanmedian(e_cmd.rel) < 1e-3 and np.nanmedian(e_dmd.rel) > 0.1
    assert e_cmd.layer_rel.shape == (3,) and e_cmd.time_rel.shape == (24,)
    # exact against a dense computation
    dense = (cmd.reconstruct().double() - traj.matrix.double()).pow(2).mean(dim=1).sqrt()
    assert np.allclose(e_cmd.rmse, dense.numpy(), rtol=1e-2, atol=1e-7)  # dense: float32 reconstruct()
    # DMD has the reconstruction interface of a Decomposition
    model = nn.Module()
    model.a = nn.Linear(100, 50)
    model.b = nn.Module()
    model.b.weight = nn.Parameter(torch.zeros(950))
    d = dmd(traj, 4)
    d.load_into(model, 5)
    assert torch.allclose(model.b.weight.detach(), d.reconstruct(5)[5050:])
    assert set(d.state_dict_at(-1)) == {"a.weight", "a.bias", "b.weight"}


# ------------------------------------------------------------------ figure data
def test_figure_data_on_planted_modes():
    traj, labels = _planted_with_layout(n_const=20)
    dec = decompose(traj, n_modes=4, n_samples=400, seed=0)
    corr = correlation_data(dec)
    k = dec.samples.numel()
    # the display order groups each mode contiguously, in mode order, and is a permutation
    assert sorted(corr.order.tolist()) == list(range(k))
    assert np.all(np.diff(corr.labels) >= 0)
    assert corr.bounds[0] == 0 and corr.bounds[-1] == k
    for m in range(dec.n_modes):
        block = corr.labels[corr.bounds[m] : corr.bounds[m + 1]]
        assert block.size > 0 and np.all(block == m)
    assert np.allclose(corr.abs_corr, corr.abs_corr.T) and np.allclose(np.diag(corr.abs_corr), 1, atol=1e-5)
    assert np.all(corr.within > 0.99) and corr.between < 0.5  # planted modes are orthogonal profiles

    bands = profile_bands(traj, dec, max_members=500)
    assert bands.reference.shape == bands.lower.shape == (4, 24)
    assert np.all(bands.width >= 0) and np.all(bands.median >= bands.lower) and np.all(bands.median <= bands.upper)
    tol = 1e-2  # the planted noise, in normalised units
    assert np.all(bands.lower - tol <= bands.reference) and np.all(bands.reference <= bands.upper + tol)
    assert np.allclose(bands.reference.std(axis=1), 1) and np.allclose(bands.reference.mean(axis=1), 0, atol=1e-9)
    assert np.all(bands.n_members == np.minimum(dec.sizes.numpy(), 500))

    layers = layer_distribution(dec)
    assert layers.names == ["a.weight", "a.bias", "b.weight"]
    assert np.array_equal(layers.counts.sum(axis=1) + layers.constant, layers.sizes)
    assert np.array_equal(layers.sizes, [5000, 50, 950]) and layers.constant.tolist() == [20, 0, 0]
    assert np.array_equal(layers.mode_sizes, dec.sizes.numpy())
    assert np.allclose(layers.fractions.sum(axis=1) + layers.constant / layers.sizes, 1)


def test_accuracy_curves_and_mismatched_model():
    traj, _ = _planted_with_layout(n_const=0)
    dec = decompose(traj, n_modes=4, n_samples=300, seed=0)

    def factory():
        m = nn.Module()
        m.a = nn.Linear(100, 50)
        m.b = nn.Module()
        m.b.weight = nn.Parameter(torch.zeros(950))
        return m

    acc = accuracy_curves({"raw": traj, "cmd": dec}, lambda m: float(m.b.weight.detach().sum()), factory,
                          n_samples=24, steps=traj.steps, every=5)
    assert acc.index.tolist() == [0, 5, 10, 15, 20, 23] and acc.steps.tolist() == [0, 50, 100, 150, 200, 230]
    assert np.allclose(acc.curves["raw"], traj.matrix[5050:, acc.index].sum(0).numpy(), rtol=1e-4)
    assert np.allclose(acc.curves["cmd"], acc.curves["raw"], rtol=1e-2, atol=1e-1)
    with pytest.raises(ValueError, match="the evaluation model does not match the trajectory"):
        accuracy_curves({"raw": traj}, lambda m: 0.0, lambda: nn.Linear(2, 2), n_samples=24, steps=traj.steps)


# ------------------------------------------------------------------ the CLI on a real run
@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    """SmallCNN on real MNIST digits, 36 Adam steps, a snapshot every 3 steps, to a directory."""
    _, evaluate = resolve_eval(MNIST_EVAL)  # loads the example once: --eval MNIST_EVAL below reuses its data
    xtr, ytr, _, _ = sys.modules[evaluate.__module__].mnist_split()
    torch.manual_seed(0)
    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    run = tmp_path_factory.mktemp("run") / "cnn"
    data = batches(xtr, ytr, 64, seed=0)
    with Recording(model, every=3, initial=True, directory=run) as rec:
        for _ in range(36):
            xb, yb = next(data)
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            rec.step()
    return run


def test_cli_analyze_writes_the_report(recorded_run, tmp_path, capsys):
    out = tmp_path / "report"
    rc = cli(["analyze", str(recorded_run), "--modes", "4", "--samples", "300", "--eval", MNIST_EVAL,
              "--eval-every", "6", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr()
    assert "report: " in printed.out and "relative error, CMD, M = 4" in printed.out
    for f in FIGURES + ["index.html", "report.md", "summary.json"]:
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    page = (out / "index.html").read_text()
    assert all(f'src="{f}"' in page for f in FIGURES)
    s = json.loads((out / "summary.json").read_text())
    assert s["n_samples"] == 13 and s["steps"] == [0, 36] and s["n_weights"] == 29_994
    assert s["n_modes"] == 4 and sum(s["mode_sizes"]) + s["n_constant"] == 29_994
    assert s["dmd_ranks"] == [4, 2]
    assert set(s["final_accuracy"]) == {"recorded", "CMD, M = 4", "DMD, r = 4", "DMD, r = 2"}
    assert s["evaluated_steps"] == [0, 18, 36]
    assert s["final_accuracy"]["recorded"] > 0.6 and s["final_accuracy"]["CMD, M = 4"] > 0.6


def test_analyze_api_data_on_the_run(recorded_run):
    traj, unit = load_trajectory(recorded_run, start=6, every=2)
    assert traj.steps == [6, 12, 18, 24, 30, 36] and unit == "step"
    r = analyze(traj, out=None, threshold=0.5, n_samples=200, dmd_rank=3, progress=False)
    assert r.figures == {} and list(r.dmd) == ["DMD, r = 3"]
    assert r.decomposition.n_modes == len(r.profiles.sizes) == r.layers.counts.shape[1]
    assert np.all(np.diff(r.correlation.labels) >= 0)
    assert np.array_equal(r.layers.counts.sum(axis=1) + r.layers.constant, r.layers.sizes)


def test_cli_errors(tmp_path, capsys, monkeypatch):
    (tmp_path / "empty").mkdir()
    assert cli(["analyze", str(tmp_path / "empty"), "--no-figures", "-q"]) == 1
    assert "modeopt analyze: error: " in capsys.readouterr().err
    assert cli(["analyze", str(tmp_path / "empty"), "--eval", "imagenet", "-q"]) == 1
    assert ("--eval 'imagenet': expected 'package.module:function' or 'path/to/file.py:function'"
            in capsys.readouterr().err)
    assert cli(["analyze", str(tmp_path / "empty"), "--eval", str(tmp_path / "none.py") + ":evaluation", "-q"]) == 1
    assert f"there is no file {tmp_path / 'none.py'}" in capsys.readouterr().err
    (tmp_path / "ev.py").write_text("def other():\n    pass\n")
    assert cli(["analyze", str(tmp_path / "empty"), "--eval", str(tmp_path / "ev.py") + ":evaluation", "-q"]) == 1
    assert f"{tmp_path / 'ev.py'} has no function 'evaluation'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["analyze", "x", "--modes", "3", "--threshold", "0.2"])
    assert "not allowed with argument" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert cli(["analyze", str(tmp_path / "empty"), "-q"]) == 1
    assert "the report's figures need matplotlib: pip install 'modeopt[analysis]'" in capsys.readouterr().err


# ------------------------------------------------------------------ Hugging Face Trainer
def test_trainer_callback_records_steps_and_epochs(tmp_path):
    transformers = pytest.importorskip("transformers")
    from modeopt.integrations.hf import TrajectoryCallback

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 1)

        def forward(self, x, labels=None):
            out = self.lin(x).squeeze(-1)
            return {"loss": F.mse_loss(out, labels), "logits": out}

    g = torch.Generator().manual_seed(0)
    xs = torch.randn(32, 4, generator=g)
    data = [{"x": x, "labels": x.sum()} for x in xs]
    by_step = TrajectoryCallback(every=3, directory=tmp_path / "steps")
    by_epoch = TrajectoryCallback(unit="epoch", initial=True)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), num_train_epochs=3,
                                          per_device_train_batch_size=8, learning_rate=0.05, save_strategy="no",
                                          report_to=[], use_cpu=True, disable_tqdm=True, log_level="error")
    args.save_strategy, args.save_steps = "steps", 6
    model = Tiny()
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[by_step, by_epoch]).train()
    steps = load_snapshots(tmp_path / "steps")
    assert steps.steps == [3, 6, 9, 12]
    ep = by_epoch.trajectory()
    assert ep.steps == [0, 1, 2, 3]
    flat = torch.cat([model.lin.weight.detach().flatten(), model.lin.bias.detach()])
    assert torch.equal(ep.data[-1], flat) and torch.equal(steps.data[-1], flat)
    # resumed from the step-6 checkpoint: the same directory goes on, steps 9 and 12 are re-recorded
    resumed, model2 = TrajectoryCallback(every=3, directory=tmp_path / "steps"), Tiny()
    transformers.Trainer(model=model2, args=args, train_dataset=data, callbacks=[resumed]).train(
        resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-6"))
    after = load_snapshots(tmp_path / "steps")
    assert after.steps == [3, 6, 9, 12] and torch.equal(after.data[:2], steps.data[:2])
    assert torch.equal(after.data[-1], torch.cat([model2.lin.weight.detach().flatten(), model2.lin.bias.detach()]))
    assert len(list((tmp_path / "steps").glob("snapshot-*.pt"))) == 4
