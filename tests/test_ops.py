"""Issue #16: the torch.library operators, device-generic compact mode space, and the sync-free step.

* ``torch.ops.modeopt.*`` exist and pass ``torch.library.opcheck`` (schemas, fake impls, AOT dispatch);
* the CUDA implementations' routing (Triton where covered, the torch reference elsewhere) runs on
  CPU tensors in Triton's interpreter;
* labels are compact (uint8 / int16 holding uint16 / int32) on every path, bf16 ``a`` works on the
  torch path, and both paths compute the same mode gradients and updates;
* an embedded step with the device-side NaN/inf check performs no host synchronisation (``.item()``,
  ``bool(tensor)``, ... raise during ``opt.step()``), a zero-delta step leaves the weights as they
  were, and a non-finite step is undone on the device with the documented semantics;
* ``torch.compile(model, fullgraph=True)`` of an embedded model (the CPU rehearsal of
  ``tests/test_cuda.py`` covers a whole training step; here one forward + backward).
"""

import io
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modeopt
from modeopt.modespace.space import kernels
from modeopt.modespace.kernels import reference
from modeopt.modespace.space import ModeSpace
from modeopt.cmd_optimizer.optimizer import NonFiniteWarning

ROOT = Path(__file__).resolve().parents[1]
OPS = ("mode_reduce", "mode_update", "welford_sample", "mode_assign", "mode_form")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _inputs(sizes=(37, 5, 64), m=5, a_dtype=torch.float32, label_dtype=torch.uint8, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = [torch.randn(n, generator=g) for n in sizes]
    a = [torch.randn(n, generator=g).to(a_dtype) for n in sizes]
    lab = [torch.randint(0, m, (n,), generator=g).to(label_dtype) for n in sizes]
    return w, a, lab


# --------------------------------------------------------------------------- the operators
def test_ops_are_registered():
    for name in OPS:
        assert hasattr(torch.ops.modeopt, name), name
    schema = str(torch.ops.modeopt.mode_reduce.default._schema)
    assert "Tensor?[] grads" in schema and "Int n_modes" in schema and "-> Tensor" in schema
    assert torch.ops.modeopt.mode_update.default._schema.arguments[0].alias_info.is_write


@pytest.mark.parametrize("fused", [True, False])
def test_opcheck_every_op(fused):
    w, a, lab = _inputs()
    with kernels.use_fused(fused):
        torch.library.opcheck(torch.ops.modeopt.mode_reduce.default, ([w[0], None, w[2].view(8, 8)], a, lab, 5, []))
        torch.library.opcheck(torch.ops.modeopt.mode_update.default,
                              ([x.clone() for x in w], a, lab, torch.randn(5), []))
        # the 8-bit encoding: int8 codes, a scale per (tensor, mode), labels packed two per byte
        pairs = [kernels.quantize(x, l, 5) for x, l in zip(a, lab)]
        q, sc = [p[0] for p in pairs], [p[1] for p in pairs]
        packed = [kernels.pack_labels(l) for l in lab]
        torch.library.opcheck(torch.ops.modeopt.mode_reduce.default,
                              ([w[0], None, w[2].view(8, 8)], q, packed, 5, sc))
        torch.library.opcheck(torch.ops.modeopt.mode_update.default,
                              ([x.clone() for x in w], q, packed, torch.randn(5), sc))
        mean = [torch.randn(x.numel(), dtype=torch.float64) for x in w]
        com = [torch.randn(x.numel(), dtype=torch.float64) for x in w]
        torch.library.opcheck(torch.ops.modeopt.welford_sample.default,
                              (w, mean, com, lab, torch.randn(5, dtype=torch.float64), 3))
        b = [torch.randn(x.numel()) for x in w]
        torch.library.opcheck(torch.ops.modeopt.mode_assign.default,
                              ([x.clone() for x in w], a, b, lab, torch.randn(5)))
        torch.library.opcheck(torch.ops.modeopt.mode_form.default,
                              ([w[0].bfloat16(), w[1].half(), w[2].view(8, 8).bfloat16()], a, lab, torch.randn(5), []))


@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("a_dtype, label_dtype", [(torch.float32, torch.uint8), (torch.bfloat16, torch.int16),
                                                  (torch.float32, torch.int32)])
def test_form_is_one_rounding_bit_for_bit_on_every_cpu_path(w_dtype, a_dtype, label_dtype):
    """mode_form (C kernel, torch reference, the operator) = the float32 sum rounded once to the
    weight's dtype, bit for bit, over magnitudes from subnormal to large and small deltas (most sums
    fall between two neighbours, so rounding decides every element); the weights stay untouched."""
    g = torch.Generator().manual_seed(3)
    n, m = 4099, 300 if label_dtype != torch.uint8 else 7
    w = (torch.randn(n, generator=g) * torch.logspace(-7, 4, n)).to(w_dtype)
    w[:4] = torch.tensor([0.0, -0.0, float("inf"), -float("inf")]).to(w_dtype)
    a = torch.randn(n, generator=g).to(a_dtype)
    lab = torch.randint(0, m, (n,), generator=g).to(label_dtype)
    delta = torch.randn(m, generator=g) * 1e-3
    want = (w.float() + a.float() * delta[lab.long() & 0xFFFF]).to(w_dtype)
    before = w.clone()
    outs = [reference.form([w], [a], [lab], delta)[0], torch.ops.modeopt.mode_form([w], [a], [lab], delta, [])[0]]
    with kernels.use_fused(True):
        outs.append(kernels.form([w], [a], [lab], delta)[0])
    for out in outs:
        assert out.dtype == w_dtype and torch.equal(out.view(torch.int16), want.view(torch.int16))
    assert torch.equal(w.view(torch.int16), before.view(torch.int16))


@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 4099])
def test_form_of_the_8bit_encoding_matches_its_update(w_dtype, n):
    """int8 codes with per-mode scales and packed 4-bit labels: form = what mode_update does in place
    (``w + q * float32(scale * delta)[label]``, one rounding), C kernel and torch reference alike."""
    g = torch.Generator().manual_seed(4)
    m = 11
    w = torch.randn(n, generator=g).to(w_dtype)
    idx = torch.randint(0, m, (n,), generator=g)
    q, scale = kernels.quantize(torch.randn(n, generator=g), idx, m)
    packed = kernels.pack_labels(idx)
    delta = torch.randn(m, generator=g) * 1e-3
    want = w.clone()
    reference.update([want], [q], [packed], delta, [scale])
    with kernels.use_fused(True):
        fused = kernels.form([w], [q], [packed], delta, [scale])[0]
    for out in (fused, reference.form([w], [q], [packed], delta, [scale])[0],
                torch.ops.modeopt.mode_form([w], [q], [packed], delta, [scale])[0]):
        assert torch.equal(out.view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("m, label_dtype", [(5, torch.uint8), (40_000, torch.int16), (70_000, torch.int32)])
@pytest.mark.parametrize("a_dtype", [torch.float32, torch.bfloat16])
def test_torch_path_reads_compact_labels(m, label_dtype, a_dtype):
    """The torch reference indexes compact labels correctly (int16 holds uint16 values above 32767)."""
    assert kernels.label_dtype(m) == label_dtype
    sizes = (3_000, 17)
    g = torch.Generator().manual_seed(1)
    lab64 = [torch.randint(0, m, (n,), generator=g) for n in sizes]
    if m > 32768:
        lab64[0][:10] = m - 1  # values that need the unsigned reading
    lab = [x.to(label_dtype) for x in lab64]
    grads = [torch.randn(n, generator=g) for n in sizes]
    a = [torch.randn(n, generator=g).to(a_dtype) for n in sizes]
    ref = torch.zeros(m, dtype=torch.float64)
    for gg, x, l64 in zip(grads, a, lab64):
        ref.index_add_(0, l64, (gg * x.float()).double())
    delta = torch.randn(m)
    w = [torch.randn(n, generator=g) for n in sizes]
    expect = [x + y.float() * delta[l64] for x, y, l64 in zip(w, a, lab64)]
    for fused in (False, True):
        with kernels.use_fused(fused):
            out = kernels.reduce(grads, a, lab, m)
            assert torch.allclose(out, ref, rtol=1e-6, atol=1e-9), (fused, (out - ref).abs().max())
            ww = [x.clone() for x in w]
            kernels.update(ww, a, lab, delta)
            for x, e in zip(ww, expect):
                assert torch.allclose(x, e, rtol=0, atol=1e-6)


def test_cuda_routing_runs_triton_where_covered_in_the_interpreter():
    """The CUDA implementations (Triton where covered, the reference for the rest), called on CPU tensors
    in Triton's interpreter, equal the torch reference."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import json, torch
        from modeopt.modespace.space import kernels
        from modeopt.modespace.kernels import cuda, reference
        torch.manual_seed(0)
        out = {}
        m = 7
        sizes = (300, 33)
        w = [torch.randn(n) for n in sizes] + [torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)]
        a = [torch.randn(x.numel()) for x in w]
        a[1] = a[1].to(torch.bfloat16)
        lab = [torch.randint(0, m, (x.numel(),)).to(torch.uint8) for x in w]
        grads = [torch.randn_like(x) for x in w]
        grads[1] = None
        r = cuda.reduce(grads, a, lab, m)
        ref = reference.reduce(grads, a, lab, m)
        out["reduce"] = float((r - ref).abs().max() / ref.abs().max())  # float32 block sums: relative
        d = torch.randn(m)
        w1, w2 = [x.clone() for x in w], [x.clone() for x in w]
        cuda.update(w1, a, lab, d)   # tensor 2 is channels_last: the reference takes it
        reference.update(w2, a, lab, d)
        out["update"] = max(float((x - y).abs().max()) for x, y in zip(w1, w2))
        flat = [x.reshape(-1) for x in w[:2]]
        mu1 = [torch.randn(x.numel(), dtype=torch.float64) for x in flat]
        c1 = [torch.randn(x.numel(), dtype=torch.float64) for x in flat]
        mu2, c2 = [x.clone() for x in mu1], [x.clone() for x in c1]
        dr = torch.randn(m, dtype=torch.float64)
        cuda.welford(flat, mu1, c1, lab[:2], dr, 4)
        reference.welford(flat, mu2, c2, lab[:2], dr, 4)
        out["welford"] = max(float((x - y).abs().max()) for x, y in zip(mu1 + c1, mu2 + c2))
        b = [torch.randn(x.numel()) for x in flat]
        af = [x.float() for x in a[:2]]
        w1, w2 = [x.clone() for x in flat], [x.clone() for x in flat]
        cuda.assign(w1, af, b, lab[:2], d)
        reference.assign(w2, af, b, lab[:2], d)
        out["assign"] = max(float((x - y).abs().max()) for x, y in zip(w1, w2))
        # the per-device self-test of the first CUDA use, here on the interpreter's CPU tensors
        out["self_test"] = cuda.triton_self_test(torch.device("cpu"))
        import warnings
        from modeopt.modespace.kernels import triton_kernels
        good = triton_kernels.update
        triton_kernels.update = lambda *args: None  # a kernel that "runs" but writes nothing
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            out["broken_self_test"] = cuda.triton_self_test(torch.device("cpu"))
        triton_kernels.update = good
        out["warned"] = [str(w.message)[:80] for w in rec if issubclass(w.category, kernels.KernelWarning)]
        print(json.dumps(out))
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = json.loads(proc.stdout.strip().splitlines()[-1])
    assert err["reduce"] < 1e-6 and err["welford"] < 1e-12, err
    assert err["update"] < 1e-6 and err["assign"] < 1e-6, err
    assert err["self_test"] is True and err["broken_self_test"] is False, err
    assert len(err["warned"]) == 1 and "failed their self-test" in err["warned"][0], err


# --------------------------------------------------------------------------- compact, device-generic mode space
def _space(m, coef_dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(300, 200), nn.Tanh(), nn.Linear(200, 4))
    params = [(n, p) for n, p in model.named_parameters() if p.ndim == 2]
    g = torch.Generator().manual_seed(seed)
    labels = [torch.randint(0, m, (p.numel(),), generator=g) for _, p in params]
    a = [torch.randn(p.numel(), generator=g) for _, p in params]
    space = ModeSpace(model, params, labels, a, torch.zeros(m, dtype=torch.int64), torch.randn(m, generator=g),
                      coef_dtype=coef_dtype)
    return model, space, labels


@pytest.mark.parametrize("m, dtype", [(10, torch.uint8), (300, torch.int16), (40_000, torch.int16)])
@pytest.mark.parametrize("coef_dtype", [torch.float32, torch.bfloat16])
def test_compact_labels_without_the_fused_kernels(m, dtype, coef_dtype):
    x = torch.randn(16, 300)
    with kernels.use_fused(False):
        model, space, labels = _space(m, coef_dtype)
        assert all(lab.dtype == dtype for lab in space.labels)
        assert all(a.dtype == coef_dtype for a in space.a)
        assert all(torch.equal(i, lab) for i, lab in zip(space.mode_index(), labels))
        model(x).square().sum().backward()
        g_torch = space.r_params[0].grad.clone()
    # the reference: sum over each mode of a * dL/dw, computed with autograd on plain weights
    ref_model = nn.Sequential(nn.Linear(300, 200), nn.Tanh(), nn.Linear(200, 4))
    ref_model.load_state_dict(model.state_dict())
    ref_model(x).square().sum().backward()
    ref = torch.zeros(m, dtype=torch.float64)
    for p, a, lab in zip([ref_model[0].weight, ref_model[2].weight], space.a, labels):
        ref.index_add_(0, lab, (p.grad.reshape(-1) * a.float()).double())
    assert torch.allclose(g_torch.double(), ref, rtol=1e-4, atol=1e-5)
    space.r_params[0].grad = None
    model(x).square().sum().backward()  # fused path (where available) on the same compact labels
    assert torch.allclose(space.r_params[0].grad, g_torch, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- the sync-free embedded step
def _embedded(base="sgd", check="device", coef_dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    if base == "sgd":
        b = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        b = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt = modeopt.CMDOptimizer(model, b, n_modes=2, warmup_steps=6, snapshot_every=2, n_samples=20, seed=0,
                               progress=False, coef_dtype=coef_dtype)
    opt.nonfinite_check = check
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
    for _ in range(7):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert opt.phase == "embedded"
    return model, opt, x, y


def _no_host_sync(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("host synchronisation in the embedded step")

    for name in ("item", "__bool__", "__int__", "__float__", "tolist", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


def test_embedded_step_performs_no_host_sync(monkeypatch):
    model, opt, x, y = _embedded()
    opt.nonfinite_poll_every = 0
    before = [p.detach().clone() for p in opt.space.params]
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with monkeypatch.context() as mp:
            _no_host_sync(mp)
            opt.step()
    assert not all(torch.equal(p, q) for p, q in zip(opt.space.params, before))  # it did train
    assert opt.skipped_steps == 0


def test_zero_delta_step_writes_nothing_and_does_not_sync(monkeypatch):
    model, opt, x, y = _embedded()
    opt.base.param_groups[0]["momentum"] = 0.0  # a zero gradient then leaves r where it is
    opt.nonfinite_poll_every = 0
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    r = [p.detach().clone() for p in opt.space.r_params]
    opt.zero_grad()
    (0.0 * model(x).sum()).backward()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in opt.space.r_params)
    with monkeypatch.context() as mp:
        _no_host_sync(mp)
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(opt.space.r_params, r))
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k


@pytest.mark.parametrize("base", ["sgd", "adam"])
def test_device_check_undoes_a_non_finite_step(monkeypatch, base):
    """nonfinite_check="device": a NaN loss is undone on the device (r, its optimizer state, the weights),
    counted lazily and warned about once; the skipped step counts toward the schedule (opt._step)."""
    model, opt, x, y = _embedded(base)
    ref_model, ref, _, _ = _embedded(base)
    opt.nonfinite_poll_every = 0
    state = {k: v.clone() for k, v in opt.state[opt.space.r_params[0]].items()}
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    r = opt.space.r_params[0].detach().clone()
    opt.zero_grad()
    (F.cross_entropy(model(x), y) * float("nan")).backward()
    with monkeypatch.context() as mp:
        if base == "sgd":  # (torch's Adam reads its CPU step counter with .item() itself)
            _no_host_sync(mp)
        opt.step()  # no host sync even for the bad step: nothing is reported yet
    assert opt._step == 8  # counted, unlike the host check
    assert torch.equal(opt.space.r_params[0].detach(), r)
    for k, v in opt.state[opt.space.r_params[0]].items():
        assert torch.equal(v, state[k]), k
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    with pytest.warns(NonFiniteWarning, match=r"by step 8, 1 embedded step\(s\) had NaN/inf .* skipped on cpu"):
        assert opt.skipped_steps == 1
    # the next good step equals a run that never saw the bad one (SGD/Adam state restored exactly;
    # Adam's step counter is on r's device here, so it is restored too)
    for o, m in ((opt, model), (ref, ref_model)):
        o.zero_grad()
        F.cross_entropy(m(x), y).backward()
        with warnings.catch_warnings():
            warnings.simplefilter("error", NonFiniteWarning)
            o.step()
    for (k, v), w in zip(model.state_dict().items(), ref_model.state_dict().values()):
        assert torch.equal(v, w), k
    assert opt.skipped_steps == 1 and ref.skipped_steps == 0


def test_device_check_puts_back_a_non_finite_new_r():
    model, opt, x, y = _embedded()
    opt.nonfinite_poll_every = 1  # the warning comes at the step itself
    r = opt.space.r_params[0].detach().clone()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    opt.param_groups[0]["lr"] = float("inf")
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.warns(NonFiniteWarning, match="skipped on cpu"):
        opt.step()
    assert torch.equal(opt.space.r_params[0].detach(), r) and opt._step == 8
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert opt.skipped_steps == 1
    opt.nonfinite_check = "sometimes"
    with pytest.raises(ValueError, match="nonfinite_check must be"):
        opt.step()


def test_state_dict_across_devices_with_map_location():
    """Compact labels and bf16 a survive save -> load(map_location) -> resume, bit for bit."""
    torch.manual_seed(0)

    def make():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
        o = modeopt.CMDOptimizer(m, torch.optim.AdamW(m.parameters(), lr=1e-2), n_modes=3, warmup_steps=6,
                                 snapshot_every=2, n_samples=30, seed=0, progress=False, coef_dtype=torch.bfloat16)
        return m, o

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)

    def steps(m, o, k):
        for _ in range(k):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()

    model, opt = make()
    steps(model, opt, 8)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    sd = opt.state_dict()["cmd"]["space"]
    assert all(lab.dtype == torch.uint8 for lab in sd["labels"]) and all(a.dtype == torch.bfloat16 for a in sd["a"])
    steps(model, opt, 3)
    ckpt = torch.load(io.BytesIO(buf.getvalue()), map_location="cpu", weights_only=True)
    m2, o2 = make()
    m2.load_state_dict(ckpt["model"])
    o2.load_state_dict(ckpt["opt"])
    assert all(lab.dtype == torch.uint8 for lab in o2.space.labels) and o2.space.a[0].dtype == torch.bfloat16
    steps(m2, o2, 3)
    for (k, v), w in zip(model.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(v, w), k


# --------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("coef_dtype", [torch.float32, torch.int8])
def test_compile_fullgraph_forward_backward(coef_dtype):
    """One compiled forward + backward of an embedded model (fullgraph=True) gives eager's dL/dr (also with
    the 8-bit encoding, whose scales enter the traced backward as tensors)."""
    model, opt, x, y = _embedded(coef_dtype=coef_dtype)
    assert opt.space.a[0].dtype == coef_dtype
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    eager = [p.grad.clone() for p in opt.space.r_params]
    opt.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = F.cross_entropy(compiled(x), y)
    loss.backward()
    for g, e in zip((p.grad for p in opt.space.r_params), eager):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    # the hooks restored the bare parameters after the compiled call
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("coef_dtype", [torch.float32, torch.int8])
def test_eager_calls_through_the_operators_equal_the_direct_cpu_path(monkeypatch, fused, coef_dtype):
    """On CPU, eager calls skip the dispatcher (kernels.CPU_DIRECT); through it they are bit-identical."""
    results = []
    for direct in (True, False):
        monkeypatch.setattr(kernels, "CPU_DIRECT", direct)
        with kernels.use_fused(fused):
            model, opt, x, y = _embedded(coef_dtype=coef_dtype)
            for _ in range(3):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
        results.append({k: v.clone() for k, v in model.state_dict().items()})
    for k, v in results[0].items():
        assert torch.equal(v, results[1][k]), k
