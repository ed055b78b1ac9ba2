"""bfloat16/float16 weights stay exact in mode space (issue 25): every embedded weight, as the model
computes with it and as ``model.state_dict()``/``export()`` give it, equals its value at the switch
plus ``a * (r - r_switch)[m]`` summed in float32 and rounded once (<= 1 ulp from the exact value),
after >= 1,000 embedded steps, in every mode-space path; checkpoints resume bit for bit, old ones load.

(The FSDP2 path is tested in tests/test_fsdp.py, ``test_half_precision_*``: it needs real ranks.)
"""

from __future__ import annotations

import copy
import io
import weakref

import pytest
import torch
from torch import nn

import modeopt
from modeopt import OnlineCMDOptimizer
from modeopt.modespace import kernels
from modeopt.modespace.space import ModeSpace
from _small import _one_thread  # noqa: F401  (fixture)

HALF = [torch.bfloat16, torch.float16]
STEPS = 1000  # embedded steps of the exactness tests

X = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
Y = (X[:, 0] + 0.5 * X[:, 1] > 0).long()


def ulps(x: torch.Tensor, y: torch.Tensor) -> int:
    """Largest distance in units in the last place between two half-precision tensors (bits ordered)."""
    def ordered(t):
        i = t.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -(i & 0x7FFF), i)
    return int((ordered(x) - ordered(y)).abs().max()) if x.numel() else 0


def mlp(dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2)).to(dtype)


def cmd(dtype, **kw):
    model = mlp(dtype)
    args = dict(n_modes=3, warmup_steps=8, snapshot_every=2, seed=0, progress=False)
    args.update(kw)
    # eps 1e-3: the float16 warm-up steps the weights themselves (AdamW's 1e-8 underflows in fp16)
    return model, modeopt.CMDOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-3), **args)


def step(model, opt, i: int = 0) -> None:
    opt.zero_grad()
    x = X.roll(i, 0).to(next(model.parameters()).dtype)
    nn.functional.cross_entropy(model(x).float(), Y.roll(i, 0)).backward()
    opt.step()


def check_exact(space: ModeSpace, w_switch, r_switch, state: dict[str, torch.Tensor], prefix: str = "") -> None:
    """``state`` (a model state dict) holds, for every embedded weight, round(w_switch + a * dr[m]) with
    the sum in float32 (bit for bit), <= 1 ulp from the same sum in float64."""
    r = space.r_full().detach()
    for name, a, lab, w0 in zip(space.names, space.a, space.mode_index(), w_switch):
        got = state[prefix + name].reshape(-1)
        f32 = (w0.float().reshape(-1) + a.float() * (r - r_switch)[lab]).to(got.dtype)
        f64 = (w0.double().reshape(-1) + a.double() * (r.double() - r_switch.double())[lab]).to(got.dtype)
        assert torch.equal(got.view(torch.int16), f32.view(torch.int16)), name
        assert ulps(got, f64) <= 1, name
        assert not torch.equal(got, w0.reshape(-1)), f"{name} did not move"


# ------------------------------------------------------------------------------------ CMDOptimizer
@pytest.mark.parametrize("dtype", HALF)
def test_cmd_optimizer_half_weights_stay_exact_over_a_thousand_steps(dtype):
    model, opt = cmd(dtype)
    for i in range(8):
        step(model, opt, i)
    space = opt.space
    assert space is not None and space.half == [0, 1, 2, 3]
    w_switch = [p.detach().clone() for p in space.params]
    r_switch = space.r_full().detach().clone()
    for i in range(STEPS):
        step(model, opt, i)
    assert all(torch.equal(p, w) for p, w in zip(space.params, w_switch))  # the bases stay frozen
    check_exact(space, w_switch, r_switch, model.state_dict())
    # the model computes with these values: the same outputs as a plain model holding them
    plain = mlp(dtype)
    plain.load_state_dict(model.state_dict())
    x = X.to(dtype)
    assert torch.equal(model(x), plain(x))
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
    # and export() hands them over
    state = model.state_dict()
    opt.export()
    check_exact(space, w_switch, r_switch, dict(model.named_parameters()))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(p.requires_grad for p in model.parameters())


def test_half_weights_with_8bit_coefficients_stay_exact():
    """coef_dtype=torch.int8 (codes, per-mode scales, 4-bit labels) on bf16 weights: formed as
    w_switch + q * float32(scale * dr)[m], rounded once: <= 1 ulp from the float64 value of a * dr."""
    model, opt = cmd(torch.bfloat16, coef_dtype=torch.int8)
    for i in range(8):
        step(model, opt, i)
    space = opt.space
    w_switch = [p.detach().clone() for p in space.params]
    r_switch = space.r_full().detach().clone()
    for i in range(200):
        step(model, opt, i)
    state = model.state_dict()
    dr = space.r_full().detach() - r_switch
    for name, q, sc, lab, a, w0 in zip(space.names, space.a, space.a_scale, space.mode_index(),
                                       space.coefficients(), w_switch):
        got = state[name].reshape(-1)
        want = (w0.float().reshape(-1) + q.float() * (sc * dr)[lab]).to(torch.bfloat16)
        assert torch.equal(got, want), name
        assert ulps(got, (w0.double().reshape(-1) + a.double() * dr.double()[lab]).to(torch.bfloat16)) <= 1


@pytest.mark.parametrize("dtype", HALF)
def test_gradient_of_r_is_the_formed_weights_gradient_reduced(dtype):
    """dL/dr = sum a_i dL/dw_i with dL/dw taken at the formed (current) weights."""
    model, opt = cmd(dtype)
    for i in range(30):
        step(model, opt, i)
    space = opt.space
    plain = mlp(dtype)
    plain.load_state_dict(model.state_dict())
    x = X.to(dtype)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x).float(), Y).backward()
    nn.functional.cross_entropy(plain(x).float(), Y).backward()
    grads = [dict(plain.named_parameters())[n].grad for n in space.names]
    want = kernels.reduce(grads, space.a, space.labels, space.n_modes).float()
    got = space.r_full().grad if len(space.r_params) > 1 else space.r_params[0].grad
    torch.testing.assert_close(got, space.group_values(want)[0] if len(space.r_params) == 1 else want,
                               rtol=0, atol=0)


def test_backward_keeps_no_formed_weight_alive(monkeypatch):
    """Autograd saves a token for a formed weight, not the weight: after the forward, none of the
    formed tensors is alive (the backward forms them again)."""
    model, opt = cmd(torch.bfloat16)
    for i in range(10):
        step(model, opt, i)
    space = opt.space
    made: list = []
    real = ModeSpace._form

    def recording(self, index, delta=None):
        out = real(self, index, delta)
        made.extend(weakref.ref(t) for t in out.values())
        return out

    monkeypatch.setattr(ModeSpace, "_form", recording)
    loss = nn.functional.cross_entropy(model(X.bfloat16()).float(), Y)
    assert len(made) == 4 and all(ref() is None for ref in made)
    made.clear()
    loss.backward()  # the two Linear layers' weights are formed again for grad_input (bias: not saved)
    assert 1 <= len(made) <= 4 and space.has_grad()


def test_saved_tensor_hooks_already_active_still_apply():
    """A forward under torch.autograd.graph.save_on_cpu (or any saved-tensor hooks) still hands the
    activations to those hooks; the result is the same."""
    model, opt = cmd(torch.bfloat16)
    for i in range(10):
        step(model, opt, i)
    packed = []

    def pack(t):
        packed.append(t.shape)
        return t

    x = X.bfloat16()
    opt.zero_grad()
    loss_plain = nn.functional.cross_entropy(model(x).float(), Y)
    loss_plain.backward()
    g_plain = opt.space.r_params[0].grad.clone()
    opt.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = nn.functional.cross_entropy(model(x).float(), Y)
    loss.backward()
    assert packed and torch.equal(opt.space.r_params[0].grad, g_plain)


@pytest.mark.parametrize("order", ["model-first", "optimizer-first"])
def test_checkpoint_resumes_bit_for_bit(order):
    model, opt = cmd(torch.bfloat16)
    for i in range(20):
        step(model, opt, i)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    for i in range(20, 30):
        step(model, opt, i)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2, opt2 = cmd(torch.bfloat16)
    if order == "model-first":
        model2.load_state_dict(saved["model"])
        opt2.load_state_dict(saved["opt"])
    else:
        opt2.load_state_dict(saved["opt"])
        model2.load_state_dict(saved["model"])
    assert all(torch.equal(v, model2.state_dict()[k]) for k, v in saved["model"].items())
    for i in range(20, 30):
        step(model2, opt2, i)
    for k, v in model.state_dict().items():
        assert torch.equal(v.view(torch.int16), model2.state_dict()[k].view(torch.int16)), k


def test_old_checkpoint_without_bases_loads_as_the_weights_it_holds():
    """A checkpoint written before the frozen bases (no "half_base"): the model's weights are the
    bases, at the saved applied r; the model computes exactly the saved values and trains on."""
    model, opt = cmd(torch.bfloat16)
    for i in range(20):
        step(model, opt, i)
    sd = copy.deepcopy(opt.state_dict())
    del sd["cmd"]["space"]["half_base"]
    values = copy.deepcopy(model.state_dict())
    for first_model in (True, False):
        model2, opt2 = cmd(torch.bfloat16)
        if first_model:
            model2.load_state_dict(values)
            opt2.load_state_dict(copy.deepcopy(sd))
        else:
            opt2.load_state_dict(copy.deepcopy(sd))
            model2.load_state_dict(values)
        assert all(torch.equal(v, model2.state_dict()[k]) for k, v in values.items())
        assert torch.equal(opt2.space.r_base, opt2.space.r_in_weights)
        step(model2, opt2)
        assert not torch.equal(model2.state_dict()["0.weight"], values["0.weight"])


def test_loading_other_values_and_set_weights_take_them_exactly():
    model, opt = cmd(torch.bfloat16)
    for i in range(20):
        step(model, opt, i)
    other = mlp(torch.bfloat16).state_dict()
    other = {k: v + 0.125 for k, v in other.items()}
    model.load_state_dict(other)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in other.items())
    x = X.bfloat16()
    plain = mlp(torch.bfloat16)
    plain.load_state_dict(other)
    assert torch.equal(model(x), plain(x))
    vals = [v * 0.5 for v in opt.space.current()]
    opt.space.set_weights(vals)
    assert all(torch.equal(c, v) for c, v in zip(opt.space.current(), vals))


def test_bad_saved_base_is_refused_before_anything_changes():
    model, opt = cmd(torch.bfloat16)
    for i in range(20):
        step(model, opt, i)
    sd = copy.deepcopy(opt.state_dict())
    sd["cmd"]["space"]["half_base"]["base"][0] = torch.zeros(3, dtype=torch.bfloat16)
    model2, opt2 = cmd(torch.bfloat16)
    with pytest.raises(ValueError, match="frozen base of 0.weight is not a torch.bfloat16 tensor of shape"):
        opt2.load_state_dict(sd)
    assert opt2.phase == "warmup" and opt2.space is None


def test_mixed_space_float32_in_place_half_formed():
    """A space holding float32 and bf16 weights: float32 ones updated in place (as before), bf16 ones
    formed; both exact."""
    model = mlp(torch.float32)
    model[2].to(torch.bfloat16)

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            h = self.net[1](self.net[0](x))
            return self.net[2](h.bfloat16()).float()

    m = Mixed()
    opt = modeopt.CMDOptimizer(m, torch.optim.AdamW(m.parameters(), lr=1e-2), n_modes=3, warmup_steps=8,
                               snapshot_every=2, seed=0, progress=False)
    for i in range(8):
        opt.zero_grad()
        nn.functional.cross_entropy(m(X), Y).backward()
        opt.step()
    space = opt.space
    assert space.half == [2, 3]
    w_switch = [p.detach().clone() for p in space.params]
    r_switch = space.r_full().detach().clone()
    for i in range(50):
        opt.zero_grad()
        nn.functional.cross_entropy(m(X.roll(i, 0)), Y.roll(i, 0)).backward()
        opt.step()
    state = m.state_dict()
    r = space.r_full().detach()
    for i, (name, a, lab) in enumerate(zip(space.names, space.a, space.mode_index())):
        want = (w_switch[i].float().reshape(-1) + a.float() * (r - r_switch)[lab])
        if i in space.half:
            assert torch.equal(state[name].reshape(-1), want.to(torch.bfloat16))
        else:  # in place, rounded each step in float32: close, not bitwise
            torch.testing.assert_close(state[name].reshape(-1), want, rtol=0, atol=1e-5)


# -------------------------------------------------------------------------------------- BlockwiseCMD
class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = self.inp(x)
        for layer in self.layers:
            h = h + layer(h)
        return self.head(h)


def blockwise(dtype):
    torch.manual_seed(0)
    model = Stack().to(dtype)
    opt = modeopt.BlockwiseCMD(model, torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-3),
                               blocks=["layers.0.", "layers.1."],
                               steps_per_block=6, n_modes=3, train_always=["head."], n_samples=50, seed=0,
                               coef_dtype=torch.bfloat16)  # check_exact reads a as stored (not int8 codes)
    return model, opt


@pytest.mark.parametrize("dtype", HALF)
def test_blockwise_half_weights_stay_exact_over_a_thousand_steps(dtype):
    model, opt = blockwise(dtype)
    for i in range(6):
        step(model, opt, i)
    assert len(opt.spaces) == 1
    space = opt.spaces[0]
    assert space.half
    w_switch = [p.detach().clone() for p in space.params]
    r_switch = space.r_full().detach().clone()
    for i in range(STEPS):
        step(model, opt, i)
    assert len(opt.spaces) == 2
    check_exact(space, w_switch, r_switch, model.state_dict())
    opt.export()
    check_exact(space, w_switch, r_switch, dict(model.named_parameters()))


def test_blockwise_half_checkpoint_resumes_bit_for_bit():
    model, opt = blockwise(torch.bfloat16)
    for i in range(15):
        step(model, opt, i)
    assert len(opt.spaces) == 2
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    for i in range(15, 25):
        step(model, opt, i)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2, opt2 = blockwise(torch.bfloat16)
    opt2.load_state_dict(saved["opt"])
    model2.load_state_dict(saved["model"])
    for i in range(15, 25):
        step(model2, opt2, i)
    for k, v in model.state_dict().items():
        assert torch.equal(v.view(torch.int16), model2.state_dict()[k].view(torch.int16)), k


# ----------------------------------------------------------------- OnlineCMDOptimizer (gradual embedding)
@pytest.mark.parametrize("dtype", HALF)
def test_online_gradual_embedding_half_weights_stay_exact_over_a_thousand_steps(dtype):
    """Frozen weights are assigned w = a * r_now + b each step (no accumulation): rounded once from
    float32, <= 1 ulp from the float64 value, after 1,000 steps."""
    model = mlp(dtype)
    opt = OnlineCMDOptimizer(model, torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-3), n_modes=3, fit_at=12,
                             snapshot_every=2, sample_every=2, seed=0, embed_every=None)
    for i in range(14):
        step(model, opt, i)
    labels, a, b = opt.online.coefficients()
    refs = {t for t, _ in opt.online.ref_index}
    t = next(i for i in opt.embeddable if i not in refs)
    opt._freeze_tensor(t, a[t], b[t])
    p = opt.online.tensors[t]
    for i in range(STEPS):
        step(model, opt, i)
    f = opt.frozen[t]
    r = opt.online.references_now()
    lab = kernels.as_index(labels[t]).long()
    got = p.detach().reshape(-1)
    f32 = torch.addcmul(f["b"], f["a"], r.to(torch.float32)[lab]).to(dtype)
    f64 = (f["b"].double() + f["a"].double() * r.double()[lab]).to(dtype)
    assert torch.equal(got.view(torch.int16), f32.view(torch.int16))
    assert ulps(got, f64) <= 1


# ------------------------------------------------------------------------------------ torch.compile
@pytest.mark.slow  # ~10 s of compilation
def test_compile_fullgraph_forms_half_weights_like_eager():
    """torch.compile(model, fullgraph=True) traces the forming (modeopt::mode_form, opaque with a fake
    impl): the same outputs and dL/dr as eager, and a step after it moves the model as in eager."""
    model, opt = cmd(torch.bfloat16)
    for i in range(20):
        step(model, opt, i)
    x = X.bfloat16()
    opt.zero_grad()
    out_eager = model(x)
    nn.functional.cross_entropy(out_eager.float(), Y).backward()
    eager = [p.grad.clone() for p in opt.space.r_params]
    opt.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    nn.functional.cross_entropy(out.float(), Y).backward()
    assert torch.equal(out, out_eager)
    for g, e in zip((p.grad for p in opt.space.r_params), eager):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    opt.step()
    assert torch.equal(compiled(x), model(x))  # the compiled model reads the new r (not a stale constant)
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())


def test_activation_checkpointing_re_forms_half_weights_in_backward():
    """Non-reentrant activation checkpointing re-runs a submodule's forward in backward: its formed
    weights are formed again there (the saved-tensor hooks stay out of it), same dL/dr as without."""
    from torch.utils.checkpoint import checkpoint

    model, opt = cmd(torch.bfloat16)
    for i in range(12):
        step(model, opt, i)
    x = X.bfloat16()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x).float(), Y).backward()
    plain = opt.space.r_params[0].grad.clone()

    class Ckpt(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            h = checkpoint(self.net[0], x, use_reentrant=False)
            return self.net[2](self.net[1](h))

    wrapped = Ckpt(model)
    opt.zero_grad()
    nn.functional.cross_entropy(wrapped(x).float(), Y).backward()
    assert torch.equal(opt.space.r_params[0].grad, plain)


def test_activation_checkpointing_inside_the_model():
    """The checkpointed block inside the embedded model's own forward (the root's saved-tensor hooks
    are active around it): the same dL/dr as the same model without checkpointing."""
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self, use_ckpt: bool):
            super().__init__()
            self.a, self.b, self.use_ckpt = nn.Linear(8, 16), nn.Linear(16, 2), use_ckpt

        def forward(self, x):
            h = checkpoint(lambda t: torch.tanh(self.a(t)), x, use_reentrant=False) if self.use_ckpt \
                else torch.tanh(self.a(x))
            return self.b(h)

    grads = []
    for use_ckpt in (False, True):
        torch.manual_seed(0)
        model = Net(use_ckpt).bfloat16()
        opt = modeopt.CMDOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-3), n_modes=3,
                                   warmup_steps=8, snapshot_every=2, seed=0, progress=False)
        for i in range(12):
            step(model, opt, i)
        opt.zero_grad()
        nn.functional.cross_entropy(model(X.bfloat16()).float(), Y).backward()
        grads.append(opt.space.r_params[0].grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_a_model_pickled_in_mode_space_before_half_weights_were_formed_still_loads():
    """``torch.save(model)`` of a model in mode space written before this change: its ModeSpace lacks
    the half-precision attributes; it loads, computes the same, and keeps updating in place."""
    model, opt = cmd(torch.bfloat16)
    for i in range(10):
        step(model, opt, i)
    space = opt.space
    x = X.bfloat16()
    space.rebase()  # the parameters hold the current values, as an old (in-place) space's did
    with torch.no_grad():
        want = model(x)
    for key in ("_is_half", "half", "_half_by_device", "r_base", "_saving", "_formed_at"):
        del space.__dict__[key]
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x), want)
    old = next(h for h in loaded._forward_pre_hooks.values()).__self__
    assert old.half == [] and torch.equal(old.r_base, old.r_in_weights)
