"""Conformance suite for :class:`modeopt.CMDOptimizer` (in the spirit of torch's ``optim_db``).

The same checks run over many base optimizers, LR schedulers, AMP, gradient accumulation,
checkpointing in every phase, export and param-group layouts. Small real models (an MLP and
``workloads.SmallCNN``) learn a fixed random teacher's labels (with 20 % label noise, so the
loss never vanishes). Everything is seeded: the checks are equalities, counts and tolerances.

Internals used on purpose (they are the only way to state the contract precisely):
``opt._step`` (steps counted by the wrapper), ``opt.space`` (``names``, ``params``, ``a``,
``labels``, ``r_groups``, ``groups``, ``r_params``, ``r_full()``): the embedded weight ``i`` is
``a_i * r[labels_i] + b_i``.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import lr_scheduler as lrs

from modeopt import CMDOptimizer
from workloads import SmallCNN
from _small import MLP, _one_thread  # noqa: F401  (tests/ is on sys.path; the fixture is autouse)

WARMUP = 8  # warm-up steps: the switch happens inside the WARMUP-th step (index WARMUP - 1)
EVERY = 2  # snapshot_every
MODES = 3
SAMPLES = 100
BATCH = 32
CMD_KW = dict(n_modes=MODES, warmup_steps=WARMUP, snapshot_every=EVERY, n_samples=SAMPLES, seed=0)
TOTAL = WARMUP + 8


# ----------------------------------------------------------------------------- models and data


MODELS = {
    "mlp": (MLP, (8,), 4),
    "cnn": (SmallCNN, (1, 28, 28), 10),
}


@functools.lru_cache(maxsize=None)
def _teacher(kind: str) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        return MODELS[kind][0]().eval()


@functools.lru_cache(maxsize=None)
def batch(kind: str, i: int, size: int = BATCH):
    """The i-th batch of the synthetic task (always the same tensors)."""
    _, shape, n_classes = MODELS[kind]
    g = torch.Generator().manual_seed(10_000 + i)
    x = torch.randn(size, *shape, generator=g)
    with torch.no_grad():
        y = _teacher(kind)(x).argmax(1)
    flip = torch.rand(size, generator=g) < 0.2
    y[flip] = torch.randint(0, n_classes, (int(flip.sum()),), generator=g)
    return x, y


def random_label_batch(i: int, size: int = 64):
    """Unlearnable labels: the loss (and LBFGS's gradients) stay large."""
    g = torch.Generator().manual_seed(20_000 + i)
    return torch.randn(size, 8, generator=g), torch.randint(0, 4, (size,), generator=g)


OPTIMIZERS = {
    "SGD": lambda p: torch.optim.SGD(p, lr=0.1),
    "SGD-nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "SGD-wd": lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=1e-2),
    "SGD-foreach": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, foreach=True),
    "SGD-for-loop": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, foreach=False),
    "SGD-fused": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, fused=True),
    "Adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "Adam-foreach": lambda p: torch.optim.Adam(p, lr=1e-2, foreach=True),
    "Adam-for-loop": lambda p: torch.optim.Adam(p, lr=1e-2, foreach=False),
    "Adam-amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    "Adam-fused": lambda p: torch.optim.Adam(p, lr=1e-2, fused=True),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01),
    "AdamW-foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01, foreach=True),
    "AdamW-fused": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01, fused=True),
    "RMSprop": lambda p: torch.optim.RMSprop(p, lr=1e-2),
    "RMSprop-momentum": lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.5, centered=True),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1),
    "Adagrad-foreach": lambda p: torch.optim.Adagrad(p, lr=0.1, lr_decay=0.01, foreach=True),
    "NAdam": lambda p: torch.optim.NAdam(p, lr=1e-2),
    "RAdam": lambda p: torch.optim.RAdam(p, lr=1e-2),
    "Adamax": lambda p: torch.optim.Adamax(p, lr=1e-2),
    "Adadelta": lambda p: torch.optim.Adadelta(p, lr=1.0),
    "Rprop": lambda p: torch.optim.Rprop(p, lr=1e-2),
    "ASGD": lambda p: torch.optim.ASGD(p, lr=1e-2),
    # step(closure) only: tested on their own (section 8)
    "LBFGS": lambda p: torch.optim.LBFGS(p, lr=0.2, max_iter=3),
    "LBFGS-strong-wolfe": lambda p: torch.optim.LBFGS(p, lr=0.2, max_iter=3, line_search_fn="strong_wolfe"),
}
ALL_OPTS = [n for n in OPTIMIZERS if not n.startswith("LBFGS")]


def build(opt_name="SGD", *, kind="mlp", groups=None, init_seed=1, **kw):
    """A fresh model, its base optimizer and the CMDOptimizer around it."""
    torch.manual_seed(init_seed)
    model = MODELS[kind][0]()
    params = groups(model) if groups is not None else model.parameters()
    base = OPTIMIZERS[opt_name](params)
    opt = CMDOptimizer(model, base, **{**CMD_KW, **kw})
    return model, base, opt


def build_plain(opt_name="SGD", *, kind="mlp", groups=None, init_seed=1):
    """The same model and base optimizer, unwrapped (the reference run)."""
    torch.manual_seed(init_seed)
    model = MODELS[kind][0]()
    params = groups(model) if groups is not None else model.parameters()
    return model, OPTIMIZERS[opt_name](params)


def train_step(model, opt, i, *, kind="mlp"):
    x, y = batch(kind, i)
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.detach()


def run(model, opt, start, stop, *, kind="mlp", sched=None):
    losses = []
    for i in range(start, stop):
        losses.append(train_step(model, opt, i, kind=kind))
        if sched is not None:
            sched_step(sched)
    return losses


def sched_step(sched):
    if isinstance(sched, lrs.ReduceLROnPlateau):
        sched.step(1.0)  # a metric that never improves: the plateau logic fires every patience+1 steps
    else:
        sched.step()


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_nested_equal(a, b, path="state_dict"):
    """Tensors torch.equal (same dtype), containers recursively, anything else ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), path
        for k in a:
            assert_nested_equal(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for j, (x, y) in enumerate(zip(a, b)):
            assert_nested_equal(x, y, f"{path}[{j}]")
    else:
        assert a == b, path


def assert_same(a, b):
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def full_r(opt):
    return opt.space.r_full().detach().clone()


def full_r_grad(space):
    """The grads of the group tensors, in mode order (group g holds the modes r_groups == g, in order)."""
    out = torch.zeros(space.n_modes, dtype=torch.float64)
    for g, rp in zip(space.groups, space.r_params):
        assert rp.grad is not None
        out[space.r_groups == g] = rp.grad.double()
    return out


def reference_r_grad(model, opt, x, y, *, kind="mlp"):
    """dL/dr_m = sum_{i in m} a_i dL/dw_i, computed on a plain copy of the model."""
    space = opt.space
    ref = MODELS[kind][0]()
    ref.load_state_dict(model.state_dict())
    loss = F.cross_entropy(ref(x), y)
    loss.backward()
    grads = {n: p.grad for n, p in ref.named_parameters()}
    out = torch.zeros(space.n_modes, dtype=torch.float64)
    for name, a, lab in zip(space.names, space.a, space.mode_index()):
        out += torch.bincount(lab, weights=grads[name].reshape(-1).double() * a.double(), minlength=space.n_modes)
    return out, loss.detach()


def assert_weights_follow_r(opt, w0, r_sw, atol=1e-5):
    """Every embedded weight == its value at the switch + a_i * (r - r_switch)[m(i)]."""
    space = opt.space
    dr = full_r(opt) - r_sw
    for name, p, a, lab in zip(space.names, space.params, space.a, space.mode_index()):
        expected = w0[name].reshape(-1) + a * dr[lab]
        torch.testing.assert_close(p.detach().reshape(-1), expected, atol=atol, rtol=0, msg=name)


def r0(opt):
    return opt.space.r_params[0]


def assert_r_registered(model, opt, names):
    """The mode scalars are the model's only new parameters (so model.zero_grad() etc. see them)."""
    extra = [(n, p) for n, p in model.named_parameters() if n not in names]
    assert [n for n, _ in model.named_parameters() if n in names] == names
    assert len(extra) == len(opt.space.r_params)
    assert {id(p) for _, p in extra} == {id(r) for r in opt.space.r_params}
    assert not set(n for n, _ in extra) & set(model.state_dict())


def group_snapshot(opt):
    """(ids of the group dicts, ids of their params lists, their hyper-parameters)."""
    return ([id(g) for g in opt.param_groups], [id(g["params"]) for g in opt.param_groups],
            [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in opt.param_groups])


def state_ids(opt):
    return {id(k) for k in opt.state}


# ======================================================================= 1. every base optimizer
@pytest.mark.parametrize("opt_name", ALL_OPTS)
def test_warmup_is_the_base_optimizer_and_switch_keeps_groups(opt_name):
    model, base, opt = build(opt_name)
    ref, ref_opt = build_plain(opt_name)
    names = [n for n, _ in model.named_parameters()]
    orig = list(model.parameters())
    keys = list(model.state_dict())

    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is base.param_groups and opt.state is base.state and opt.defaults is base.defaults
    before = group_snapshot(opt)
    n_groups = len(opt.param_groups)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*modeopt")
        for i in range(WARMUP):
            assert (opt.phase, opt._step) == ("warmup", i)
            assert torch.equal(train_step(model, opt, i), train_step(ref, ref_opt, i))
            # bit-identical to the unwrapped optimizer, the switch step included (init="keep")
            assert_same(weights(model), weights(ref))
    assert (opt.phase, opt._step, opt.cycle) == ("embedded", WARMUP, 0)
    assert len(opt.history) == 1 and opt.history[0]["step"] == WARMUP and opt.history[0]["n_modes"] == MODES

    # the param groups: same number, same dict and list objects, same hyper-parameters
    assert opt.param_groups is base.param_groups and len(opt.param_groups) == n_groups
    assert group_snapshot(opt) == before
    r = r0(opt)
    assert_r_registered(model, opt, names)
    assert len(opt.param_groups[0]["params"]) == 1 and opt.param_groups[0]["params"][0] is r
    assert r.requires_grad and r.shape == (MODES,) and opt.space.n_modes == MODES

    # trainable: exactly the M mode scalars; the weights are frozen, keep their names, and their state is dropped
    assert opt.trainable_parameters() == MODES
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == MODES
    assert all(not p.requires_grad and p.grad is None for p in orig)
    assert opt.embedded_names == names
    assert list(model.state_dict()) == keys  # r is not in the model's checkpoint
    assert not (state_ids(opt) & {id(p) for p in orig})


@pytest.mark.parametrize("opt_name", ALL_OPTS)
def test_embedded_phase_trains_only_r(opt_name):
    model, base, opt = build(opt_name)
    run(model, opt, 0, WARMUP)
    space = opt.space
    w0, r_sw = weights(model), full_r(opt)
    losses = []
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*modeopt")
        for i in range(WARMUP, WARMUP + 4):
            x, y = batch("mlp", i)
            expected_grad, ref_loss = reference_r_grad(model, opt, x, y)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            # the model in mode space computes exactly the plain model's function
            assert torch.equal(loss.detach(), ref_loss)
            torch.testing.assert_close(full_r_grad(space), expected_grad, rtol=1e-5, atol=1e-9)
            assert all(p.grad is None for p in space.params)  # no N-sized weight gradients
            r_before = full_r(opt)
            opt.step()
            assert not torch.equal(full_r(opt), r_before)
            assert_weights_follow_r(opt, w0, r_sw)
            losses.append(loss.item())
    assert (opt.phase, opt._step) == ("embedded", WARMUP + 4)
    assert state_ids(opt) <= {id(p) for p in space.r_params}
    assert all(math.isfinite(v) for v in losses)


@pytest.mark.parametrize("opt_name", ["SGD", "Adam"])
def test_smallcnn_through_the_switch(opt_name):
    model, base, opt = build(opt_name, kind="cnn")
    ref, ref_opt = build_plain(opt_name, kind="cnn")
    n_params = sum(p.numel() for p in model.parameters())
    assert 25_000 < n_params < 35_000
    for i in range(WARMUP):
        assert torch.equal(train_step(model, opt, i, kind="cnn"), train_step(ref, ref_opt, i, kind="cnn"))
    assert_same(weights(model), weights(ref))
    assert opt.phase == "embedded" and opt.trainable_parameters() == MODES
    w0, r_sw = weights(model), full_r(opt)
    for i in range(WARMUP, WARMUP + 3):
        x, y = batch("cnn", i)
        expected, _ = reference_r_grad(model, opt, x, y, kind="cnn")
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        torch.testing.assert_close(full_r_grad(opt.space), expected, rtol=1e-5, atol=1e-9)
        opt.step()
    assert_weights_follow_r(opt, w0, r_sw)


# ======================================================================= 2. gradients
@pytest.mark.parametrize("opt_name", ["SGD", "Adam"])
def test_gradient_accumulation_equals_big_batch(opt_name):
    k = 4
    model_a, _, opt_a = build(opt_name)
    model_b, _, opt_b = build(opt_name)
    run(model_a, opt_a, 0, WARMUP)
    run(model_b, opt_b, 0, WARMUP)
    assert opt_a.phase == opt_b.phase == "embedded"
    x, y = batch("mlp", 100, size=4 * 16)
    chunks = list(zip(x.chunk(k), y.chunk(k)))

    per_micro = []
    for xc, yc in chunks:
        opt_a.zero_grad()
        (F.cross_entropy(model_a(xc), yc) / k).backward()
        per_micro.append(full_r_grad(opt_a.space))
    opt_a.zero_grad()
    for xc, yc in chunks:
        (F.cross_entropy(model_a(xc), yc) / k).backward()
    accumulated = full_r_grad(opt_a.space)
    torch.testing.assert_close(accumulated, sum(per_micro), rtol=1e-6, atol=1e-9)
    assert all(p.grad is None for p in opt_a.space.params)

    opt_b.zero_grad()
    F.cross_entropy(model_b(x), y).backward()
    torch.testing.assert_close(accumulated, full_r_grad(opt_b.space), rtol=1e-5, atol=1e-8)

    opt_a.step()
    opt_b.step()
    assert opt_a._step == opt_b._step == WARMUP + 1
    torch.testing.assert_close(full_r(opt_a), full_r(opt_b), rtol=0, atol=1e-6)
    wa, wb = weights(model_a), weights(model_b)
    for n in wa:
        torch.testing.assert_close(wa[n], wb[n], rtol=0, atol=1e-6)


@pytest.mark.parametrize("how", ["model.zero_grad()", "model.zero_grad(set_to_none=False)",
                                 "opt.zero_grad(set_to_none=True)", "opt.zero_grad(set_to_none=False)"])
def test_zero_grad_clears_r(how):
    model, base, opt = build("Adam", exclude=["*.bias"])
    run(model, opt, 0, WARMUP + 1)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 3  # r0 and the two biases
    x, y = batch("mlp", 50)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    first = [p.grad.clone() for p in trainable]
    assert all(bool(g.abs().sum() > 0) for g in first)
    grad_objects = [p.grad for p in trainable]

    eval(how, {"model": model, "opt": opt})
    if "False" in how:
        assert all(p.grad is g and not bool(g.any()) for p, g in zip(trainable, grad_objects))
    else:
        assert all(p.grad is None for p in trainable)
    # no leftover: a new backward gives exactly the single-batch gradients again
    F.cross_entropy(model(x), y).backward()
    assert all(torch.equal(p.grad, g) for p, g in zip(trainable, first))


# ======================================================================= 3. LR schedulers
SCHEDULERS = {
    "StepLR": lambda o: lrs.StepLR(o, step_size=3, gamma=0.5),
    "LambdaLR": lambda o: lrs.LambdaLR(o, lambda s: 1.0 / (1.0 + 0.25 * s)),
    "OneCycleLR": lambda o: lrs.OneCycleLR(o, max_lr=0.2, total_steps=TOTAL + 1, cycle_momentum=False),
    "CosineAnnealingLR": lambda o: lrs.CosineAnnealingLR(o, T_max=TOTAL, eta_min=1e-3),
    "ReduceLROnPlateau": lambda o: lrs.ReduceLROnPlateau(o, factor=0.5, patience=1),
    # a linear warm-up that runs across the switch, then cosine
    "LinearLR+CosineAnnealingLR": lambda o: lrs.SequentialLR(
        o, [lrs.LinearLR(o, start_factor=0.1, total_iters=WARMUP + 2), lrs.CosineAnnealingLR(o, T_max=TOTAL)],
        milestones=[WARMUP + 2]),
    "ExponentialLR": lambda o: lrs.ExponentialLR(o, gamma=0.9),
    "MultiStepLR": lambda o: lrs.MultiStepLR(o, milestones=[3, WARMUP + 1, WARMUP + 4], gamma=0.5),
    "PolynomialLR": lambda o: lrs.PolynomialLR(o, total_iters=TOTAL, power=2.0),
    "CyclicLR": lambda o: lrs.CyclicLR(o, base_lr=0.01, max_lr=0.2, step_size_up=3, cycle_momentum=False),
    "CosineAnnealingWarmRestarts": lambda o: lrs.CosineAnnealingWarmRestarts(o, T_0=5, eta_min=1e-3),
    "ChainedScheduler": lambda o: lrs.ChainedScheduler([lrs.ConstantLR(o, factor=0.5, total_iters=WARMUP + 2),
                                                        lrs.ExponentialLR(o, gamma=0.9)]),
    "SWALR": lambda o: torch.optim.swa_utils.SWALR(o, swa_lr=0.02, anneal_epochs=TOTAL),
}


@pytest.mark.parametrize("sched_name", list(SCHEDULERS))
@pytest.mark.parametrize("on", ["wrapper", "base"])
def test_lr_scheduler_drives_r(sched_name, on):
    model, base, opt = build("SGD")
    ref, ref_opt = build_plain("SGD")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sched = SCHEDULERS[sched_name](opt if on == "wrapper" else base)
        ref_sched = SCHEDULERS[sched_name](ref_opt)
        initial = {k: v for k, v in opt.param_groups[0].items() if k in ("initial_lr", "max_lr", "min_lr")}
        assert ("initial_lr" in initial) == (sched_name != "ReduceLROnPlateau")
        lrs_cmd, lrs_ref, checked = [], [], 0
        for i in range(TOTAL):
            group = opt.param_groups[0]
            lr = group["lr"]
            lrs_cmd.append(lr)
            lrs_ref.append(ref_opt.param_groups[0]["lr"])
            if i == WARMUP - 1:
                before = group_snapshot(opt)
            x, y = batch("mlp", i)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            embedded = opt.phase == "embedded"
            if embedded:
                r = r0(opt)
                r_old, grad = r.detach().clone(), r.grad.clone()
            opt.step()
            if embedded:  # plain SGD: r moves by exactly -lr * grad, with the lr the scheduler set
                assert torch.equal(r.detach(), r_old.add(grad, alpha=-lr))
                checked += 1
            if i == WARMUP - 1:  # the switch step: nothing about the groups changed
                assert opt.phase == "embedded"
                assert group_snapshot(opt) == before
                assert {k: opt.param_groups[0][k] for k in initial} == initial
            sched_step(sched)
            train_step(ref, ref_opt, i)
            sched_step(ref_sched)
    assert not [w for w in caught if "lr_scheduler" in str(w.message) or "modeopt" in str(w.message)]
    assert checked == TOTAL - WARMUP
    assert lrs_cmd == lrs_ref  # the schedule is the plain optimizer's, across the switch
    assert len(set(lrs_cmd[WARMUP:])) > 1  # and it really changes the lr in the embedded phase
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["params"] == [r0(opt)]


@pytest.mark.parametrize("sched_name", ["StepLR", "OneCycleLR-momentum", "LinearLR+CosineAnnealingLR"])
def test_lr_scheduler_sets_adam_step_on_r(sched_name):
    """Adam's first step on fresh r moves every component by lr (|m/sqrt(v)| = 1)."""
    make = {**SCHEDULERS, "OneCycleLR-momentum": lambda o: lrs.OneCycleLR(o, max_lr=0.05, total_steps=TOTAL + 1)}
    make = make[sched_name]
    model, base, opt = build("Adam")
    ref, ref_opt = build_plain("Adam")
    sched, ref_sched = make(opt), make(ref_opt)
    for i in range(WARMUP):
        train_step(model, opt, i)
        sched_step(sched)
        train_step(ref, ref_opt, i)
        sched_step(ref_sched)
    assert opt.phase == "embedded"
    group, ref_group = opt.param_groups[0], ref_opt.param_groups[0]
    assert group["lr"] == ref_group["lr"] and group["betas"] == ref_group["betas"]
    lr = group["lr"]
    r_old = full_r(opt)
    train_step(model, opt, WARMUP)
    step = (full_r(opt) - r_old).abs()
    torch.testing.assert_close(step, torch.full_like(step, lr), rtol=1e-4, atol=0)
    sched_step(sched)
    train_step(ref, ref_opt, WARMUP)
    sched_step(ref_sched)
    assert group["lr"] == ref_group["lr"] and group["betas"] == ref_group["betas"]


def test_manual_lr_change_applies_to_r():
    model, base, opt = build("SGD")
    run(model, opt, 0, WARMUP)
    for lr in (0.1, 0.0, 0.37):
        opt.param_groups[0]["lr"] = lr
        x, y = batch("mlp", 60)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        r = r0(opt)
        r_old, grad = r.detach().clone(), r.grad.clone()
        opt.step()
        assert torch.equal(r.detach(), r_old.add(grad, alpha=-lr))


# ======================================================================= 4. AMP: GradScaler + autocast
def _amp_step(model, opt, scaler, i, dtype, poison=None):
    x, y = batch("mlp", i)
    opt.zero_grad()
    with torch.autocast("cpu", dtype=dtype):
        out = model(x)
    assert out.dtype == dtype
    loss = F.cross_entropy(out.float(), y)
    scaler.scale(loss).backward()
    if poison is not None:
        with torch.no_grad():
            poison.grad.view(-1)[0] = float("inf")
    return loss.detach()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("opt_name", ["SGD", "Adam"])
def test_grad_scaler_autocast(opt_name, dtype):
    model, base, opt = build(opt_name)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=10_000)
    i = 0
    for _ in range(WARMUP - 1):
        _amp_step(model, opt, scaler, i, dtype)
        scaler.step(opt)
        scaler.update()
        i += 1
    assert (opt.phase, opt._step, scaler.get_scale()) == ("warmup", WARMUP - 1, 2.0**8)  # no step was skipped

    # an inf gradient on what would be the switch step: skipped, not counted, no early switch
    w = weights(model)
    _amp_step(model, opt, scaler, i, dtype, poison=model.fc1.weight)
    scaler.step(opt)
    scaler.update()
    i += 1
    assert (opt.phase, opt._step, scaler.get_scale()) == ("warmup", WARMUP - 1, 2.0**7)
    assert_same(weights(model), w)

    _amp_step(model, opt, scaler, i, dtype)
    scaler.step(opt)
    scaler.update()
    i += 1
    assert (opt.phase, opt._step) == ("embedded", WARMUP)
    assert opt.trainable_parameters() == MODES
    w0, r_sw = weights(model), full_r(opt)

    # embedded: scaler.unscale_ reaches r; the step uses the unscaled gradient
    r = r0(opt)
    _amp_step(model, opt, scaler, i, dtype)
    scaler.unscale_(opt)
    grad, r_old = r.grad.clone(), r.detach().clone()
    assert bool(torch.isfinite(grad).all()) and bool(grad.abs().sum() > 0)
    scaler.step(opt)
    scaler.update()
    i += 1
    assert opt._step == WARMUP + 1 and not torch.equal(r.detach(), r_old)
    if opt_name == "SGD":
        assert torch.equal(r.detach(), r_old.add(grad, alpha=-0.1))
    assert_weights_follow_r(opt, w0, r_sw)

    # an inf gradient on r: skipped, r and the weights untouched, not counted
    w, r_old = weights(model), r.detach().clone()
    _amp_step(model, opt, scaler, i, dtype, poison=r)
    scaler.step(opt)
    scaler.update()
    i += 1
    assert (opt.phase, opt._step, scaler.get_scale()) == ("embedded", WARMUP + 1, 2.0**6)
    assert torch.equal(r.detach(), r_old)
    assert_same(weights(model), w)

    losses = []
    for _ in range(3):
        losses.append(_amp_step(model, opt, scaler, i, dtype).item())
        scaler.step(opt)
        scaler.update()
        i += 1
    assert opt._step == WARMUP + 4 and all(math.isfinite(v) for v in losses)
    assert_weights_follow_r(opt, w0, r_sw)


# ======================================================================= 5. checkpoints in every phase
SAVE_POINTS = {
    "warmup-before-any-snapshot": 1,
    "warmup-after-snapshots": 5,
    "warmup-last-step": WARMUP - 1,
    "at-switch": WARMUP,
    "mid-embedded": WARMUP + 3,
}


def _checkpoint(model, opt, via, tmp_path, sched=None):
    ck = {"model": model.state_dict(), "opt": opt.state_dict()}
    if sched is not None:
        ck["sched"] = sched.state_dict()
    if via == "deepcopy":
        return copy.deepcopy(ck)
    path = tmp_path / "ck.pt"
    torch.save(ck, path)
    return torch.load(path, weights_only=True)


def _load(model, opt, ck, order):
    if order == "model-first":
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
    else:
        opt.load_state_dict(ck["opt"])
        model.load_state_dict(ck["model"])


def _round_trip(opt_name, save_at, order, via, tmp_path, total=TOTAL, kind="mlp", groups=None, **kw):
    model, base, opt = build(opt_name, kind=kind, groups=groups, **kw)
    losses = run(model, opt, 0, total, kind=kind)
    final_w, final_state = weights(model), (opt.phase, opt._step, opt.cycle)
    final_r = full_r(opt) if opt.space is not None else None

    model1, _, opt1 = build(opt_name, kind=kind, groups=groups, **kw)
    run(model1, opt1, 0, save_at, kind=kind)
    saved_phase = opt1.phase
    ck = _checkpoint(model1, opt1, via, tmp_path)
    del model1, opt1

    # different initial weights (and, with seed=None, a different drawn seed): the load must restore it all
    torch.manual_seed(4321)
    model2, base2, opt2 = build(opt_name, kind=kind, groups=groups, init_seed=999, **kw)
    _load(model2, opt2, ck, order)
    assert opt2.phase == saved_phase and opt2._step == save_at
    assert_nested_equal(opt2.state_dict(), ck["opt"])  # loading is lossless: saving again gives the same
    assert_same(weights(model2), ck["model"])
    assert opt2.param_groups is base2.param_groups and opt2.state is base2.state
    resumed = run(model2, opt2, save_at, total, kind=kind)
    assert len(resumed) == len(losses[save_at:])
    for i, (a, b) in enumerate(zip(losses[save_at:], resumed)):
        assert torch.equal(a, b), f"loss of step {save_at + i} differs"
    assert_same(weights(model2), final_w)
    assert (opt2.phase, opt2._step, opt2.cycle) == final_state
    if final_r is not None:
        assert torch.equal(full_r(opt2), final_r)
        assert opt2.trainable_parameters() == opt.trainable_parameters()
    return opt2


@pytest.mark.parametrize("via", ["deepcopy", "torch.save"])
@pytest.mark.parametrize("order", ["model-first", "opt-first"])
@pytest.mark.parametrize("save_at", list(SAVE_POINTS.values()), ids=list(SAVE_POINTS))
@pytest.mark.parametrize("opt_name", ["SGD-nesterov", "Adam", "AdamW", "Adagrad", "RMSprop"])
def test_state_dict_round_trip(opt_name, save_at, order, via, tmp_path):
    _round_trip(opt_name, save_at, order, via, tmp_path)


ROUND_TRIP_VARIANTS = {
    "bf16-recording": dict(record_dtype=torch.bfloat16),
    "ring-of-3-snapshots": dict(max_snapshots=3),
    "memory-mapped-recording": dict(max_snapshots=3),  # + record_dir=tmp_path
    "exclude-biases": dict(exclude=["*.bias"]),
    "init-fit": dict(init="fit"),
    "seed-None": dict(seed=None),
    "two-groups": dict(groups=lambda m: [
        {"params": [p for n, p in m.named_parameters() if n.endswith("weight")]},
        {"params": [p for n, p in m.named_parameters() if n.endswith("bias")], "lr": 0.003}]),
    "cmd-False-group": dict(groups=lambda m: [
        {"params": list(m.fc1.parameters())}, {"params": list(m.fc2.parameters()), "cmd": False}]),
}


@pytest.mark.parametrize("save_at", [5, WARMUP, WARMUP + 3], ids=["warmup", "at-switch", "mid-embedded"])
@pytest.mark.parametrize("variant", list(ROUND_TRIP_VARIANTS))
def test_state_dict_round_trip_variants(variant, save_at, tmp_path):
    kw = dict(ROUND_TRIP_VARIANTS[variant])
    if variant == "memory-mapped-recording":
        kw["record_dir"] = str(tmp_path / "snapshots")
    _round_trip("Adam", save_at, "opt-first" if save_at % 2 else "model-first", "torch.save", tmp_path, **kw)


@pytest.mark.parametrize("save_at", [3, WARMUP + 3], ids=["warmup", "mid-embedded"])
def test_state_dict_round_trip_smallcnn(save_at, tmp_path):
    _round_trip("Adam", save_at, "model-first", "torch.save", tmp_path, kind="cnn", total=WARMUP + 4)


RECLUSTER = dict(recluster_every=4, recluster_steps=6)  # warm-up 8, embedded 4, warm-up 6, embedded ...


@pytest.mark.parametrize("save_at", [WARMUP + 2, WARMUP + 4, WARMUP + 7, WARMUP + 10, WARMUP + 12],
                         ids=["embedded-0", "back-to-warmup", "warmup-1", "at-second-switch", "embedded-1"])
def test_state_dict_round_trip_reclustering(save_at, tmp_path):
    opt = _round_trip("SGD-nesterov", save_at, "opt-first", "torch.save", tmp_path, total=WARMUP + 13, **RECLUSTER)
    assert opt.cycle == 1 and opt.phase == "embedded" and len(opt.history) == 2


def test_state_dict_round_trip_with_scheduler(tmp_path):
    make = SCHEDULERS["LinearLR+CosineAnnealingLR"]
    model, _, opt = build("SGD-nesterov")
    sched = make(opt)
    losses = run(model, opt, 0, TOTAL, sched=sched)
    model1, _, opt1 = build("SGD-nesterov")
    sched1 = make(opt1)
    run(model1, opt1, 0, WARMUP + 1, sched=sched1)
    ck = _checkpoint(model1, opt1, "torch.save", tmp_path, sched=sched1)
    model2, _, opt2 = build("SGD-nesterov", init_seed=7)
    sched2 = make(opt2)
    _load(model2, opt2, ck, "opt-first")
    sched2.load_state_dict(ck["sched"])
    resumed = run(model2, opt2, WARMUP + 1, TOTAL, sched=sched2)
    assert all(torch.equal(a, b) for a, b in zip(losses[WARMUP + 1:], resumed))
    assert_same(weights(model2), weights(model))
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_state_dict_round_trip_after_export(tmp_path):
    model, _, opt = build("Adam")
    run(model, opt, 0, WARMUP + 2)
    opt.export()
    losses = run(model, opt, WARMUP + 2, TOTAL)
    model1, _, opt1 = build("Adam")
    run(model1, opt1, 0, WARMUP + 2)
    opt1.export()
    run(model1, opt1, WARMUP + 2, WARMUP + 4)
    ck = _checkpoint(model1, opt1, "torch.save", tmp_path)
    model2, _, opt2 = build("Adam", init_seed=5)
    _load(model2, opt2, ck, "opt-first")
    assert opt2.phase == "exported"
    resumed = run(model2, opt2, WARMUP + 4, TOTAL)
    assert all(torch.equal(a, b) for a, b in zip(losses[2:], resumed))
    assert_same(weights(model2), weights(model))


@pytest.mark.parametrize("later", [3, WARMUP, TOTAL], ids=["earlier-phase", "at-switch", "later-phase"])
@pytest.mark.parametrize("save_at", [5, WARMUP + 3], ids=["warmup", "embedded"])
def test_load_into_a_used_optimizer_rolls_back(save_at, later):
    """Loading into the same (already trained, maybe embedded) objects continues like the original."""
    model, _, opt = build("Adam")
    losses = run(model, opt, 0, TOTAL)
    model1, _, opt1 = build("Adam")
    run(model1, opt1, 0, save_at)
    ck = copy.deepcopy({"model": model1.state_dict(), "opt": opt1.state_dict()})
    model1b, _, opt1b = build("Adam")  # another run, moved on to another phase
    run(model1b, opt1b, 0, later)
    _load(model1b, opt1b, ck, "opt-first")
    resumed = run(model1b, opt1b, save_at, TOTAL)
    assert all(torch.equal(a, b) for a, b in zip(losses[save_at:], resumed))
    assert_same(weights(model1b), weights(model))
    assert opt1b.trainable_parameters() == MODES


# ======================================================================= 6. export
def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._state_dict_hooks)
               + len(m._load_state_dict_post_hooks) + len(m._load_state_dict_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("opt_name", ["SGD-nesterov", "Adam", "Adagrad"])
def test_export(opt_name, kind):
    model, base, opt = build(opt_name, kind=kind)
    names = [n for n, _ in model.named_parameters()]
    modules = [n for n, _ in model.named_modules()]
    orig = list(model.parameters())
    keys = list(model.state_dict())
    groups_before = group_snapshot(opt)
    hooks_before = _hooks(model)
    run(model, opt, 0, WARMUP + 3, kind=kind)
    assert opt.phase == "embedded"
    assert_r_registered(model, opt, names)
    x, _ = batch(kind, 77)
    with torch.no_grad():
        out_before = model(x)
    out_before_grad = model(x).detach()

    assert opt.export() is model
    assert opt.phase == "exported"
    with torch.no_grad():
        out_after = model(x)
    assert torch.equal(out_after, out_before) and torch.equal(model(x).detach(), out_before_grad)
    assert not hasattr(model, "cmd_modes") and [n for n, _ in model.named_modules()] == modules
    assert [n for n, _ in model.named_parameters()] == names
    assert all(a is b for a, b in zip(model.parameters(), orig))
    assert all(p.requires_grad for p in model.parameters())
    assert list(model.state_dict()) == keys
    assert _hooks(model) == hooks_before
    assert group_snapshot(opt) == groups_before
    assert all(a is b for a, b in zip(opt.param_groups[0]["params"], orig))
    assert opt.trainable_parameters() == sum(p.numel() for p in orig)

    # training goes on exactly like the plain base optimizer (fresh state for the weights)
    ref, ref_opt = build_plain(opt_name, kind=kind)
    ref.load_state_dict(model.state_dict())
    step0 = opt._step
    for i in range(TOTAL, TOTAL + 3):
        assert torch.equal(train_step(model, opt, i, kind=kind), train_step(ref, ref_opt, i, kind=kind))
    assert_same(weights(model), weights(ref))
    assert opt.phase == "exported" and opt._step == step0 + 3
    assert [n for n, _ in model.named_parameters()] == names


def test_export_during_warmup_continues_as_plain_run():
    model, base, opt = build("Adam")
    ref, ref_opt = build_plain("Adam")
    run(model, opt, 0, 5)
    run(ref, ref_opt, 0, 5)
    opt.export()
    assert opt.phase == "exported" and opt.recording_bytes == 0
    for i in range(5, TOTAL):  # never switches, keeps the Adam moments of the warm-up
        assert torch.equal(train_step(model, opt, i), train_step(ref, ref_opt, i))
    assert_same(weights(model), weights(ref))
    assert opt.phase == "exported" and not hasattr(model, "cmd_modes")
    assert [n for n, _ in model.named_parameters()] == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]


# ======================================================================= 7. what stays trainable
def _numel(params):
    return sum(p.numel() for p in params)


@pytest.mark.parametrize("exclude", [["*.bias"], lambda n, p: p.ndim < 2], ids=["patterns", "predicate"])
@pytest.mark.parametrize("opt_name", ["SGD", "Adam"])
def test_exclude_keeps_params_trainable(opt_name, exclude):
    model, base, opt = build(opt_name, exclude=exclude)
    biases = [model.fc1.bias, model.fc2.bias]
    assert opt.embedded_names == ["fc1.weight", "fc2.weight"]
    run(model, opt, 0, WARMUP)
    assert opt.phase == "embedded"
    assert opt.trainable_parameters() == MODES + _numel(biases)
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(r0(opt))} | {id(b) for b in biases}
    params = opt.param_groups[0]["params"]
    assert len(params) == 3 and params[-1] is r0(opt) and all(a is b for a, b in zip(params, biases))
    old = [b.detach().clone() for b in biases]
    w0, r_sw = weights(model), full_r(opt)
    run(model, opt, WARMUP, WARMUP + 2)
    assert all(not torch.equal(b.detach(), o) for b, o in zip(biases, old))  # the excluded params train
    assert_weights_follow_r(opt, w0, r_sw)


def test_cmd_false_group_stays_trainable():
    groups = lambda m: [{"params": list(m.fc1.parameters())},  # noqa: E731
                        {"params": list(m.fc2.parameters()), "cmd": False, "lr": 0.05}]
    model, base, opt = build("SGD", groups=groups)
    kept = list(model.fc2.parameters())
    assert opt.embedded_names == ["fc1.weight", "fc1.bias"]
    run(model, opt, 0, WARMUP)
    assert opt.phase == "embedded" and len(opt.param_groups) == 2
    assert opt.trainable_parameters() == MODES + _numel(kept)
    assert opt.param_groups[0]["params"] == [r0(opt)]
    assert all(a is b for a, b in zip(opt.param_groups[1]["params"], kept)) and len(opt.param_groups[1]["params"]) == 2
    assert all(p.requires_grad for p in kept) and opt.param_groups[1]["cmd"] is False
    x, y = batch("mlp", 40)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    old = [(p.detach().clone(), p.grad.clone()) for p in kept]
    opt.step()
    for p, (w, g) in zip(kept, old):  # plain SGD with this group's lr
        assert torch.equal(p.detach(), w.add(g, alpha=-0.05))


LAYOUTS = {
    # weights vs biases with different lr: every mode is mostly weights, the bias group ends up empty
    "weights-vs-biases": lambda m, lr_a, lr_b, wd: [
        {"params": [m.fc1.weight, m.fc2.weight], "lr": lr_a},
        {"params": [m.fc1.bias, m.fc2.bias], "lr": lr_b}],
    # a strongly decayed second group: its weights shrink together and win some modes of their own
    "decaying-group": lambda m, lr_a, lr_b, wd: [
        {"params": [m.fc1.weight], "lr": lr_a},
        {"params": [m.fc1.bias, m.fc2.weight, m.fc2.bias], "lr": lr_b, "weight_decay": wd}],
}


def _check_majority_vote(layout, opt_name, lr_a, lr_b, wd):
    model, base, opt = build(opt_name, groups=lambda m: LAYOUTS[layout](m, lr_a, lr_b, wd), n_modes=4)
    group_of = {id(p): gi for gi, g in enumerate(base.param_groups) for p in g["params"]}
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    before = group_snapshot(opt)
    run(model, opt, 0, WARMUP)
    space = opt.space
    assert opt.phase == "embedded" and group_snapshot(opt) == before and len(opt.param_groups) == 2
    # expected: each mode goes to the group holding most of its (moving) weights
    votes = torch.zeros(4, 2, dtype=torch.int64)
    for name, a, lab in zip(space.names, space.a, space.mode_index()):
        votes[:, group_of[id(params[name])]] += torch.bincount(lab[a != 0], minlength=4)
    expected = votes.argmax(dim=1)
    assert torch.equal(space.r_groups, expected), votes
    assert_r_registered(model, opt, names)
    assert sum(r.numel() for r in space.r_params) == 4 == opt.trainable_parameters()
    for gi, group in enumerate(opt.param_groups):
        n_expected = int((expected == gi).sum())
        if n_expected:
            assert len(group["params"]) == 1 and group["params"][0].numel() == n_expected
            assert any(group["params"][0] is r for r in space.r_params)
        else:
            assert group["params"] == []
    assert sorted(id(g["params"][0]) for g in opt.param_groups if g["params"]) == sorted(map(id, space.r_params))
    # each r tensor is stepped with its own group's hyper-parameters: exactly what a fresh base
    # optimizer of the same class does to a copy of it
    x, y = batch("mlp", 41)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    expected_r = []
    for g in opt.param_groups:
        for p in g["params"]:
            twin = p.detach().clone().requires_grad_(True)
            twin.grad = p.grad.clone()
            type(base)([{**{k: v for k, v in g.items() if k != "params"}, "params": [twin]}]).step()
            expected_r.append((p, twin.detach()))
    opt.step()
    for p, want in expected_r:
        assert torch.equal(p.detach(), want)
    return len({int(v) for v in expected}) == 2


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_param_groups_majority_vote(layout):
    configs = [("SGD", 0.1, 0.05, 5.0), ("AdamW", 1e-2, 3e-3, 5.0), ("Adam", 1e-2, 3e-3, 0.0)]
    splits = [_check_majority_vote(layout, *c) for c in configs]
    if layout == "decaying-group":  # the layout is there to make the vote non-trivial
        assert any(splits)


@pytest.mark.parametrize("opt_name,scale", [("SGD", "norm"), ("SGD-nesterov", "norm"), ("Adam", "rms"),
                                            ("AdamW", "rms"), ("RMSprop", "rms"), ("Adagrad", "rms")])
def test_mode_scale_auto(opt_name, scale):
    """'auto': unit-norm mode directions for SGD, RMS(a) = 1 per mode for scale-invariant optimizers."""
    model, base, opt = build(opt_name)
    assert opt.mode_scale == scale
    run(model, opt, 0, WARMUP)
    space = opt.space
    sq = torch.zeros(MODES, dtype=torch.float64)
    count = torch.zeros(MODES, dtype=torch.float64)
    for a, lab in zip(space.a, space.mode_index()):
        moving = a != 0
        sq += torch.bincount(lab[moving], weights=a[moving].double() ** 2, minlength=MODES)
        count += torch.bincount(lab[moving], minlength=MODES).double()
    norm = sq if scale == "norm" else sq / count
    torch.testing.assert_close(norm, torch.ones(MODES, dtype=torch.float64), rtol=1e-5, atol=0)


def test_reclustering_keeps_groups_and_counts():
    model, base, opt = build("SGD", **RECLUSTER)
    ref, ref_opt = build_plain("SGD")
    before = group_snapshot(opt)
    orig = list(model.parameters())
    n_all = _numel(orig)
    phases = []
    for i in range(WARMUP + 14):
        train_step(model, opt, i)
        phases.append((opt.phase, opt.cycle, opt.trainable_parameters()))
        assert group_snapshot(opt) == before
    assert phases[WARMUP - 2] == ("warmup", 0, n_all)
    assert phases[WARMUP - 1] == ("embedded", 0, MODES)
    assert phases[WARMUP + 3] == ("warmup", 1, n_all)  # after recluster_every=4 embedded steps
    assert phases[WARMUP + 9] == ("embedded", 1, MODES)  # after recluster_steps=6 full steps
    assert len(opt.history) == 2 and opt.history[1]["cycle"] == 1


# ======================================================================= 8. LBFGS (step(closure))
def _lbfgs_step(model, opt, i, record=None):
    x, y = random_label_batch(i)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if record is not None:
            record.append((full_r(opt), loss.detach().clone()))
        return loss

    return opt.step(closure).detach(), (x, y)


@pytest.mark.parametrize("opt_name", ["LBFGS", "LBFGS-strong-wolfe"])
def test_lbfgs_warmup_matches_plain_and_counts_steps(opt_name):
    model, base, opt = build(opt_name)
    ref, ref_opt = build_plain(opt_name)
    for i in range(WARMUP):
        assert opt._step == i
        la, _ = _lbfgs_step(model, opt, i)
        lb, _ = _lbfgs_step(ref, ref_opt, i)
        assert torch.equal(la, lb)
        assert_same(weights(model), weights(ref))
        if i == WARMUP - 2:  # (the weights' LBFGS state is dropped at the switch)
            assert base.state[base.param_groups[0]["params"][0]]["func_evals"] > i + 1  # several evals per step
    assert (opt.phase, opt._step, opt.trainable_parameters()) == ("embedded", WARMUP, MODES)


@pytest.mark.parametrize("opt_name", ["LBFGS", "LBFGS-strong-wolfe"])
def test_lbfgs_embedded_closure_sees_weights_of_r(opt_name):
    """LBFGS evaluates its closure several times per step, at different r: the wrapper must bring
    the weights up to date before each evaluation (and LBFGS's caches of the parameter set must be
    reset at the switch)."""
    model, base, opt = build(opt_name)
    for i in range(WARMUP):
        _lbfgs_step(model, opt, i)
    assert opt.phase == "embedded"
    space = opt.space
    w0, r_sw = weights(model), full_r(opt)

    def loss_at(r, x, y):
        """Loss of the plain model whose weights are w_switch + a * (r - r_switch)[m]."""
        ref = MLP()
        sd = dict(w0)
        for name, a, lab in zip(space.names, space.a, space.mode_index()):
            sd[name] = (w0[name].reshape(-1) + a * (r - r_sw)[lab]).view_as(w0[name])
        ref.load_state_dict(sd)
        with torch.no_grad():
            return F.cross_entropy(ref(x), y)

    for i in range(WARMUP, WARMUP + 3):
        record = []
        returned, (x, y) = _lbfgs_step(model, opt, i, record)
        assert len(record) >= 2  # several evaluations at different r
        assert len({tuple(r.tolist()) for r, _ in record}) == len(record)
        assert torch.equal(returned, record[0][1])
        for r, loss in record:  # every evaluation saw weights consistent with the r of that moment
            torch.testing.assert_close(loss, loss_at(r, x, y), rtol=1e-5, atol=1e-6)
        # after the step: the model is consistent with the final r
        assert_weights_follow_r(opt, w0, r_sw)
        with torch.no_grad():
            torch.testing.assert_close(F.cross_entropy(model(x), y), loss_at(full_r(opt), x, y),
                                       rtol=1e-5, atol=1e-6)
    assert opt._step == WARMUP + 3 and not torch.equal(full_r(opt), r_sw)


def test_lbfgs_with_first_param_excluded():
    """LBFGS keeps its curvature history under its first parameter; when that parameter stays
    free, the history (vectors over the old parameter set) must not survive the switch."""
    model, base, opt = build("LBFGS", exclude=["fc1.weight"])
    for i in range(WARMUP):
        _lbfgs_step(model, opt, i)
    assert opt.phase == "embedded"
    assert opt.trainable_parameters() == MODES + model.fc1.weight.numel()
    for i in range(WARMUP, WARMUP + 3):
        loss, _ = _lbfgs_step(model, opt, i)
        assert math.isfinite(loss.item())
    assert opt._step == WARMUP + 3


# ======================================================================= 9. model classes
def test_sequential_model():
    """nn.Sequential runs every child module: the mode scalars must not be one."""
    make = lambda: nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))  # noqa: E731
    torch.manual_seed(1)
    model = make()
    names = [n for n, _ in model.named_parameters()]
    keys = list(model.state_dict())
    opt = CMDOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), **CMD_KW)
    run(model, opt, 0, WARMUP)
    assert opt.phase == "embedded" and opt.trainable_parameters() == MODES
    assert_r_registered(model, opt, names)
    assert list(model.state_dict()) == keys and [n for n, _ in model.named_children()] == ["0", "1", "2"]
    w0, r_sw = weights(model), full_r(opt)
    x, y = batch("mlp", 90)
    ref = make()
    ref.load_state_dict(model.state_dict())
    F.cross_entropy(ref(x), y).backward()
    expected = torch.zeros(MODES, dtype=torch.float64)
    grads = dict(ref.named_parameters())
    for name, a, lab in zip(opt.space.names, opt.space.a, opt.space.mode_index()):
        expected += torch.bincount(lab, weights=grads[name].grad.reshape(-1).double() * a.double(), minlength=MODES)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    torch.testing.assert_close(full_r_grad(opt.space), expected, rtol=1e-5, atol=1e-9)
    opt.step()
    run(model, opt, WARMUP + 1, WARMUP + 3)
    assert_weights_follow_r(opt, w0, r_sw)
    with torch.no_grad():
        out = model(x)
    opt.export()
    assert [n for n, _ in model.named_parameters()] == names and list(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(model(x), out)


# ======================================================================= 10. step(closure) for any optimizer
@pytest.mark.parametrize("opt_name", ["SGD", "Adam", "RMSprop"])
def test_step_with_closure(opt_name):
    model, base, opt = build(opt_name)
    for i in range(WARMUP + 3):
        x, y = batch("mlp", i)
        with torch.no_grad():
            expected = F.cross_entropy(model(x), y)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        phase = opt.phase
        returned = opt.step(closure)
        assert torch.equal(returned.detach(), expected), (i, phase)
    assert opt.phase == "embedded" and opt._step == WARMUP + 3
