"""The switch at scale: sampling in O(K), the streamed decomposition straight into compact storage,
and memory-mapped recordings that do not stay resident."""

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modeopt
from modeopt import CMDOptimizer
from modeopt.decomposition.sampling import sample_weights
import modeopt.decomposition.sampling as sampling
from modeopt.modespace import kernels
from modeopt.modespace.streamed_switch import stream_mode_space
from modeopt.modespace.switch import initial_mode_space, move_to_fit
from modeopt.trajectories.layout import ParamLayout
from modeopt.trajectories.snapshots import SnapshotBuffer
from modeopt.trajectories.trajectory import Trajectory


def _direct_samples(moving, layer_sizes, k, rng):
    """The sampling rule written the direct way (lists every mover, copies the mask): the reference."""
    n_moving = int(moving.sum())
    if n_moving <= k:
        return torch.nonzero(moving).flatten()
    chosen = np.zeros(0, dtype=np.int64)
    if k // 2 > len(layer_sizes):
        per_layer, picks, offset = k // (2 * len(layer_sizes)), [], 0
        for size in layer_sizes:
            rows = torch.nonzero(moving[offset : offset + size]).flatten().numpy() + offset
            if min(per_layer, rows.size):
                picks.append(rng.choice(rows, size=min(per_layer, rows.size), replace=False))
            offset += size
        if picks:
            chosen = np.concatenate(picks)
    mask = moving.numpy().copy()
    mask[chosen] = False
    need = k - chosen.size
    if n_moving * 8 < mask.size:
        extra = rng.choice(np.flatnonzero(mask), size=need, replace=False)
    else:
        extra = np.zeros(0, dtype=np.int64)
        while extra.size < need:
            draw = rng.integers(0, mask.size, size=2 * (need - extra.size) + 64)
            draw = draw[mask[draw]]
            _, first = np.unique(draw, return_index=True)
            draw = draw[np.sort(first)][: need - extra.size]
            mask[draw] = False
            extra = np.concatenate([extra, draw])
    out = np.concatenate([chosen, extra.astype(np.int64)])
    out.sort()
    return torch.from_numpy(out)


@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_sampling_in_o_k_memory_draws_what_the_direct_rule_draws(monkeypatch, chunk):
    monkeypatch.setattr(sampling, "_CHUNK", chunk)  # 7: ranks located across many chunks
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        sizes = torch.randint(1, 3000, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g).tolist()
        moving = torch.rand(sum(sizes), generator=g) < float(torch.rand(1, generator=g))  # few to all movers
        k = int(torch.randint(1, 1200, (1,), generator=g))
        want = _direct_samples(moving, sizes, k, np.random.default_rng(trial))
        assert torch.equal(sample_weights(moving, sizes, k, np.random.default_rng(trial)), want), trial
        per_layer = list(moving.split(sizes))  # one mask per tensor, as the switch passes them
        assert torch.equal(sample_weights(per_layer, None, k, np.random.default_rng(trial)), want), trial


def _recording(seed=0, shapes=((40, 30), (30,), (50, 20), (7,)), t=9):
    torch.manual_seed(seed)
    lay = ParamLayout([f"p{i}" for i in range(len(shapes))], shapes)
    drive = torch.randn(3, t).cumsum(1)
    cols = []
    for i, s in enumerate(shapes):
        n = int(np.prod(s))
        cols.append(torch.randn(n, 1) * drive[i % 3] + 0.01 * torch.randn(n, t))
    data = torch.cat(cols).T.contiguous()
    data[:, -3:] = 0.5  # three weights that never move
    params = [x.reshape(s).clone() for x, s in zip(lay.unflatten(data[-1]).values(), shapes)]
    return lay, data, params


def _views(lay, data):
    return [Trajectory(data[:, s.offset : s.stop], ParamLayout([s.name], [s.shape]), list(range(data.shape[0])))
            for s in lay.specs]


@pytest.mark.parametrize("coef", [torch.float32, torch.bfloat16, torch.int8])
def test_streamed_switch_is_decompose_then_initial_mode_space(coef):
    lay, data, params = _recording()
    d = modeopt.decompose(Trajectory(data, lay), n_modes=4, n_samples=300, seed=3, progress=False)
    ref = initial_mode_space(d, lay, params, [0, 1, 0, 1], 2, "rms")
    trajs = _views(lay, data)
    ours = stream_mode_space(trajs, params, [0, 1, 0, 1], 2, n_modes=4, n_samples=300, seed=3, mode_scale="rms",
                             coef_dtype=coef)
    assert trajs == [None] * 4  # each recording released once its tensor was assigned
    assert ours.sizes == d.sizes.tolist() and ours.n_constant == 3 == int(d.constant.sum())
    assert torch.equal(ours.reference, d.reference) and torch.equal(ours.r_groups, ref.r_groups)
    torch.testing.assert_close(ours.r, ref.r, rtol=1e-6, atol=0)
    for j, (lab, a) in enumerate(zip(ours.labels, ours.a)):
        assert lab.dtype == kernels.label_dtype(4)
        assert torch.equal(lab.long(), ref.labels[j])  # same modes, same numbering (by size)
        if coef == torch.int8:
            assert a.dtype == torch.int8
            got = kernels.dequantize(a, ours.a_scale[j], lab.long())
            q, s = kernels.quantize(ref.a[j], ref.labels[j], 4)  # quantising the normalised a directly
            torch.testing.assert_close(got, kernels.dequantize(q, s, ref.labels[j]), rtol=2e-6, atol=1e-7)
        else:
            assert a.dtype == coef
            torch.testing.assert_close(a, ref.a[j].to(coef), rtol=1e-6, atol=0)


def test_streamed_fit_is_move_to_fit():
    lay, data, params = _recording(seed=1)
    d = modeopt.decompose(Trajectory(data, lay), n_modes=3, n_samples=200, seed=5, progress=False)
    want = [p.clone() for p in params]
    move_to_fit(d, lay, want, initial_mode_space(d, lay, want, [0] * 4, 1, "rms").reference_values)
    ours = stream_mode_space(_views(lay, data), params, [0] * 4, 1, n_modes=3, n_samples=200, seed=5,
                             mode_scale="rms", coef_dtype=torch.float32, fit=True)
    for f, w in zip(ours.fit, want):
        assert f.shape == w.shape
        torch.testing.assert_close(f, w, rtol=1e-6, atol=1e-7)


def test_streamed_switch_errors_before_anything_is_freed():
    lay, data, params = _recording()
    freed = []
    still = data[:1].expand_as(data).contiguous()
    with pytest.raises(ValueError, match="every weight is constant"):
        stream_mode_space(_views(lay, still), params, [0] * 4, 1, n_modes=2, n_samples=50, seed=0, mode_scale="rms",
                          coef_dtype=torch.float32, before_assign=lambda: freed.append(1))
    with pytest.raises(ValueError, match="n_modes=80 > the 50 weights"):
        stream_mode_space(_views(lay, data), params, [0] * 4, 1, n_modes=80, n_samples=50, seed=0, mode_scale="rms",
                          coef_dtype=torch.float32, before_assign=lambda: freed.append(1))
    bad = data.clone()
    bad[4, 1234] = float("nan")
    with pytest.raises(ValueError, match=r"'p2'.*sample 4"):
        stream_mode_space(_views(lay, bad), params, [0] * 4, 1, n_modes=2, n_samples=50, seed=0, mode_scale="rms",
                          coef_dtype=torch.float32, before_assign=lambda: freed.append(1))
    assert freed == []


def test_cmd_switch_frees_the_weights_state_before_the_full_pass(monkeypatch):
    """The base optimizer's state and the weights' gradients are gone while the assignment runs (the
    switch then needs no memory beyond what they held)."""
    import modeopt.modespace.streamed_switch as streamed

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = CMDOptimizer(model, torch.optim.Adam(model.parameters(), lr=1e-2), n_modes=2, warmup_steps=6,
                       snapshot_every=2, n_samples=100, seed=0)
    seen = {}
    real = streamed.assign_chunks

    def spy(*args, **kwargs):
        seen["state"] = sum(len(opt.base.state.get(p, {})) for p in model.parameters())
        seen["grads"] = sum(p.grad is not None for p in model.parameters())
        return real(*args, **kwargs)

    monkeypatch.setattr(streamed, "assign_chunks", spy)
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    for _ in range(6):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    assert opt.phase == "embedded" and seen == {"state": 0, "grads": 0}


def _rss_file_kib():
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile line")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="eviction uses Linux madvise")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_mapped_recording_does_not_stay_resident(tmp_path, dtype):
    n = 4_000_000  # 16 MB (float32) / 8 MB + a 16 MB anchor (bf16) per snapshot
    lay = ParamLayout(["w"], [(n,)])
    buf = SnapshotBuffer(n, dtype=dtype, capacity=4, directory=tmp_path)
    before = _rss_file_kib()
    values = []
    for step in range(4):
        w = torch.randn(n) * (1 + step)
        values.append(w)
        buf.append(lay, [w], step)
    grew = _rss_file_kib() - before
    assert grew < 4096, f"{grew} KiB of the recording stayed resident"
    data, steps = buf.raw()
    traj = Trajectory(data, None, steps, offset=buf.anchor, evict=buf.evict)
    before = _rss_file_kib()
    seen = []
    from modeopt.trajectories.streaming import stream_cols

    for i0, i1, x in stream_cols(traj, [(i, min(i + 500_000, n)) for i in range(0, n, 500_000)], torch.device("cpu")):
        seen.append(x.clone())
    assert _rss_file_kib() - before < 4096
    got = torch.cat(seen, dim=1)  # the values read back after eviction are the recorded ones
    want = torch.stack(values)
    if dtype == torch.float32:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=0, atol=0.02 * 4)


def test_a_half_precision_recording_keeps_its_anchor_in_the_weights_dtype():
    lay = ParamLayout(["w", "v"], [(300,), (40,)])
    w, v = torch.randn(300).bfloat16(), torch.randn(40).bfloat16()
    buf = SnapshotBuffer(340, dtype=torch.bfloat16, capacity=3)
    for step in range(3):
        buf.append(lay, [w + 0.01 * step, v - 0.02 * step], step)
    assert buf.anchor.dtype == torch.bfloat16  # exact: the first snapshot's bf16 values
    data, steps = buf.raw()
    values = Trajectory(data, lay, steps, buf.anchor).cols(0, 340)
    assert values.dtype == torch.float32
    assert torch.equal(values[0], torch.cat([w, v]).float())
    mixed = SnapshotBuffer(340, dtype=torch.bfloat16, capacity=3)
    mixed.append(lay, [w.float(), v], 0)
    assert mixed.anchor.dtype == torch.float32  # a float32 tensor needs a float32 baseline
    # checkpoints with either baseline load (a float32 one is what earlier versions saved)
    for saved in (buf.state_dict(), {**buf.state_dict(), "anchor": buf.anchor.float()}):
        again = SnapshotBuffer(340, dtype=torch.bfloat16, capacity=3)
        again.load_state_dict(saved)
        data, steps = again.raw()
        assert torch.equal(Trajectory(data, lay, steps, again.anchor).cols(0, 340), values)


def test_blockwise_frees_the_blocks_state_before_the_full_pass(monkeypatch):
    import modeopt.modespace.streamed_switch as streamed

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = modeopt.BlockwiseCMD(model, torch.optim.Adam(model.parameters(), lr=1e-2), blocks=["0.", "2."],
                               train_always=["4."], steps_per_block=4, n_modes=2, n_samples=60, seed=0)
    seen = []
    real = streamed.assign_chunks

    def spy(*args, **kwargs):
        block = [p for _, p in opt._emb[opt.active]]
        seen.append((sum(len(opt.base.state.get(p, {})) for p in block), sum(p.grad is not None for p in block)))
        return real(*args, **kwargs)

    monkeypatch.setattr(streamed, "assign_chunks", spy)
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    for _ in range(8):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    assert opt.phase == "embedded" and seen and all(s == (0, 0) for s in seen)
    assert len(opt.base.state[model[4].weight]) > 0  # the always-trained layer keeps its state
