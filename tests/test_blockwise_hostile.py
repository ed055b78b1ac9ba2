"""BlockwiseCMD under hostile use (issue #26): NaN/inf never loops silently, damaged checkpoints are
refused before anything changes, bad arguments are refused at construction saying what to do.

Each numbered item and rough edge of the issue has a test here asserting the behaviour and its message.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import modeopt
from modeopt.optim.nonfinite import NonFiniteWarning

from _small import _one_thread  # noqa: F401  (fixture)
from test_blockwise import PER_BLOCK, Stack, X, Y, make, train

NAN = float("nan")


def backward(model, opt, i: int = 0, scale: float = 1.0):
    idx = torch.arange(i * 32, i * 32 + 32) % len(Y)
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(X[idx]), Y[idx]) * scale
    loss.backward()
    return loss


def frozen_state(model, opt):
    """Everything a skipped step must leave as it was: weights, every r, the base state, counters."""
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [s.r_full().detach().clone() for s in opt.spaces], str(opt.base.state_dict()), opt.step_count,
            opt.active)


def same(a, b) -> bool:
    """Equal bit for bit, NaN where NaN."""
    return a.shape == b.shape and a.dtype == b.dtype and bool(((a == b) | (a.isnan() & b.isnan())).all())


def assert_unchanged(model, opt, before):
    weights, rs, base, step, active = before
    assert all(same(v, weights[k]) for k, v in model.state_dict().items())
    assert all(same(s.r_full().detach(), r) for s, r in zip(opt.spaces, rs))
    assert str(opt.base.state_dict()) == base and opt.step_count == step and opt.active == active


# ------------------------------------------------------------------ 1: non-finite gradients
@pytest.mark.parametrize("where", ["layers.1.0.weight", "layers.1.0.bias", "head.weight", "r"])
def test_1_a_nonfinite_gradient_of_any_tensor_the_step_changes_skips_the_whole_step(where):
    """Active block (embedded later / excluded), train_always, a finished block's r: GradScaler-like."""
    model, opt = make()
    train(model, opt, PER_BLOCK + 1)  # block 0 finished, block 1 (layers.1.) active
    backward(model, opt, PER_BLOCK + 1)
    params = dict(model.named_parameters())
    t = opt.spaces[0].r_params[0] if where == "r" else params[where]
    t.grad.view(-1)[0] = float("inf") if where == "head.weight" else NAN
    before = frozen_state(model, opt)
    name = opt.spaces[0].r_qualified_names[0] if where == "r" else where
    with pytest.warns(NonFiniteWarning, match=rf"step {PER_BLOCK + 2}: the gradient of '{name}' holds NaN/inf: the "
                      r"step is skipped \(nothing changes, the step is not counted\)"):
        assert opt.step() is None
    assert_unchanged(model, opt, before)
    assert opt.skipped_steps == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning only; later skips are counted silently
        backward(model, opt, PER_BLOCK + 1, scale=NAN)
        assert opt.step() is None
    assert opt.skipped_steps == 2
    losses = train(model, opt, 2 * PER_BLOCK, PER_BLOCK + 1)  # and training goes on through the next embedding
    assert torch.isfinite(torch.tensor(losses)).all() and opt.active == 3 and opt.step_count == 3 * PER_BLOCK + 1


@pytest.mark.parametrize("where", ["head.weight", "layers.1.0.weight", "layers.0.0.weight", "layers.2.0.weight"])
def test_1_nan_already_in_the_weights_is_an_error_naming_the_tensor_not_an_endless_skip(where):
    """train_always, active, finished (embedded) and not yet reached (frozen) weights."""
    model, opt = make()
    train(model, opt, PER_BLOCK + 1)
    with torch.no_grad():
        dict(model.named_parameters())[where].view(-1)[3] = NAN
    before = frozen_state(model, opt)
    backward(model, opt, PER_BLOCK + 1)
    with pytest.raises(ValueError, match=rf"step {PER_BLOCK + 2}: parameter '{where}' holds NaN/inf.*nothing "
                       r"changed.*learning rate.*resume from a checkpoint"):
        opt.step()
    assert opt.skipped_steps == 0
    assert_unchanged(model, opt, before)


def test_1_a_step_that_makes_a_trained_weight_overflow_is_an_error_naming_it():
    torch.manual_seed(0)
    model = Stack()
    opt = modeopt.BlockwiseCMD(model, torch.optim.SGD(model.parameters(), lr=0.05), find_blocks_of(model),
                               steps_per_block=PER_BLOCK, n_modes=3, n_samples=200)
    train(model, opt, 2)
    opt.param_groups[0]["lr"] = 1e30
    backward(model, opt, 2, scale=1e10)  # finite gradients; the step moves the weights by ~1e40: inf in float32
    with pytest.raises(ValueError, match=r"step 3: parameter 'layers.0.0.weight' is NaN/inf after the step, from a "
                       r"finite gradient: the step overflowed \(lower the learning rate.*resume from a checkpoint"):
        opt.step()


def test_1_finite_weights_whose_every_step_is_skipped_stop_the_run_after_max_consecutive_skips():
    """Found by the second pass: Adam at lr=1e30 moves the weights to ~1e30, finite, and every forward
    overflows from then on: each step was skipped, silently after the first warning, for ever."""
    model, opt = make()
    train(model, opt, 2)
    opt.max_consecutive_skips = 3
    with pytest.warns(NonFiniteWarning):
        for _ in range(3):
            backward(model, opt, 2, scale=NAN)
            opt.step()
    train(model, opt, 1, 2)  # a step taken: the count starts again
    for _ in range(3):
        backward(model, opt, 3, scale=NAN)
        opt.step()
    before = frozen_state(model, opt)
    backward(model, opt, 3, scale=NAN)
    with pytest.raises(ValueError, match=r"step 4: the last 4 steps were all skipped \(NaN/inf gradients from finite "
                       r"weights\).*the training is stuck; nothing changed.*opt.max_consecutive_skips"):
        opt.step()
    assert_unchanged(model, opt, before)
    assert opt.skipped_steps == 6


def test_the_finiteness_check_is_exact_also_when_a_sum_of_finite_values_overflows():
    """finite() reads sums first (a NaN/inf element makes the sum NaN/inf) and only then the elements."""
    from modeopt.optim.nonfinite import finite

    big = torch.full((1000,), 3e38)  # finite, its sum overflows
    assert finite([big]) and finite([big.bfloat16()]) and finite([torch.full((10,), 6e4, dtype=torch.float16)])
    for bad in (NAN, float("inf"), -float("inf")):
        x = torch.randn(100)
        x[7] = bad
        assert not finite([torch.randn(3), x]) and not finite([big, x])
    assert not finite([torch.tensor([float("inf"), -float("inf")])])  # sums to NaN
    assert finite([None, torch.zeros(0), torch.arange(3)])


# ------------------------------------------------------------------ 2: step(closure)
def test_2_a_nan_loss_in_a_closure_skips_the_step_like_without_one():
    model, opt = make()
    train(model, opt, PER_BLOCK + 1)
    before = frozen_state(model, opt)

    def closure():
        return backward(model, opt, PER_BLOCK + 1, scale=NAN)

    with pytest.warns(NonFiniteWarning, match="holds NaN/inf: the step is skipped"):
        loss = opt.step(closure)
    assert torch.isnan(loss) and opt.skipped_steps == 1
    assert_unchanged(model, opt, before)


def test_2_a_closure_step_trains_exactly_as_a_step_after_backward():
    model, opt = make()
    model2, opt2 = make()
    for i in range(PER_BLOCK + 3):
        want = backward(model, opt, i)
        opt.step()
        assert torch.equal(opt2.step(lambda: backward(model2, opt2, i)), want)  # the closure's loss comes back
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), model2.state_dict().values()))


# ------------------------------------------------------------------ 3: r overflows
def test_3_an_r_overflowing_from_a_finite_gradient_is_put_back_with_a_warning():
    torch.manual_seed(0)
    model = Stack()
    sgd = torch.optim.SGD(model.parameters(), lr=0.05)
    opt = modeopt.BlockwiseCMD(model, sgd, steps_per_block=PER_BLOCK, n_modes=3, train_always=["head."],
                               n_samples=200)
    train(model, opt, PER_BLOCK + 1)
    backward(model, opt, PER_BLOCK + 1)
    r = opt.spaces[0].r_params[0]
    r.grad[0] = -3e38  # finite, but the step overflows r: r - lr * g = r + 3e39 -> inf
    opt.param_groups[0]["lr"] = 10.0
    for p in model.parameters():
        if p is not r:
            p.grad = None  # only r moves in this step
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    r_before = opt.spaces[0].r_full().detach().clone()
    with pytest.warns(NonFiniteWarning, match=r"step 8: block 0's mode scalars r overflowed to NaN/inf from a "
                      r"finite gradient: put back.*Lower the learning rate"):
        opt.step()
    assert torch.equal(opt.spaces[0].r_full().detach(), r_before)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert opt.r_restores == 1 and opt.step_count == PER_BLOCK + 2  # the rest of the step was applied
    opt.param_groups[0]["lr"] = 0.05
    losses = train(model, opt, PER_BLOCK, PER_BLOCK + 2)
    assert torch.isfinite(torch.tensor(losses)).all() and opt.active == 2


# ------------------------------------------------------------------ 4: damaged checkpoints
def _nan(t):
    t.view(-1)[0] = NAN


@pytest.mark.parametrize("case", [
    ("finished block's r", lambda sd: _nan(sd["blockwise"]["spaces"][0]["r"]), r"block 0's saved r holds NaN/inf"),
    ("base state of r", lambda sd: _nan(sd["base"]["state"][max(sd["base"]["state"])]["exp_avg"]),
     r"base optimizer's state 'exp_avg' of 'head.modeopt_block0_r0' holds NaN/inf"),
    ("base state of a weight", lambda sd: _nan(sd["base"]["state"][0]["exp_avg_sq"]),
     r"base optimizer's state 'exp_avg_sq' of 'layers.0.0.bias' holds NaN/inf"),
    ("one tensor's recording", lambda sd: _nan(sd["blockwise"]["buffer"][0]["data"][1]),
     r"recording of 'layers.1.0.weight' holds NaN/inf"),
    ("the recording's baseline", lambda sd: _nan(sd["blockwise"]["buffer"][0]["anchor"]),
     r"recording of 'layers.1.0.weight' holds NaN/inf"),
    ("recordings out of step", lambda sd: sd["blockwise"]["buffer"][0].update(steps=[6, 7, 8, 10]),
     r"recording of 'layers.1.2.weight' was taken at steps \[6, 7, 8, 9\], that of 'layers.1.0.weight' at "
     r"\[6, 7, 8, 10\]"),
    ("skipped_steps", lambda sd: sd["blockwise"].update(skipped_steps=-1), r"skipped_steps"),
    ("n_modes", lambda sd: sd["blockwise"].update(n_modes="4"), r"n_modes"),
], ids=lambda c: c[0])
def test_4_damaged_checkpoints_are_refused_naming_the_tensor_before_anything_changes(case):
    _, edit, msg = case
    model, opt = make(exclude=["*.bias"])  # block 1: layers.1.0.weight and layers.1.2.weight
    train(model, opt, PER_BLOCK + 3)
    sd = copy.deepcopy(opt.state_dict())
    edit(sd)
    model2, opt2 = make(exclude=["*.bias"])
    model2.load_state_dict(model.state_dict())
    train(model2, opt2, 2)
    snapshot = copy.deepcopy(opt2.state_dict())
    with pytest.raises(ValueError, match=msg):
        opt2.load_state_dict(sd)
    assert str(opt2.state_dict()) == str(snapshot) and opt2.active == 0
    assert not any("modeopt" in n for n, _ in model2.named_parameters())


def test_4_every_float_tensor_of_a_checkpoint_with_nan_is_refused():
    """Walk the whole checkpoint: NaN in any floating tensor of it is refused with ValueError."""
    model, opt = make()
    train(model, opt, PER_BLOCK + 3)
    good = opt.state_dict()
    paths = []

    def walk(x, path):
        if isinstance(x, torch.Tensor):
            if x.is_floating_point() and x.numel():
                paths.append(path)
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, path + (k,))
        elif isinstance(x, (list, tuple)):
            for k, v in enumerate(x):
                walk(v, path + (k,))

    walk(good, ())
    assert len(paths) > 10
    model2, opt2 = make()
    for path in paths:
        sd = copy.deepcopy(good)
        t = sd
        for k in path:
            t = t[k]
        _nan(t)
        with pytest.raises(ValueError, match="NaN/inf"):
            opt2.load_state_dict(sd)
        assert opt2.active == 0 and opt2.step_count == 0


# ------------------------------------------------------------------ 5: half precision
def test_5_half_precision_weights_train_without_a_warning_and_stay_exact():
    """bf16 weights are formed from their switch-time values (tests/test_half_precision.py checks 1,000 steps):
    the drift warning the issue asked for until then is gone, and a finished block is exactly a*(r - r_s) away."""
    import warnings

    torch.manual_seed(0)
    model = Stack().to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        opt = modeopt.BlockwiseCMD(model, torch.optim.AdamW(model.parameters(), lr=1e-2), steps_per_block=PER_BLOCK,
                                   n_modes=3, n_samples=200)
    x = torch.randn(16, 8, dtype=torch.bfloat16)
    for _ in range(PER_BLOCK + 5):  # the first block is embedded, then moves along its modes
        opt.zero_grad()
        model(x).float().pow(2).mean().backward()
        opt.step()
    assert opt.active == 1
    assert all(torch.isfinite(v.float()).all() for v in model.state_dict().values())


# ------------------------------------------------------------------ 6: train_always
class Tied(nn.Module):
    """An LM with its head tied to the embedding (GPT-2's lm_head / wte)."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(10, 32)
        self.layers = nn.ModuleList(nn.Linear(32, 32) for _ in range(2))
        self.lm_head = nn.Linear(32, 10, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, x):
        h = self.wte(x)
        for layer in self.layers:
            h = h + torch.tanh(layer(h))
        return self.lm_head(h)


def test_6_a_train_always_prefix_matching_no_trained_parameter_is_refused():
    torch.manual_seed(0)
    model = Stack()
    adam = lambda: torch.optim.AdamW(model.parameters(), lr=1e-2)  # noqa: E731
    with pytest.raises(ValueError, match=r"train_always prefix 'haed\.' matches no parameter of the model.*"
                       r"did you mean 'head\.'"):
        modeopt.BlockwiseCMD(model, adam(), steps_per_block=PER_BLOCK, train_always=["haed."])
    with pytest.raises(ValueError, match=r"train_always prefix 'head\.' matches only parameters the base optimizer "
                       r"does not hold.*head.weight"):
        modeopt.BlockwiseCMD(model, torch.optim.AdamW(model.layers.parameters()), steps_per_block=PER_BLOCK,
                             train_always=["head."])
    lm = Tied()
    with pytest.raises(ValueError, match=r"train_always prefix 'lm_head\.' matches only 'lm_head.weight', tied to "
                       r"'wte.weight'.*train_always=\['wte\.'\]"):
        modeopt.BlockwiseCMD(lm, torch.optim.AdamW(lm.parameters()), steps_per_block=PER_BLOCK, train_always=["lm_head."])
    model.head.requires_grad_(False)
    with pytest.raises(ValueError, match=r"train_always prefix 'head\.' matches only parameters frozen "
                       r"\(requires_grad=False\)"):
        modeopt.BlockwiseCMD(model, adam(), steps_per_block=PER_BLOCK, train_always=["head."])


# ------------------------------------------------------------------ 7, 8: dtypes and base optimizers
def test_7_coef_and_record_dtypes_are_validated():
    torch.manual_seed(0)
    model = Stack()
    adam = lambda: torch.optim.AdamW(model.parameters(), lr=1e-2)  # noqa: E731
    with pytest.raises(ValueError, match=r"coef_dtype must be torch.float32, torch.bfloat16 or torch.int8.*got torch.int32"):
        modeopt.BlockwiseCMD(model, adam(), steps_per_block=PER_BLOCK, coef_dtype=torch.int32)
    with pytest.raises(ValueError, match=r"record_dtype must be a floating-point torch.dtype.*, got torch.int8"):
        modeopt.BlockwiseCMD(model, adam(), steps_per_block=PER_BLOCK, record_dtype=torch.int8)
    with pytest.raises(ValueError, match=r"record_dtype must be a floating-point torch.dtype.*, got 'bf16'"):
        modeopt.BlockwiseCMD(model, adam(), steps_per_block=PER_BLOCK, record_dtype="bf16")


def test_8_base_optimizers_that_cannot_train_r_are_refused_at_construction():
    torch.manual_seed(0)
    model = Stack()
    if hasattr(torch.optim, "Muon"):
        with pytest.raises(TypeError, match=r"torch.optim.Muon updates only 2-D matrices.*mode scalars r"):
            modeopt.BlockwiseCMD(model, torch.optim.Muon([p for p in model.parameters() if p.ndim == 2]),
                                 steps_per_block=PER_BLOCK)
    with pytest.raises(TypeError, match=r"SparseAdam takes only sparse gradients.*r is dense"):
        modeopt.BlockwiseCMD(model, torch.optim.SparseAdam(list(model.parameters())), steps_per_block=PER_BLOCK)
    opt = modeopt.BlockwiseCMD(model, torch.optim.AdamW(model.parameters()), steps_per_block=PER_BLOCK)
    with pytest.raises(TypeError, match="base_optimizer is already a BlockwiseCMD"):
        modeopt.BlockwiseCMD(model, opt, steps_per_block=PER_BLOCK)
    opt.export()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch only warns about a parameter listed twice in one group
        twice = torch.optim.AdamW([*model.parameters(), model.head.weight])
    with pytest.raises(ValueError, match=r"lists the parameter 'head.weight' twice"):
        modeopt.BlockwiseCMD(model, twice, steps_per_block=PER_BLOCK)


# ------------------------------------------------------------------ rough edges
def test_rough_edges_bad_arguments_say_what_to_do():
    torch.manual_seed(0)
    model = Stack()
    adam = lambda: torch.optim.AdamW(model.parameters(), lr=1e-2)  # noqa: E731
    with pytest.raises(TypeError, match=r"blocks must be a list of parameter-name prefixes.*got 123"):
        modeopt.BlockwiseCMD(model, adam(), [123], steps_per_block=PER_BLOCK)
    with pytest.raises(TypeError, match=r"blocks must be a list of parameter-name prefixes.*got \['a\.', 4\]"):
        modeopt.BlockwiseCMD(model, adam(), ["layers.0.", ["a.", 4]], steps_per_block=PER_BLOCK)
    with pytest.raises(TypeError, match=r"train_always must be a list of parameter-name prefixes.*got 7"):
        modeopt.BlockwiseCMD(model, adam(), steps_per_block=PER_BLOCK, train_always=[7])
    with pytest.raises(TypeError, match=r"exclude must be a predicate f\(name, param\) or a list of fnmatch patterns.*"
                       r"got 5"):
        modeopt.BlockwiseCMD(model, adam(), steps_per_block=PER_BLOCK, exclude=5)
    with pytest.raises(TypeError, match=r"model must be an nn.Module, got NoneType"):
        modeopt.BlockwiseCMD(None, adam(), steps_per_block=PER_BLOCK)
    with pytest.raises(ValueError, match=r"seed must be an integer, got 'abc'"):
        modeopt.BlockwiseCMD(model, adam(), steps_per_block=PER_BLOCK, seed="abc")
    with pytest.raises(ValueError, match=r"mode_scale must be 'auto', 'rms' or 'norm'"):
        modeopt.BlockwiseCMD(model, adam(), steps_per_block=PER_BLOCK, mode_scale="l2")
    model.layers[1].requires_grad_(False)
    with pytest.raises(ValueError, match=r"block 1 \['layers.1.'\] has no parameter to embed: its parameters are all "
                       r"frozen \(requires_grad=False\)"):
        modeopt.BlockwiseCMD(model, adam(), find_blocks_of(model), steps_per_block=PER_BLOCK)


def find_blocks_of(model):
    return modeopt.blockwise.find_blocks(model)


def test_rough_edges_a_checkpoint_with_other_n_modes_warns_and_is_adopted():
    model, opt = make(n_modes=4)
    train(model, opt, PER_BLOCK + 2)
    sd = copy.deepcopy(opt.state_dict())  # torch's state_dict() holds the live moments
    model2, opt2 = make(n_modes=6)
    model2.load_state_dict(model.state_dict())
    with pytest.warns(UserWarning, match=r"the checkpoint was trained with n_modes=4; this BlockwiseCMD was built "
                      r"with n_modes=6: opt.n_modes is now 4"):
        opt2.load_state_dict(sd)
    assert opt2.n_modes == 4
    assert train(model2, opt2, 2 * PER_BLOCK, PER_BLOCK + 2) == train(model, opt, 2 * PER_BLOCK, PER_BLOCK + 2)
    assert [h["n_modes"] for h in opt2.history] == [h["n_modes"] for h in opt.history]


def test_rough_edges_skipped_steps_and_r_restores_survive_resume():
    model, opt = make()
    train(model, opt, PER_BLOCK + 1)
    with pytest.warns(NonFiniteWarning):
        for _ in range(3):
            backward(model, opt, 0, scale=NAN)
            opt.step()
    opt.r_restores = 2
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    model2, opt2 = make()
    model2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    assert opt2.skipped_steps == 3 and opt2.r_restores == 2
    old = copy.deepcopy(ck["opt"])  # a checkpoint from before these were saved: counters start at 0
    del old["blockwise"]["skipped_steps"], old["blockwise"]["r_restores"], old["blockwise"]["n_modes"]
    opt2.load_state_dict(old)
    assert opt2.skipped_steps == 0 and opt2.r_restores == 0


# ================================================================== OnlineCMDOptimizer: the same hostile pass
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


YO = torch.randint(0, 4, (len(X),), generator=torch.Generator().manual_seed(3))


def online(granularity="tensor", **kw):
    torch.manual_seed(0)
    model = MLP()
    args = dict(n_modes=3, fit_at=6, snapshot_every=2, seed=0, embed_every=3, embed_fraction=0.5,
                granularity=granularity)
    args.update(kw)
    return model, modeopt.OnlineCMDOptimizer(model, torch.optim.Adam(model.parameters(), lr=1e-2), **args)


def online_loss(model, opt, i, scale=1.0):
    idx = torch.arange(i * 32, i * 32 + 32) % len(X)
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(X[idx]), YO[idx]) * scale
    loss.backward()
    return loss


def online_train(model, opt, steps, start=0):
    for i in range(start, start + steps):
        online_loss(model, opt, i)
        opt.step()


def same_tree(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and same(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same_tree(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("at", [2, 6, 13], ids=["recording", "at-the-fit", "fitted-and-frozen"])
@pytest.mark.parametrize("closure", [False, True], ids=["step", "closure"])
def test_online_a_nonfinite_gradient_skips_the_step_in_every_phase_and_the_shadow_stays_finite(at, closure):
    """Before: the base wrote the NaN into the weights and, after the fit, into the shadow's moments, silently."""
    model, opt = online()
    online_train(model, opt, at)
    if at == 13:
        assert opt.frozen  # gradual embedding froze a tensor
    before = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
    step = at + 1
    with pytest.warns(NonFiniteWarning, match=rf"OnlineCMDOptimizer: step {step}: the gradient of 'fc\d.\w+' holds "
                      r"NaN/inf: the step is skipped \(nothing changes, the step is not counted\)"):
        if closure:
            assert torch.isnan(opt.step(lambda: online_loss(model, opt, at, scale=NAN)))
        else:
            online_loss(model, opt, at, scale=NAN)
            assert opt.step() is None
    assert opt.skipped_steps == 1 and opt.online.calls == at
    assert same_tree(model.state_dict(), before[0]) and same_tree(opt.state_dict(), before[1] | {"skipped_steps": 1})
    online_train(model, opt, 6, at)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.online.phase == "fitted" and all(torch.isfinite(w).all() for w in opt.cmd_state_dict().values())


def test_online_nan_already_in_the_weights_is_an_error_naming_the_tensor():
    model, opt = online()
    online_train(model, opt, 8)
    with torch.no_grad():
        model.fc2.bias[1] = NAN
    online_loss(model, opt, 8)
    with pytest.raises(ValueError, match=r"step 9: parameter 'fc2.bias' holds NaN/inf, so every gradient would and "
                       r"every step would be skipped; nothing changed.*resume from a checkpoint"):
        opt.step()
    assert opt.online.calls == 8 and opt.skipped_steps == 0


@pytest.mark.parametrize("granularity", ["tensor", "weight"])
def test_online_nan_in_the_base_optimizers_state_is_refused_naming_the_tensor(granularity):
    model, opt = online(granularity)
    online_train(model, opt, 13)
    assert opt.frozen
    sd = copy.deepcopy(opt.state_dict())
    groups = [p for g in opt.param_groups for p in g["params"]]
    names = {id(p): n for n, p in model.named_parameters()}
    k = len(groups) - 1
    _nan(sd["base"]["state"][sd["base"]["param_groups"][0]["params"][k]]["exp_avg_sq"])
    model2, opt2 = online(granularity)
    model2.load_state_dict(model.state_dict())
    before = copy.deepcopy(opt2.state_dict())
    with pytest.raises(ValueError, match=rf"base optimizer's state 'exp_avg_sq' of '{names[id(groups[k])]}' holds "
                       r"NaN/inf"):
        opt2.load_state_dict(sd)
    assert same_tree(opt2.state_dict(), before)


def test_online_skipped_steps_survive_resume_and_bad_counters_are_refused():
    model, opt = online()
    online_train(model, opt, 4)
    with pytest.warns(NonFiniteWarning):
        online_loss(model, opt, 4, scale=NAN)
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    model2, opt2 = online()
    opt2.load_state_dict(sd)
    assert opt2.skipped_steps == 1
    with pytest.raises(ValueError, match=r"the state's skipped_steps must be an integer >= 0, got -3: damaged"):
        opt2.load_state_dict(sd | {"skipped_steps": -3})
    old = {k: v for k, v in sd.items() if k != "skipped_steps"}  # saved before the counter was
    opt2.load_state_dict(old)
    assert opt2.skipped_steps == 0


def test_online_bad_arguments_say_what_to_do():
    torch.manual_seed(0)
    model = MLP()
    adam = lambda: torch.optim.Adam(model.parameters())  # noqa: E731
    with pytest.raises(TypeError, match=r"names must be a list of parameter/buffer names or a predicate "
                       r"f\(name, tensor\), got the string 'fc1.weight': pass \['fc1.weight'\]"):
        modeopt.OnlineCMDOptimizer(model, adam(), fit_at=6, names="fc1.weight")
    with pytest.raises(TypeError, match=r"names must be a list of parameter/buffer names or a predicate .*got 5"):
        modeopt.OnlineCMDOptimizer(model, adam(), fit_at=6, names=5)
    with pytest.raises(ValueError, match=r"the tensor 'fc1.weight' is listed twice"):
        modeopt.OnlineCMDOptimizer(model, adam(), fit_at=6, names=["fc1.weight", "fc2.weight", "fc1.weight"])
    cmd = modeopt.CMDOptimizer(model, adam(), warmup_steps=30)
    with pytest.raises(TypeError, match=r"base_optimizer is already a CMDOptimizer: wrap the plain torch.optim "
                       r"optimizer"):
        modeopt.OnlineCMDOptimizer(model, cmd, fit_at=6)


# ================================================================== CMDOptimizer (the reference) had the same gap
@pytest.mark.parametrize("stop", [3, 9], ids=["warm-up", "embedded"])
def test_cmd_optimizer_refuses_nan_in_the_base_optimizers_state_naming_the_tensor(stop):
    torch.manual_seed(0)
    model = MLP()
    opt = modeopt.CMDOptimizer(model, torch.optim.Adam(model.parameters(), lr=1e-2), n_modes=3, warmup_steps=6,
                               snapshot_every=2, n_samples=50, seed=0)
    online_train(model, opt, stop)
    sd = copy.deepcopy(opt.state_dict())
    last = max(sd["base"]["state"])
    _nan(sd["base"]["state"][last]["exp_avg"])
    torch.manual_seed(0)
    model2 = MLP()
    opt2 = modeopt.CMDOptimizer(model2, torch.optim.Adam(model2.parameters(), lr=1e-2), n_modes=3, warmup_steps=6,
                                snapshot_every=2, n_samples=50, seed=0)
    before = copy.deepcopy(opt2.state_dict())
    name = "fc2.bias" if stop == 3 else "fc2.modeopt_r0"
    with pytest.raises(ValueError, match=rf"base optimizer's state 'exp_avg' of '{name}' holds NaN/inf"):
        opt2.load_state_dict(sd)
    assert same_tree(opt2.state_dict(), before)
