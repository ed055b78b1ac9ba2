"""Issue #16: recording GPU models on the host, and the switch's decomposition on the device.

The device code path (streamed chunks, double buffers, device-side finiteness check) runs on the
CPU here too: with ``device="cpu"``, tiny ``chunk_rows`` and ``_FORCE_STAGING``. The tests that
need CUDA are skipped without it.
"""

import pytest
import torch
from conftest import planted_trajectory, same_partition

import modeopt
import modeopt.trajectories.streaming as streaming
from modeopt import decompose
from modeopt.trajectories.layout import ParamLayout
from modeopt.trajectories.snapshots import SnapshotBuffer
from modeopt.trajectories.trajectory import Trajectory



def cuda(fn):
    """A test that needs a CUDA device: marked ``cuda`` (the GPU check selects them) and skipped without one."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(fn))


FIELDS = ("labels", "reference", "a", "b", "score", "constant", "profiles", "samples", "sample_labels")


def _bf16(w: torch.Tensor) -> Trajectory:
    """A relative half-precision trajectory (data + offset), as a bf16 recording stores it."""
    base = w[:, 0].float().clone()
    return Trajectory((w.float() - base[:, None]).T.to(torch.bfloat16).contiguous(), None, None, base)


def _same(d1, d2, exact=True, atol=0.0):
    for f in FIELDS:
        x, y = getattr(d1, f).cpu(), getattr(d2, f).cpu()
        if exact or not x.is_floating_point():
            assert torch.equal(x, y), f
        else:
            assert torch.allclose(x.double(), y.double(), rtol=0, atol=atol), (f, (x.double() - y.double()).abs().max())


def test_explicit_cpu_device_is_the_default_path():
    w, *_ = planted_trajectory(n=6_000, t=12, m=3, noise=1e-2, seed=1)
    d = decompose(w, n_modes=3, seed=0)
    _same(d, decompose(w, n_modes=3, seed=0, device="cpu"))
    assert d.labels.device.type == "cpu"


@pytest.mark.parametrize("kind", ["float32", "bf16+offset"])
def test_tiny_chunks_and_the_staged_stream_equal_the_unchunked_result(monkeypatch, kind):
    w, labels, *_ = planted_trajectory(n=5_000, t=15, m=4, noise=1e-2, seed=2)
    traj = Trajectory.from_matrix(w) if kind == "float32" else _bf16(w)
    whole = decompose(traj, n_modes=4, seed=0)
    assert same_partition(whole.labels, labels)
    chunked = decompose(traj, n_modes=4, seed=0, chunk_rows=37)  # 136 chunks, last one partial
    _same(whole, chunked, exact=False, atol=1e-6)
    monkeypatch.setattr(streaming, "_FORCE_STAGING", True)  # stage -> buffer -> compute, 2 rotating buffers
    staged = decompose(traj, n_modes=4, seed=0, device="cpu", chunk_rows=37)
    _same(chunked, staged)  # same chunks, same values: bit for bit


@pytest.mark.parametrize("n_buffers", [1, 2, 3])
def test_stream_cols_yields_exactly_the_columns(n_buffers):
    w, *_ = planted_trajectory(n=1_000, t=7, m=2, seed=3)
    for traj in (Trajectory.from_matrix(w), _bf16(w)):
        bounds = [(i, min(i + 64, 1_000)) for i in range(0, 1_000, 64)]
        got = list(streaming.stream_cols(traj, bounds, torch.device("cpu"), staged=True, n_buffers=n_buffers))
        assert [(i0, i1) for i0, i1, _ in got] == bounds  # (copy each x: buffers are reused)
        for (i0, i1), (_, _, x) in zip(bounds, streaming.stream_cols(traj, bounds, torch.device("cpu"), staged=True,
                                                                  n_buffers=n_buffers)):
            assert torch.equal(x, traj.cols(i0, i1))


def test_nonfinite_values_are_named_with_small_chunks():
    w, *_ = planted_trajectory(n=3_000, t=8, m=2, seed=4)
    w[2_345, 5] = float("nan")
    with pytest.raises(ValueError, match="row 2345, sample 5"):
        decompose(w, n_modes=2, seed=0, chunk_rows=100)


def test_float64_input_is_never_written():
    w, *_ = planted_trajectory(n=3_000, t=10, m=3, seed=5, dtype=torch.float64)
    before = w.clone()
    decompose(w, n_modes=3, seed=0)
    assert torch.equal(w, before)


def test_bad_chunk_rows_is_refused():
    w, *_ = planted_trajectory(n=2_000, t=8, m=2, seed=6)
    with pytest.raises(ValueError, match="chunk_rows"):
        decompose(w, n_modes=2, seed=0, chunk_rows=0)


def test_decomposition_to_moves_every_tensor():
    w, *_ = planted_trajectory(n=2_000, t=8, m=2, seed=7)
    d = decompose(w, n_modes=2, seed=0).to("cpu")
    assert torch.equal(d.reconstruct(), decompose(w, n_modes=2, seed=0).reconstruct())


def test_host_recording_is_unchanged_and_needs_no_synchronisation():
    lin = torch.nn.Linear(30, 20)
    layout = ParamLayout.from_named_tensors(list(lin.named_parameters()))
    buf = SnapshotBuffer(layout.n, capacity=4)
    buf.append(layout, list(lin.parameters()), 1)
    assert not buf._pin and buf._pending == {}
    data, steps = buf.raw()
    assert torch.equal(data[0], layout.flatten(dict(lin.named_parameters()))) and steps == [1]


def test_switch_device_rule():
    from modeopt.modespace.switch import switch_device

    assert switch_device([torch.zeros(2)]) == torch.device("cpu")


def test_switch_time_benchmark_runs_on_the_cpu():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "switch_time.py"
    spec = importlib.util.spec_from_file_location("switch_time", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    r = mod.measure_switch(20_000, 20, 4, "cpu")
    assert r["device"] == "cpu" and r["n_modes_found"] == 4 and r["seconds"] > 0
    assert r["seconds_per_100M"] == pytest.approx(r["seconds"] * 1e8 / 20_000)


# ------------------------------------------------------------------ CUDA
def _model(device, dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512),
                               torch.nn.ReLU(), torch.nn.Linear(512, 10)).to(device=device, dtype=dtype)


@cuda
@pytest.mark.parametrize("record_dtype", [torch.float32, torch.bfloat16])
def test_recording_a_gpu_model_stays_on_the_host(record_dtype):
    dev = torch.device("cuda")
    model = _model(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(64, 256, device=dev), torch.randint(0, 10, (64,), device=dev)
    rec = modeopt.TrajectoryRecorder(model, dtype=record_dtype, max_snapshots=12)
    largest = max(p.numel() for p in model.parameters())
    cpu_copy, growth = [], []

    def step():
        opt.zero_grad(set_to_none=False)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    step()  # gradients, cuBLAS workspaces: allocated before the baseline
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    for _ in range(12):
        step()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        rec.snapshot()
        torch.cuda.synchronize()
        growth.append(torch.cuda.max_memory_allocated() - before)
        cpu_copy.append(torch.cat([p.detach().reshape(-1).float().cpu() for p in model.parameters()]))
    torch.cuda.synchronize()
    if record_dtype == torch.float32:
        assert max(growth) == 0  # straight into pinned host rows
    else:  # one tensor's movement in flight: anchor slice up (4 B) + float32 movement (4 B) + bf16 (2 B)
        assert max(growth) <= 10 * largest + (64 << 10)
    assert rec._buffer.data.is_pinned()
    traj = rec.trajectory()
    assert torch.cuda.memory_allocated() <= start + (64 << 10)  # the warm-up left nothing on the device
    want = torch.stack(cpu_copy)
    got = traj.data.float() + (0 if traj.offset is None else traj.offset)
    if record_dtype == torch.float32:
        assert torch.equal(got, want)
    else:
        assert (got - want).abs().max() <= 1e-2 * float((want - want[0]).abs().max())


@cuda
@pytest.mark.parametrize("kind", ["float32", "bf16+offset", "pinned", "pinned bf16+offset"])
def test_decompose_on_cuda_equals_the_cpu(kind):
    w, labels, *_ = planted_trajectory(n=40_000, t=20, m=5, noise=1e-3, seed=8)
    if kind == "float32":
        traj = Trajectory.from_matrix(w)
    elif kind == "bf16+offset":
        traj = _bf16(w)
    elif kind == "pinned":  # a recording of CUDA tensors: rows are copied straight from pinned storage
        traj = Trajectory(w.T.contiguous().pin_memory())
    else:
        half = _bf16(w)
        traj = Trajectory(half.data.pin_memory(), None, None, half.offset.pin_memory())
    ref = decompose(traj, n_modes=5, seed=0)
    got = decompose(traj, n_modes=5, seed=0, device="cuda", chunk_rows=3_000)  # 14 chunks, 2 buffers
    assert got.labels.device.type == "cuda" and got.a.device.type == "cuda"
    assert same_partition(ref.labels, labels)
    _same(ref, got, exact=False, atol=1e-5)
    assert torch.equal(ref.labels, got.labels.cpu())


@cuda
def test_nonfinite_values_are_named_on_cuda():
    w, *_ = planted_trajectory(n=3_000, t=8, m=2, seed=9)
    w[2_345, 5] = float("inf")
    with pytest.raises(ValueError, match="row 2345, sample 5"):
        decompose(w, n_modes=2, seed=0, device="cuda", chunk_rows=100)


@cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_recording_a_model_spread_over_two_gpus():
    a, b = torch.nn.Linear(64, 64).to("cuda:0"), torch.nn.Linear(64, 8).to("cuda:1")
    model = torch.nn.ModuleDict({"a": a, "b": b})
    rec = modeopt.TrajectoryRecorder(model, max_snapshots=4)
    for k in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * k)
        rec.snapshot()
    want = torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()])
    assert torch.equal(rec.trajectory().data[-1], want)


@cuda
def test_cmd_optimizer_switches_on_the_gpu():
    dev = torch.device("cuda")
    model = _model(dev)
    base = torch.optim.SGD(model.parameters(), lr=0.05)
    opt = modeopt.CMDOptimizer(model, base, n_modes=4, warmup_steps=20, snapshot_every=2, seed=0,
                               exclude=lambda name, p: p.ndim < 2)
    x, y = torch.randn(64, 256, device=dev), torch.randint(0, 10, (64,), device=dev)
    for _ in range(22):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert opt.phase == "embedded"
    assert all(lab.device == dev for lab in opt.space.labels) and all(a.device == dev for a in opt.space.a)
