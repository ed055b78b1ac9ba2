"""The fused mode-space kernels against their torch reference, and their fallbacks."""

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import modeopt
from modeopt.modespace.space import kernels
from modeopt.modespace.kernels import cpu
from workloads import SmallCNN, batches

needs_fused = pytest.mark.skipif(not kernels.fused_available(), reason="no C compiler: fused kernels unavailable")


def _data(sizes, m, a_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(n, generator=g) for n in sizes]
    a = [torch.randn(n, generator=g).to(a_dtype) for n in sizes]
    lab64 = [torch.randint(0, m, (n,), generator=g) for n in sizes]
    labels = [lab.to(kernels.label_dtype(m)) for lab in lab64]
    return grads, a, lab64, labels


@needs_fused
@pytest.mark.parametrize("m", [1, 10, 256, 300, 40_000, 70_000])
@pytest.mark.parametrize("a_dtype", [torch.float32, torch.bfloat16])
def test_fused_reduce_matches_float64_reference(m, a_dtype):
    sizes = [300_001, 17, 8, 1_000, 262_144]  # piece boundaries, tails, tiny tensors
    grads, a, lab64, labels = _data(sizes, m, a_dtype)
    assert labels[0].dtype == (torch.uint8 if m <= 256 else torch.int16 if m <= 65536 else torch.int32)
    ref = torch.zeros(m, dtype=torch.float64)
    for g, x, lab in zip(grads, a, lab64):
        ref.index_add_(0, lab, g.double() * x.float().double())
    fused = kernels.reduce(grads, a, labels, m)
    with kernels.use_fused(False):
        torch_path = kernels.reduce(grads, a, labels, m)
    scale = ref.abs().max()
    # each product is rounded once to float32 in the fused path: |error| <= 2^-24 |a g| per term
    assert float((fused - ref).abs().max() / scale) < 1e-6
    assert float((torch_path - ref).abs().max() / scale) < 1e-6


@needs_fused
def test_fused_reduce_is_bitwise_deterministic_across_thread_counts(monkeypatch):
    grads, a, _, labels = _data([2_000_000, 700_000], 10, torch.float32)
    out = []
    for threads in (1, 2, 3):
        monkeypatch.setattr(cpu, "THREADS", threads)
        out.append(kernels.reduce(grads, a, labels, 10))
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])


@needs_fused
@pytest.mark.parametrize("a_dtype", [torch.float32, torch.bfloat16])
def test_fused_update_matches_torch(a_dtype):
    sizes = [300_001, 17, 1_000]
    _, a, _, labels = _data(sizes, 300, a_dtype)
    w = [torch.randn(n) for n in sizes]
    w_ref = [x.clone() for x in w]
    delta = torch.randn(300)
    kernels.update(w, a, labels, delta)
    with kernels.use_fused(False):
        kernels.update(w_ref, a, labels, delta)
    for x, y in zip(w, w_ref):
        assert torch.allclose(x, y, rtol=0, atol=1e-6)  # fma vs separate rounding: last bit only


def test_update_of_a_channels_last_weight_follows_logical_order():
    w = torch.randn(4, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    lab = torch.randint(0, 3, (w.numel(),)).to(torch.uint8)
    a = torch.randn(w.numel())
    delta = torch.randn(3)
    expect = w + (a * delta[lab.long()]).view(w.shape)
    kernels.update([w], [a], [lab], delta)  # not contiguous: takes the torch path
    assert torch.allclose(w, expect, atol=1e-6)


def _train(mnist, steps, coef_dtype=torch.float32):
    xtr, ytr, *_ = mnist
    torch.manual_seed(0)
    model = SmallCNN()
    opt = modeopt.CMDOptimizer(model, torch.optim.Adam(model.parameters(), lr=1e-3), n_modes=6, warmup_steps=12,
                               snapshot_every=3, seed=0, progress=False, coef_dtype=coef_dtype)
    data = batches(xtr, ytr, 32, seed=0)
    for _ in range(steps):
        xb, yb = next(data)
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    return model, opt


@needs_fused
def test_fused_and_torch_paths_train_the_same(mnist):
    fused_model, fused_opt = _train(mnist, 25)
    assert fused_opt.space.labels[0].dtype == torch.uint8  # compact labels with the fused kernels
    with kernels.use_fused(False):
        ref_model, ref_opt = _train(mnist, 25)
        assert ref_opt.space.labels[0].dtype == torch.uint8  # compact labels on the torch path too (#16)
    for p, q in zip(fused_model.parameters(), ref_model.parameters()):
        if p.requires_grad or q.requires_grad:
            continue
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6)


def test_bf16_coefficients_keep_the_model_exactly_affine(mnist):
    """With a in bf16 the weights follow w = w_switch + a_bf16 * (r - r_switch)[m] exactly (to rounding)."""
    model, opt = _train(mnist, 12, coef_dtype=torch.bfloat16)
    space = opt.space
    assert space.a[0].dtype == torch.bfloat16
    w0 = [p.detach().clone() for p in space.params]
    r0 = space.r_full().detach().clone()
    xtr, ytr, *_ = mnist
    data = batches(xtr, ytr, 32, seed=3)
    for _ in range(5):
        xb, yb = next(data)
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    dr = space.r_full().detach() - r0
    assert bool(dr.abs().max() > 0)
    for p, w, a, lab in zip(space.params, w0, space.a, space.mode_index()):
        assert torch.allclose(p.view(-1), w.view(-1) + a.float() * dr[lab], atol=2e-6)


def test_build_cache_and_fallback_without_compiler(tmp_path, fresh_process):
    """A fresh cache builds the library once (in a new interpreter, as a user's first import does);
    without a compiler the torch path takes over (a fork of tests/_forkserver.py suffices there)."""
    code = textwrap.dedent("""
        import torch, modeopt, json
        from modeopt.modespace.space import kernels
        from workloads import SmallCNN
        m = SmallCNN(width=4)  # the size does not matter here: building, caching, falling back do
        opt = modeopt.CMDOptimizer(m, torch.optim.SGD(m.parameters(), lr=0.1), n_modes=2, warmup_steps=3,
                                   snapshot_every=1, n_samples=60, progress=False)
        for _ in range(5):
            opt.zero_grad(); m(torch.randn(4, 1, 28, 28)).sum().backward(); opt.step()
        print(json.dumps({"fused": kernels.fused_available(), "phase": opt.phase}))
    """)
    env = dict(os.environ, MODEOPT_CACHE=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert '"phase": "embedded"' in out.stdout
    if '"fused": true' in out.stdout:
        assert len(list(tmp_path.glob("kernels-*.so"))) == 1
    out = fresh_process.run(code, env={"CC": "/nonexistent/cc", "MODEOPT_CACHE": str(tmp_path / "empty")})
    assert out.returncode == 0, out.stderr[-3000:]
    assert '"fused": false' in out.stdout and '"phase": "embedded"' in out.stdout
