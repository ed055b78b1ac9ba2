"""Half-precision embedded weights are formed by each operation that reads them (issue 25): during a
forward at most one operation's formed weights are alive (not every half-precision weight of the
model), every reader - also a parent reading a child's weight directly, a custom autograd.Function,
a raw pointer - gets the current value, and dL/dr is bit for bit what forming every weight at the
forward's start gave (``ModeSpace.FORM_ON_USE = False``)."""

from __future__ import annotations

import ctypes
import weakref

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import modeopt
from modeopt.modespace import kernels
from modeopt.modespace.space import ModeSpace
from _small import _one_thread  # noqa: F401  (fixture)

X = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
Y = (X[:, 0] + 0.5 * X[:, 1] > 0).long()
WIDTHS = [8, 24, 40, 32, 16, 2]  # five Linear layers of different sizes


def deep(dtype) -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for i, (n_in, n_out) in enumerate(zip(WIDTHS, WIDTHS[1:])):
        layers += [nn.Linear(n_in, n_out)] + ([nn.Tanh()] if i < len(WIDTHS) - 2 else [])
    return nn.Sequential(*layers).to(dtype)


def embedded(model: nn.Module, steps: int = 12, **kw) -> modeopt.CMDOptimizer:
    args = dict(n_modes=3, warmup_steps=8, snapshot_every=2, seed=0, progress=False)
    args.update(kw)
    opt = modeopt.CMDOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-3), **args)
    dtype = next(model.parameters()).dtype
    for i in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(X.roll(i, 0).to(dtype)).float(), Y.roll(i, 0)).backward()
        opt.step()
    assert opt.phase == "embedded"
    return opt


class LiveFormed:
    """Counts the bytes of formed weights alive (every ``kernels.form`` output, until it is freed)."""

    def __init__(self, monkeypatch):
        self.live = self.peak = self.calls = 0
        real = kernels.form

        def counting(*args, **kw):
            out = real(*args, **kw)
            for t in out:
                self.calls += 1
                n = t.untyped_storage().nbytes()
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._freed, n)
            return out

        monkeypatch.setattr(kernels, "form", counting)

    def _freed(self, n: int) -> None:
        self.live -= n

    def reset(self) -> None:
        self.peak, self.calls = self.live, 0


def layer_bytes(space: ModeSpace) -> list[int]:
    """Per module owning embedded half-precision weights, their bytes."""
    return [sum(space.params[i].numel() * space.params[i].element_size() for _, i in entries if i in space.half)
            for entries in space._owners.values()]


@pytest.mark.parametrize("on_use", [True, False])
def test_formed_weights_live_one_operation_at_a_time(monkeypatch, on_use):
    """Forming on use: the live formed bytes never exceed the largest layer's (weight + bias), in the
    forward (with and without autograd) and in the backward; forming at the forward's start (the
    earlier way, kept for comparison) holds every half-precision weight of the model at once."""
    model = deep(torch.bfloat16)
    space = embedded(model).space
    monkeypatch.setattr(ModeSpace, "FORM_ON_USE", on_use)
    count = LiveFormed(monkeypatch)
    per_layer = layer_bytes(space)
    total = sum(per_layer)
    assert len(per_layer) == 5 and len(space.half) == 10
    x = X.bfloat16()
    loss = F.cross_entropy(model(x).float(), Y)
    assert count.live == 0  # nothing formed outlives the forward (autograd keeps tokens)
    if on_use:
        assert count.peak == max(per_layer) < total / 2 and count.calls == 2 * len(per_layer)
    else:
        assert count.peak == total
    count.reset()
    loss.backward()  # each Linear's weight (not the first's: x needs no gradient) formed again for grad_input
    weights = [2 * n_in * n_out for n_in, n_out in zip(WIDTHS[1:], WIDTHS[2:])]
    assert count.live == 0 and count.peak == max(weights) and count.calls == len(weights)
    count.reset()
    with torch.no_grad():
        model(x)
    assert count.live == 0 and count.peak == (max(per_layer) if on_use else total)


class TiedHead(nn.Module):
    """A parent that reads its children's weights directly: a tied output head (the embedding's
    weight, transposed, through F.linear) and a layer applied by hand (``x @ W.T + b``)."""

    def __init__(self):
        super().__init__()
        self.embed, self.mid = nn.Linear(8, 16), nn.Linear(16, 16)

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        h = torch.tanh(h @ self.mid.weight.T + self.mid.bias)
        return F.linear(h, self.embed.weight.t())[:, :2]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_parent_reading_a_child_weight_directly_gets_the_current_value(dtype):
    """Outputs equal (bit for bit) a plain model holding the current weights, and dL/dr is its weights'
    gradient reduced onto the modes, though ``mid``'s forward never runs and ``embed.weight`` is read
    by the parent as well as by its owner."""
    model = TiedHead().to(dtype)
    opt = embedded(model, steps=30)
    space = opt.space
    plain = TiedHead().to(dtype)
    plain.load_state_dict(model.state_dict())
    assert any(not torch.equal(p, q) for p, q in zip(plain.parameters(), model.parameters()))  # bases differ
    x = X.to(dtype)
    opt.zero_grad()
    out = model(x)
    want = plain(x)
    assert torch.equal(out, want)
    F.cross_entropy(out.float(), Y).backward()
    F.cross_entropy(want.float(), Y).backward()
    grads = [dict(plain.named_parameters())[n].grad for n in space.names]
    reduced = space.group_values(kernels.reduce(grads, space.a, space.labels, space.n_modes).float())
    for got, w in zip((p.grad for p in space.r_params), reduced):
        torch.testing.assert_close(got, w, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))


class ByHand(torch.autograd.Function):
    """A custom operation taking the weight itself (saves it; its backward reads it again)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ w.t()

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w, g.t() @ x


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 2, bias=False)

    def forward(self, x):
        return ByHand.apply(torch.tanh(self.a(x)), self.b.weight)


def test_dl_dr_is_bit_for_bit_that_of_forming_at_the_forward_start(monkeypatch):
    """Same outputs (bit for bit) and the same dL/dr (up to the order of float sums) whether the half
    weights are formed on use or all at the forward's start; over the deep MLP, the tied/by-hand model, a custom autograd.Function
    handed the weight (and saving it for its backward), fp16 and the 8-bit coefficients."""
    cases = [(deep, torch.bfloat16, {}), (deep, torch.float16, {"coef_dtype": torch.int8}),
             (TiedHead, torch.bfloat16, {}), (Custom, torch.bfloat16, {})]
    for make, dtype, kw in cases:
        model = make(dtype) if make is deep else make().to(dtype)
        opt = embedded(model, steps=20, **kw)
        x = X.to(dtype)
        got = []
        for form_on_use in (True, False):
            monkeypatch.setattr(ModeSpace, "FORM_ON_USE", form_on_use)
            opt.zero_grad()
            out = model(x)
            F.cross_entropy(out.float(), Y).backward()
            got.append((out, [p.grad.clone() for p in opt.space.r_params]))
        (out, g), (out_ref, g_ref) = got
        assert torch.equal(out, out_ref), make.__name__
        # dL/dr: each group's node reduces the same products; the nodes, made at first use (on use) or
        # at the forward's start, run in another order, so their sums reach r in another order
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=make.__name__)
        if make is Custom:  # the custom function's gradient reaches r
            assert all(bool(a.abs().sum() > 0) for a in g)


class Probe(nn.Module):
    """Reads its first layer's weight's metadata and raw address in its own forward."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.seen, self.forms = net, {}, None

    def forward(self, x):
        w = self.net[0].weight
        if self.forms is None:  # training: a plain forward
            return self.net(x)
        self.seen["meta"] = (tuple(w.shape), w.dtype, w.device, w.requires_grad, w.ndim, w.size(0), w.dim())
        self.seen["forms_after_meta"] = self.forms.calls
        ptr, n = w.data_ptr(), w.numel()
        out = self.net(x)  # forms every other weight (new allocations) before the address is read
        self.seen["bits"] = torch.tensor(list((ctypes.c_uint16 * n).from_address(ptr)), dtype=torch.int32)
        return out


def test_metadata_reads_do_not_form_and_a_raw_pointer_stays_valid(monkeypatch):
    """Reading shape/dtype/device/requires_grad of a stand-in forms nothing; ``data_ptr()`` points into
    a formed copy (the current value, not the frozen base) that stays valid until the forward ends."""
    model = Probe(deep(torch.bfloat16))
    opt = embedded(model)
    current = dict(zip(opt.space.names, opt.space.current()))
    model.forms = count = LiveFormed(monkeypatch)
    model(X.bfloat16()).sum().backward()
    seen = model.seen
    assert seen["meta"] == ((24, 8), torch.bfloat16, torch.device("cpu"), True, 2, 24, 2)
    assert seen["forms_after_meta"] == 0
    w = current["net.0.weight"].reshape(-1)
    assert torch.equal(seen["bits"].to(torch.int16), w.view(torch.int16))
    assert not torch.equal(w, model.net[0].weight.reshape(-1))  # the base differs: the address was formed
    assert count.live == 0  # kept until the forward ended, not longer


class Zoo(nn.Module):
    """Layers that read their weights in different ways: Embedding, LSTM (a flat weight list to one
    call), MultiheadAttention (reads out_proj's weight itself), Conv1d, LayerNorm, a slice of the
    embedding's weight read by the parent."""

    def __init__(self):
        super().__init__()
        self.emb, self.lstm = nn.Embedding(20, 8), nn.LSTM(8, 8, batch_first=True)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.conv, self.ln, self.head = nn.Conv1d(8, 8, 3, padding=1), nn.LayerNorm(8), nn.Linear(8, 2)

    def forward(self, ids):
        h, _ = self.lstm(self.emb(ids))
        h = h + self.mha(h, h, h, need_weights=False)[0]
        h = self.ln(self.conv(h.transpose(1, 2)).transpose(1, 2)).mean(1)
        return self.head(h) + F.linear(h, self.emb.weight[:2])


def test_common_layers_read_current_values_on_use(monkeypatch):
    """Every layer kind of Zoo computes with the current weights: outputs equal a plain model's bit for
    bit, and outputs and dL/dr equal those of forming every weight at the forward's start."""
    ids = torch.randint(0, 20, (16, 5), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = Zoo().bfloat16()
    opt = modeopt.CMDOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-3), n_modes=3,
                               warmup_steps=8, snapshot_every=2, seed=0, progress=False)
    for i in range(14):
        opt.zero_grad()
        F.cross_entropy(model(ids.roll(i, 0)).float(), Y).backward()
        opt.step()
    assert opt.phase == "embedded" and len(opt.space.half) == 15
    plain = Zoo().bfloat16()
    plain.load_state_dict(model.state_dict())
    got = []
    for form_on_use in (True, False):
        monkeypatch.setattr(ModeSpace, "FORM_ON_USE", form_on_use)
        opt.zero_grad()
        out = model(ids)
        F.cross_entropy(out.float(), Y).backward()
        got.append((out, [p.grad.clone() for p in opt.space.r_params]))
    with torch.no_grad():
        assert torch.equal(got[0][0], plain(ids)) and torch.equal(got[0][0], got[1][0])
    assert all(torch.equal(a, b) for a, b in zip(got[0][1], got[1][1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_layers_gradient_is_reduced_before_the_backward_moves_on(dtype, monkeypatch):
    """A ReadThrough node made when the forward starts ran after the whole backward (autograd runs the
    ready node made last first), so every embedded weight's gradient was alive at once at its end.
    Made at first use, each layer's reduction runs before the layers below it are differentiated."""
    import modeopt.modespace.read_through as rt

    events = []
    real = rt.kernels.reduce

    def reduce(grads, *args, **kwargs):
        events.append(("reduce", tuple(g is not None for g in grads)))
        return real(grads, *args, **kwargs)

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)]).to(dtype)
    opt = modeopt.CMDOptimizer(model, torch.optim.SGD(model.parameters(), lr=1e-2), n_modes=2, warmup_steps=3,
                               snapshot_every=1, n_samples=100, seed=0, progress=False)
    monkeypatch.setattr(ModeSpace, "GROUP_ELEMENTS", 64 * 64 + 64)  # a group per layer
    x = torch.randn(4, 64).to(dtype).requires_grad_()
    for _ in range(3):
        opt.zero_grad()
        model(x).float().pow(2).mean().backward()
        opt.step()
    assert opt.phase == "embedded"
    for i in range(1, 4):
        model[i].register_full_backward_hook(lambda mod, gi, go, i=i: events.append(("layer", i)))
    monkeypatch.setattr(rt.kernels, "reduce", reduce)
    opt.zero_grad()
    model(x).float().pow(2).mean().backward()
    first_reduce = next(j for j, e in enumerate(events) if e[0] == "reduce")
    assert first_reduce < events.index(("layer", 2)), events  # the top layer's weights reduced early
    assert sum(e[0] == "reduce" for e in events) == 4
