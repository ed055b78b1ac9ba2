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


# ---------------------------------------------------------------- half-precision gradients (bf16/fp16 models)
from modeopt.modespace.kernels import c_library, encoding, reference  # noqa: E402

#: With PIECE = HALF_PIECE (even, not a multiple of the 256-element block): piece boundaries in small
#: tensors, tails of the 8/16-label loads, of the block and of a piece, one weight.
HALF_SIZES = [2_501, 17, 8, 1, 1_000, 259]
HALF_PIECE = 1_000
#: label kind -> (M, labels of the kind from int64 ones): uint8, int16 read as uint16 (M > 32768), int32, packed
LABEL_KINDS = {
    "u8": (200, lambda i: i.to(torch.uint8)),
    "u16": (40_000, lambda i: i.to(torch.int16)),
    "i32": (1_000, lambda i: i.to(torch.int32)),
    "u4": (16, encoding.pack_labels),
}


def _half_case(g_dtype, a_dtype, kind, sizes=HALF_SIZES, exact=False, seed=0):
    """Per tensor: grads of ``g_dtype``, coefficients of ``a_dtype`` (int8: codes with float32 scales),
    the labels of ``kind`` and their int64 values. ``exact``: values whose products and float64 sums
    are exact in any order (small integers times powers of two; power-of-two scales)."""
    m, make = LABEL_KINDS[kind]
    gen = torch.Generator().manual_seed(seed)
    idx = [torch.randint(0, m, (n,), generator=gen) for n in sizes]
    if exact:
        grads = [(torch.randint(-64, 65, (n,), generator=gen) * 2.0 ** -8).to(g_dtype) for n in sizes]
        a = [torch.randint(-100, 101, (n,), generator=gen).to(torch.int8) if a_dtype == torch.int8
             else (torch.randint(-64, 65, (n,), generator=gen) * 2.0 ** -6).to(a_dtype) for n in sizes]
        scales = [2.0 ** torch.randint(-12, -4, (m,), generator=gen).float() for _ in sizes]
    else:
        # magnitudes over 2^-12..2^12: float64 sums of the products round, so their order shows
        grads = [(torch.randn(n, generator=gen) * 2.0 ** torch.randint(-12, 13, (n,), generator=gen)).to(g_dtype)
                 for n in sizes]
        if a_dtype == torch.int8:
            pairs = [encoding.quantize(torch.randn(n, generator=gen), i, m) for n, i in zip(sizes, idx)]
            a, scales = [p[0] for p in pairs], [p[1] for p in pairs]
        else:
            a, scales = [torch.randn(n, generator=gen).to(a_dtype) for n in sizes], []
    if a_dtype != torch.int8:
        scales = []
    if g_dtype == torch.float16:  # fp16 subnormals and the smallest normal take the other conversion branch
        grads[0][:3] = torch.tensor([2.0 ** -24, -3 * 2.0 ** -20, 2.0 ** -14])
    return grads, a, [make(i) for i in idx], idx, m, scales


def _in_bank_order(grads, a, idx, m, scales, packed):
    """The C reduction spelled out in torch: the reference's float32 products ``g.float() * a.float()``,
    summed in float64 per piece of PIECE elements into UNROLL banks (element j of a block of BLK = 256
    goes to bank j % 8 while the block's full groups of 8 labels (16 packed) last, the rest to bank 0;
    each bank sequentially, ``bincount`` on CPU), banks folded in order, pieces folded in order."""
    out = torch.zeros(m, dtype=torch.float64)
    width = 16 if packed else 8
    for t, (g, x, i) in enumerate(zip(grads, a, idx)):
        if g is None:
            continue
        p = (g.reshape(-1).to(torch.float32) * x.to(torch.float32)).double()
        n = p.numel()
        for s in range(0, n, cpu.PIECE):
            e = min(s + cpu.PIECE, n)
            j = torch.arange(e - s)
            in_block = j % 256
            block_len = torch.clamp((e - s) - (j - in_block), max=256)
            bank = torch.where(in_block < block_len // width * width, in_block % c_library.UNROLL, 0)
            acc = torch.bincount(bank * m + i[s:e], weights=p[s:e], minlength=c_library.UNROLL * m)
            folded = torch.zeros(m, dtype=torch.float64)
            for k in range(c_library.UNROLL):
                folded = folded + acc[k * m:(k + 1) * m]
            out = out + (folded if not scales else scales[t].double() * folded)
    return out


@needs_fused
@pytest.mark.parametrize("kind", list(LABEL_KINDS))
@pytest.mark.parametrize("a_dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("g_dtype", [torch.bfloat16, torch.float16])
def test_fused_reduce_of_half_grads_is_bitwise_the_reference(g_dtype, a_dtype, kind, monkeypatch):
    """bf16/fp16 grads (a bf16/fp16 model's) reduce in C bit for bit: each product the reference's
    float32 ``g.float() * a.float()``, summed in the float32 kernel's order; where every sum is exact the
    result is ``reference.reduce``'s exactly, and elsewhere it differs from it by float64 summation order only."""
    monkeypatch.setattr(cpu, "PIECE", HALF_PIECE)
    grads, a, labels, idx, m, scales = _half_case(g_dtype, a_dtype, kind)
    grads[2] = None  # skipped, with its coefficients and labels
    assert all(cpu._label_name(lab, x.numel()) == (kind if x.numel() > 1 or kind != "u4" else "u8")
               for lab, x in zip(labels, a))
    out = kernels.reduce(grads, a, labels, m, scales)
    assert torch.equal(out, _in_bank_order(grads, a, idx, m, scales, packed=kind == "u4"))
    as_f32 = [None if g is None else g.float() for g in grads]  # exact: the float32 kernel on the same values
    assert torch.equal(out, kernels.reduce(as_f32, a, labels, m, scales))
    ref = reference.reduce(grads, a, labels, m, scales or None)
    mag = reference.reduce([None if g is None else g.float().abs() for g in grads],
                           [x.float().abs() for x in a], labels, m, scales or None)
    assert bool(((out - ref).abs() <= 1e-13 * mag).all())
    grads, a, labels, idx, m, scales = _half_case(g_dtype, a_dtype, kind, exact=True, seed=1)
    out = kernels.reduce(grads, a, labels, m, scales)
    assert bool(out.abs().max() > 0) and torch.equal(out, reference.reduce(grads, a, labels, m, scales or None))


@needs_fused
def test_half_grads_take_the_c_kernels(monkeypatch):
    """bf16 and fp16 grads, also mixed with float32 ones in one call, never reach the torch reference
    (which unpacks labels and converts every grad: the slow backward of a bf16 model); float64 grads do."""
    calls = []
    real = reference.reduce
    monkeypatch.setattr(reference, "reduce", lambda *args: calls.append(1) or real(*args))
    grads, a, labels, idx, m, _ = _half_case(torch.bfloat16, torch.bfloat16, "u8", sizes=[1_000, 33, 300_001, 7])
    grads[1] = grads[1].half()
    grads[3] = grads[3].float()
    for g_dtype in (torch.bfloat16, torch.float16):
        assert cpu._fusable(([x.to(g_dtype) for x in grads], cpu._G), (a, cpu._A), labels=labels)
    out = kernels.reduce(grads, a, labels, m)
    assert calls == []
    assert torch.equal(out, _in_bank_order(grads, a, idx, m, [], packed=False))
    for threads in (2, 3):  # pieces of mixed dtypes in a fixed order: the same bits on any thread count
        monkeypatch.setattr(cpu, "THREADS", threads)
        monkeypatch.setattr(cpu, "_pool", None)
        assert torch.equal(kernels.reduce(grads, a, labels, m), out)
    assert calls == []
    kernels.reduce([g.double() for g in grads], a, labels, m)
    assert calls == [1]  # the counter sees the reference path


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
