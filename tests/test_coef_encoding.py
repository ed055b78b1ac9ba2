"""The compact 8-bit encoding of a mode space (``coef_dtype=torch.int8``): int8 codes with a scale per
(tensor, mode), labels packed 4 bits per weight for M <= 16 (modeopt/modespace/kernels/encoding.py).

Kernels (C, torch reference; Triton in tests/_triton_check.py "encoding"), the mode space it builds
(1.5 bytes per weight, weights untouched at the switch, exactly ``w_switch + q s (r - r_switch)``
afterwards), the trainers' arguments, checkpoints (bit-for-bit resume, old checkpoints, damaged
ones refused) and export.
"""

import copy
import io
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modeopt
from modeopt.modespace import kernels
from modeopt.modespace.kernels import cpu, encoding, reference

sys.path.insert(0, str(Path(__file__).parent))
from _small import _one_thread  # noqa: E402,F401  (fixture)
from test_blockwise import PER_BLOCK, make as make_blockwise, train as train_blockwise  # noqa: E402

needs_fused = pytest.mark.skipif(not kernels.fused_available(), reason="no C compiler: fused kernels unavailable")


# ------------------------------------------------------------------------------ the encoding itself
@pytest.mark.parametrize("n", [0, 1, 2, 7, 64])
def test_labels_pack_two_per_byte_and_unpack_exactly(n):
    idx = torch.randint(0, 16, (n,), generator=torch.Generator().manual_seed(n))
    packed = encoding.pack_labels(idx)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 1) // 2
    assert torch.equal(encoding.unpack_labels(packed, n).long(), idx)
    if n >= 2:
        assert int(packed[0]) == int(idx[0]) | (int(idx[1]) << 4)  # element 0 in the low nibble
    assert encoding.is_packed(packed, n) == (n >= 2)


def test_quantize_uses_the_full_range_of_each_mode_in_each_tensor():
    a = torch.tensor([0.5, -2.0, 1.0, 0.0, 3.0, 1e-3, 0.0])
    idx = torch.tensor([0, 0, 0, 1, 2, 2, 3])
    q, scale = encoding.quantize(a, idx, 5)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert q.tolist() == [32, -127, 64, 0, 127, 0, 0]  # round(0.5 / (2 / 127)) = 32
    assert scale.tolist() == pytest.approx([2 / 127, 0.0, 3 / 127, 0.0, 0.0])  # modes 1, 3 (zeros), 4 (absent): 0
    back = encoding.dequantize(q, scale, idx)
    assert (back - a).abs().max() <= 0.5 * 3 / 127 + 1e-7  # half a step of the widest mode


# ------------------------------------------------------------------------------------- the kernels
def _encoded(sizes, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = [torch.randint(0, m, (n,), generator=g) for n in sizes]
    pairs = [encoding.quantize(torch.randn(n, generator=g), i, m) for n, i in zip(sizes, idx)]
    labels = [encoding.pack_labels(i) if m <= 16 else i.to(kernels.label_dtype(m)) for i in idx]
    grads = [torch.randn(n, generator=g) for n in sizes]
    return grads, [p[0] for p in pairs], [p[1] for p in pairs], labels, idx


SIZES = [300_001, 17, 8, 1, 1_000, 262_146]  # piece boundaries (2**18), odd sizes, one weight


@needs_fused
@pytest.mark.parametrize("m", [3, 16, 40])
def test_fused_reduce_and_update_of_codes_match_the_float64_definition(m):
    """dL/dr_m = sum_t s[t, m] * sum_i q_i g_i and w += q * float32(s * delta)[m], packed (m <= 16) or not."""
    grads, q, scales, labels, idx = _encoded(SIZES, m)
    grads[1] = None
    ref = torch.zeros(m, dtype=torch.float64)
    mag = torch.zeros(m, dtype=torch.float64)
    for g, x, s, i in zip(grads, q, scales, idx):
        if g is not None:
            v = g.double() * x.double() * s.double()[i]
            ref += torch.bincount(i, weights=v, minlength=m)
            mag += torch.bincount(i, weights=v.abs(), minlength=m)
    for fused in (True, False):
        with kernels.use_fused(fused):
            out = kernels.reduce(grads, q, labels, m, scales)
        assert out.dtype == torch.float64 and bool(((out - ref).abs() <= 1e-6 * mag + 1e-12).all()), fused
    delta = torch.randn(m)
    w0 = [torch.randn(n) for n in SIZES]
    expect = [w + x.float() * (s * delta)[i] for w, x, s, i in zip(w0, q, scales, idx)]
    for fused in (True, False):
        w = [x.clone() for x in w0]
        with kernels.use_fused(fused):
            kernels.update(w, q, labels, delta, scales=scales)
        for x, e in zip(w, expect):
            assert torch.allclose(x, e, rtol=0, atol=1e-6)  # fma vs separate rounding: last bit only


@needs_fused
def test_fused_reduce_of_codes_is_deterministic_across_thread_counts(monkeypatch):
    grads, q, scales, labels, _ = _encoded(SIZES, 10, seed=3)
    out = []
    for threads in (1, 2, 3):
        monkeypatch.setattr(cpu, "THREADS", threads)
        monkeypatch.setattr(cpu, "_pool", None)
        out.append(kernels.reduce(grads, q, labels, 10, scales))
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])


def test_codes_without_scales_are_refused():
    w, q = [torch.zeros(4)], [torch.ones(4, dtype=torch.int8)]
    lab = [torch.zeros(2, dtype=torch.uint8)]
    for fused in (True, False):
        with kernels.use_fused(fused), pytest.raises(ValueError, match="need their scales"):
            cpu.update(w, q, lab, torch.ones(3))
    assert reference.unpacked(lab[0], 4).numel() == 4


# ------------------------------------------------------------------------------- CMDOptimizer
X = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(1))


def _cmd(coef_dtype=torch.int8, seed=0, n_modes=4):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))
    opt = modeopt.CMDOptimizer(model, torch.optim.Adam(model.parameters(), lr=1e-2), n_modes=n_modes,
                               warmup_steps=10, snapshot_every=2, n_samples=60, seed=0, coef_dtype=coef_dtype,
                               progress=False)
    return model, opt


def _steps(model, opt, k):
    for _ in range(k):
        opt.zero_grad()
        F.cross_entropy(model(X), Y).backward()
        opt.step()


def test_switch_leaves_the_weights_and_they_move_exactly_along_the_quantised_directions():
    model, opt = _cmd()
    seen = {}
    opt.register_phase_hook(lambda o, event: seen.setdefault(event, [p.detach().clone() for p in model.parameters()]))
    _steps(model, opt, 10)
    s = opt.space
    assert opt.phase == "embedded" and all(x.dtype == torch.int8 for x in s.a)
    for p, q in zip(seen["pre_embed"], seen["embedded"]):
        assert torch.equal(p, q)  # quantising a moved no weight
    w0 = [p.detach().double().reshape(-1).clone() for p in s.params]
    r0 = s.r_full().detach().double().clone()
    _steps(model, opt, 30)
    dr = s.r_full().detach().double() - r0
    assert dr.abs().max() > 1e-3
    for p, w, q, sc, i in zip(s.params, w0, s.a, s.a_scale, s.mode_index()):
        exact = w + q.double() * sc.double()[i] * dr[i]
        assert (p.detach().double().reshape(-1) - exact).abs().max() < 1e-5  # float32 rounding of 30 steps


def test_gradient_of_r_is_the_quantised_projection():
    model, opt = _cmd()
    _steps(model, opt, 12)
    s = opt.space
    opt.zero_grad()
    F.cross_entropy(model(X), Y).backward()
    got = s.r_full().grad if len(s.r_params) == 1 else torch.cat([r.grad for r in s.r_params])[s._gather]
    # the same loss with plain float32 weights: autograd's dL/dw, projected with a = q * scale
    plain = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))
    plain.load_state_dict(model.state_dict())
    F.cross_entropy(plain(X), Y).backward()
    grads = {n: p.grad for n, p in plain.named_parameters()}
    want = torch.zeros(s.n_modes, dtype=torch.float64)
    for name, a, i in zip(s.names, s.coefficients(), s.mode_index()):
        want.index_add_(0, i, (grads[name].reshape(-1).double() * a.double()))
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-7)


def test_storage_is_one_and_a_half_bytes_per_weight_plus_the_scales():
    model, opt = _cmd(n_modes=4)
    _steps(model, opt, 10)
    s = opt.space
    b = s.storage_bytes()
    n = sum(p.numel() for p in s.params)
    assert b["weights"] == n and b["a"] == n  # one byte per code
    assert b["labels"] == sum((p.numel() + 1) // 2 for p in s.params)  # two labels per byte
    assert b["scales"] == 4 * s.n_modes * len(s.params)
    assert all(lab.numel() == (p.numel() + 1) // 2 for lab, p in zip(s.labels, s.params))


def test_more_than_16_modes_keep_byte_labels():
    model, opt = _cmd(n_modes=20)
    _steps(model, opt, 10)
    s = opt.space
    assert s.n_modes > 16 and all(lab.numel() == p.numel() and lab.dtype == torch.uint8
                                  for lab, p in zip(s.labels, s.params))
    _steps(model, opt, 2)


def test_bad_coef_dtype_says_what_is_accepted():
    model = nn.Linear(4, 2)
    with pytest.raises(ValueError, match="torch.int8"):
        modeopt.CMDOptimizer(model, torch.optim.Adam(model.parameters()), coef_dtype=torch.int16)
    with pytest.raises(ValueError, match="torch.int8"):
        modeopt.BlockwiseCMD(model, torch.optim.Adam(model.parameters()), [""], steps_per_block=3,
                             coef_dtype=torch.float16)


def test_resume_is_bit_for_bit_and_the_checkpoint_is_stored_compactly():
    model, opt = _cmd()
    _steps(model, opt, 14)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    space = opt.state_dict()["cmd"]["space"]
    assert [t.dtype for t in space["a"]] == [torch.int8] * 4 and len(space["a_scale"]) == 4
    assert all(lab.numel() == (p.numel() + 1) // 2 for lab, p in zip(space["labels"], opt.space.params))
    _steps(model, opt, 5)
    model2, opt2 = _cmd(coef_dtype=torch.float32, seed=5)  # the checkpoint's encoding wins
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    model2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    assert opt2.space.a[0].dtype == torch.int8
    _steps(model2, opt2, 5)
    for (k, v), w in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(v, w), k
    exported = opt2.export()
    assert all(p.requires_grad for p in exported.parameters())
    assert set(exported.state_dict()) == set(model.state_dict())


def test_a_float_checkpoint_loads_into_an_int8_optimizer():
    """Checkpoints from before the encoding (float a, byte labels, no a_scale) still load."""
    model, opt = _cmd(coef_dtype=torch.bfloat16)
    _steps(model, opt, 12)
    ck = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    assert "a_scale" not in ck["opt"]["cmd"]["space"]
    model2, opt2 = _cmd(coef_dtype=torch.int8, seed=3)
    model2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    assert opt2.space.a[0].dtype == torch.int8  # quantised on entry; weights as saved
    for v, w in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(v, w)
    _steps(model2, opt2, 2)


@pytest.mark.parametrize("damage", ["label", "scale", "codes", "missing"])
def test_damaged_int8_checkpoints_are_refused_and_change_nothing(damage):
    model, opt = _cmd(n_modes=3)
    _steps(model, opt, 12)
    ck = copy.deepcopy(opt.state_dict())
    sp = ck["cmd"]["space"]
    m = sp["r"].numel()
    if damage == "label":
        sp["labels"][0][0] = 15 | (15 << 4)  # nibble 15 >= M
    elif damage == "scale":
        sp["a_scale"][1][0] = float("nan")
    elif damage == "codes":
        sp["a"][0] = sp["a"][0].float()
    else:
        sp["a_scale"] = sp["a_scale"][:1]
    model2, opt2 = _cmd(seed=4)
    _steps(model2, opt2, 3)
    before = {k: v.clone() for k, v in model2.state_dict().items()}
    with pytest.raises(ValueError, match="damaged|int8|a_scale|labels"):
        opt2.load_state_dict(ck)
    assert opt2.phase == "warmup" and opt2.step_count == 3 and m == 3
    assert all(torch.equal(v, model2.state_dict()[k]) for k, v in before.items())


# -------------------------------------------------------------------------------- BlockwiseCMD
def test_blockwise_int8_resumes_bit_for_bit_after_a_finished_block():
    save_at = PER_BLOCK + 2
    model, opt = make_blockwise(coef_dtype=torch.int8)
    train_blockwise(model, opt, save_at)
    assert opt.spaces[0].a[0].dtype == torch.int8 and opt.spaces[0].a_scale is not None
    assert opt.spaces[0].labels[0].numel() == (opt.spaces[0].params[0].numel() + 1) // 2
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    rest = train_blockwise(model, opt, 2 * PER_BLOCK, save_at)
    model2, opt2 = make_blockwise(seed=7, coef_dtype=torch.int8)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    model2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    assert train_blockwise(model2, opt2, 2 * PER_BLOCK, save_at) == rest
    for (n, p), (_, q) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(p, q), n
    ck = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    ck["opt"]["blockwise"]["spaces"][0]["a_scale"][0][0] = -1.0
    with pytest.raises(ValueError, match="a_scale"):
        make_blockwise(seed=7, coef_dtype=torch.int8)[1].load_state_dict(ck["opt"])
