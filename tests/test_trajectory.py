"""Recording trajectories from models, state dicts and checkpoint files, and loading them back."""

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from modeopt import ParamLayout, Trajectory, TrajectoryRecorder, decompose
from workloads import SmallCNN

from conftest import same_partition


def _nudge(model, k):
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(0.01 * (k + 1) * (i + 1))


def test_layout_flatten_unflatten_locate():
    m = SmallCNN()
    layout = ParamLayout.from_model(m)
    assert layout.n == sum(p.numel() for p in m.parameters())
    flat = layout.flatten(dict(m.named_parameters()))
    back = layout.unflatten(flat)
    for name, p in m.named_parameters():
        assert torch.equal(back[name], p)
    spec = layout["conv2.weight"]
    assert layout.locate(spec.offset + 5 * 25 + 7) == ("conv2.weight", (0, 5, 1, 2))
    assert torch.equal(layout.tensor_ids()[spec.offset], torch.tensor(2))
    assert ParamLayout.from_dict(layout.to_dict()) == layout
    with pytest.raises(IndexError):
        layout.locate(layout.n)


def test_layout_skips_frozen_and_shared_parameters():
    lin = nn.Linear(4, 4)
    m = nn.Sequential(lin, nn.ReLU(), lin, nn.Linear(4, 2))  # lin shared
    m[3].bias.requires_grad_(False)
    layout = ParamLayout.from_model(m)
    assert layout.names == ["0.weight", "0.bias", "3.weight"]


def test_recorder_every_and_ring_buffer():
    m = SmallCNN()
    rec = TrajectoryRecorder(m, every=2, max_snapshots=3)
    snaps = []
    for k in range(10):
        _nudge(m, k)
        if rec.step():
            snaps.append(rec.layout.flatten(dict(m.named_parameters())))
    assert rec.n_snapshots == 3
    traj = rec.trajectory()
    assert traj.steps == [6, 8, 10]
    assert torch.equal(traj.data, torch.stack(snaps[-3:]))


def test_recorder_growing_buffer_keeps_every_snapshot():
    m = SmallCNN()
    rec = TrajectoryRecorder(m)
    for k in range(9):  # crosses several doublings of the buffer
        _nudge(m, k)
        rec.snapshot(step=100 + k)
    traj = rec.trajectory()
    assert traj.n_samples == 9 and traj.steps == list(range(100, 109)) and traj.offset is None
    assert torch.equal(traj.data[-1], rec.layout.flatten(dict(m.named_parameters())))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_recording_keeps_small_movements_of_large_weights(dtype, tmp_path):
    """bf16 has 8 bits of mantissa: 1.0 + 1e-3 * k is 1.0 for every k < 4. Stored as movements
    from the first snapshot, the trajectory still resolves them, and CMD finds the same modes."""
    lin = nn.Linear(64, 64)
    with torch.no_grad():
        lin.weight.fill_(1.0)
        lin.bias.fill_(-2.0)
    g = torch.Generator().manual_seed(0)
    prof = torch.randn(2, 12, generator=g)
    coef = torch.rand(64 * 64 + 64, generator=g) + 0.5
    lab = torch.arange(64 * 64 + 64) % 2
    recs = [TrajectoryRecorder(lin), TrajectoryRecorder(lin, dtype=dtype),
            TrajectoryRecorder(lin, dtype=dtype, max_snapshots=12, directory=tmp_path)]
    base = torch.cat([lin.weight.detach().flatten(), lin.bias.detach()]).clone()
    for t in range(12):
        vals = base + 1e-3 * coef * prof[lab, t]
        with torch.no_grad():
            lin.weight.copy_(vals[:4096].view(64, 64))
            lin.bias.copy_(vals[4096:])
        for r in recs:
            r.snapshot()
    exact, half, mapped = (r.trajectory() for r in recs)
    assert half.offset is not None and half.data.dtype == dtype
    err = (half.matrix - exact.matrix).abs().max() / (exact.matrix - exact.matrix[:, :1]).abs().max()
    assert float(err) < 1e-2  # relative to the movement, not to the weight
    assert torch.equal(mapped.data, half.data)
    d_exact, d_half = decompose(exact, n_modes=2, seed=0), decompose(half, n_modes=2, seed=0)
    assert same_partition(d_exact.labels, d_half.labels)
    n = 64 * 64 + 64
    assert recs[1]._buffer.nbytes == 16 * n * 2 + 4 * n  # 16 rows (grown by doubling) + the anchor
    assert recs[2]._buffer.nbytes == 12 * n * 2 + 4 * n


def test_recorder_selects_by_name_and_predicate_and_rejects_bad_choices():
    m = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    rec = TrajectoryRecorder(m, names=["0.weight", "1.running_mean"])
    assert rec.layout.names == ["0.weight", "1.running_mean"]
    rec = TrajectoryRecorder(m, names=lambda n, p: n.endswith("bias"))
    assert rec.layout.names == ["0.bias", "1.bias"]
    with pytest.raises(ValueError, match=r"not floating point, cannot be recorded: \['1.num_batches_tracked'\]"):
        TrajectoryRecorder(m, names=["1.num_batches_tracked"])
    with pytest.raises(KeyError, match="not parameters or buffers of the model"):
        TrajectoryRecorder(m, names=["nope"])
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable floating-point parameters"):
        TrajectoryRecorder(frozen)
    with pytest.raises(ValueError, match="max_snapshots must be an integer >= 3"):
        TrajectoryRecorder(m, max_snapshots=2)


def test_from_state_dicts_and_load_into_round_trip():
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    sds = []
    for k in range(4):
        _nudge(m, k)
        m(torch.randn(8, 3))  # BN statistics move
        sds.append({k: v.clone() for k, v in m.state_dict().items()})
    traj = Trajectory.from_state_dicts(sds, steps=[10, 20, 30, 40])
    assert "1.num_batches_tracked" not in traj.layout  # integer buffers are skipped
    assert "1.running_mean" in traj.layout
    fresh = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    traj.load_into(fresh, 1)
    for k, v in sds[1].items():
        if v.is_floating_point():
            assert torch.equal(fresh.state_dict()[k], v)
    with pytest.raises(ValueError, match=r"state dict 2 does not match the first one"):
        Trajectory.from_state_dicts([sds[0], sds[1], {"0.weight": torch.zeros(1)}])
    with pytest.raises(ValueError, match="not floating point"):
        Trajectory.from_state_dicts(sds, keys=["1.num_batches_tracked"])


def test_from_checkpoint_files_of_every_kind(tmp_path):
    m = SmallCNN()
    paths = []
    for k in range(3):
        _nudge(m, k)
        sd = {n: p.detach().clone() for n, p in m.state_dict().items()}
        if k == 0:
            p = tmp_path / "a.pt"
            torch.save(sd, p)
        elif k == 1:
            p = tmp_path / "b.pt"
            torch.save({"model": sd, "epoch": 1, "optimizer": {"lr": 0.1}}, p)  # a training checkpoint
        else:
            p = tmp_path / "hf"
            p.mkdir()
            save_file(sd, str(p / "model.safetensors"))  # a save_pretrained directory
        paths.append(p)
    traj = Trajectory.from_checkpoints(paths)
    assert traj.n_samples == 3 and traj.layout == ParamLayout.from_model(m)
    assert torch.equal(traj.state_dict_at(-1)["fc2.bias"], m.fc2.bias)
    torch.save({"a": 1, "b": 2}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match=r"pass key=\.\.\. naming the entry"):
        Trajectory.from_checkpoints([tmp_path / "odd.pt"] * 3)


def test_save_load_and_mmap(tmp_path):
    m = SmallCNN()
    rec = TrajectoryRecorder(m)
    for k in range(4):
        _nudge(m, k)
        rec.snapshot()
    traj = rec.trajectory()
    traj.save(tmp_path / "t.pt")
    for mmap in (False, True):
        back = Trajectory.load(tmp_path / "t.pt", mmap=mmap)
        assert torch.equal(back.data, traj.data) and back.layout == traj.layout and back.steps == traj.steps
    torch.save({"x": 1}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a trajectory saved by modeopt"):
        Trajectory.load(tmp_path / "bad.pt")


def test_windows_and_bare_matrix_errors():
    traj = Trajectory.from_matrix(torch.randn(50, 10))
    half = traj.window(5)
    assert half.n_samples == 5 and half.steps == [5, 6, 7, 8, 9]
    assert traj.window(every=3).n_samples == 4
    with pytest.raises(ValueError, match="has no layout"):
        traj.state_dict_at(0)
    d = decompose(traj, n_modes=2, seed=0)
    with pytest.raises(ValueError, match="decompose a Trajectory"):
        d.load_into(SmallCNN())
