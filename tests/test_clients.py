"""What clients of the optimizer wrappers rely on (issue #15): torch's hook contract, param groups
changed behind the wrapper's back, base optimizers that cannot train r, sparse gradients, and the
small things (duplicate parameters, n_modes after a load, CLI messages, progress bars)."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import modeopt
from modeopt import CMDOptimizer, OnlineCMDOptimizer
from _small import MLP, _one_thread  # noqa: F401  (tests/ is on sys.path; the fixture is autouse)

CMD_KW = dict(n_modes=3, warmup_steps=6, snapshot_every=2, n_samples=100, seed=0)


def _batch(i):
    g = torch.Generator().manual_seed(40_000 + i)
    return torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)


def _step(model, opt, i):
    x, y = _batch(i)
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.detach()


def _build(make=lambda p: torch.optim.SGD(p, lr=0.1), **kw):
    torch.manual_seed(1)
    model = MLP()
    base = make(model.parameters())
    return model, base, CMDOptimizer(model, base, **{**CMD_KW, **kw})


def _online(model, base):
    return OnlineCMDOptimizer(model, base, n_modes=3, fit_at=6, snapshot_every=2, n_samples=100, seed=0)


# ============================================================ 1. hooks
@pytest.mark.parametrize("kind", ["cmd", "online"])
def test_state_dict_hooks_fire_with_torch_semantics(kind):
    torch.manual_seed(1)
    model = MLP()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = CMDOptimizer(model, base, **CMD_KW) if kind == "cmd" else _online(model, base)
    for i in range(8):
        _step(model, opt, i)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append(("sd_pre", o)))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append(("sd_post", o)) or {**sd, "extra": 7})
    sd = opt.state_dict()
    assert [c for c, _ in calls] == ["sd_pre", "sd_post"] and all(o is opt for _, o in calls)
    assert sd["extra"] == 7 and "base" in sd  # the post-hook's return value replaces the state dict

    calls.clear()
    seen = {}

    def load_pre(o, state):
        calls.append(("load_pre", o))
        seen["had_extra"] = "extra" in state
        return {k: v for k, v in state.items() if k != "extra"}  # a replacement state dict

    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(lambda o: calls.append(("load_post", o)))
    opt.load_state_dict(sd)
    assert [c for c, _ in calls] == ["load_pre", "load_post"] and all(o is opt for _, o in calls)
    assert seen["had_extra"] and sd["extra"] == 7  # the caller's dict is not edited (shallow copy)
    # prepend=True orders a hook first, as in torch
    order = []
    opt.register_state_dict_pre_hook(lambda o: order.append("b"))
    opt.register_state_dict_pre_hook(lambda o: order.append("a"), prepend=True)
    opt.state_dict()
    assert order == ["a", "b"]


def test_state_dict_hooks_fire_once_through_a_subclass():
    class Mine(CMDOptimizer):
        def state_dict(self):
            return {**super().state_dict(), "mine": 1}

    torch.manual_seed(1)
    model = MLP()
    opt = Mine(model, torch.optim.SGD(model.parameters(), lr=0.1), **CMD_KW)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append(sorted(sd)))
    assert opt.state_dict()["mine"] == 1
    assert calls == ["pre", ["base", "cmd", "mine"]]


@pytest.mark.parametrize("kind", ["cmd", "online"])
def test_step_hooks_fire_once_per_optimizer_that_steps(kind):
    torch.manual_seed(1)
    model = MLP()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = CMDOptimizer(model, base, **CMD_KW) if kind == "cmd" else _online(model, base)
    log = []
    handles = [register_optimizer_step_pre_hook(lambda o, a, k: log.append(("global_pre", o))),
               register_optimizer_step_post_hook(lambda o, a, k: log.append(("global_post", o))),
               opt.register_step_pre_hook(lambda o, a, k: log.append(("pre", o))),
               opt.register_step_post_hook(lambda o, a, k: log.append(("post", o))),
               base.register_step_pre_hook(lambda o, a, k: log.append(("base_pre", o)))]
    try:
        for i in range(8):  # through the switch
            _step(model, opt, i)
        # two optimizers step (like torch's ZeroRedundancyOptimizer): the global hooks fire once with
        # the wrapper (outermost) and once with the base; each instance's hooks fire once, with it
        assert log == [("global_pre", opt), ("pre", opt), ("global_pre", base), ("base_pre", base),
                       ("global_post", base), ("post", opt), ("global_post", opt)] * 8
        # base.step() called directly: the base's hooks, with the base
        log.clear()
        base.step()
        assert log == [("global_pre", base), ("base_pre", base), ("global_post", base)]
    finally:
        for h in handles:
            h.remove()


def test_lr_scheduler_and_grad_scaler_still_see_the_steps():
    model, base, opt = _build()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    base_sched = torch.optim.lr_scheduler.MultiplicativeLR(base, lambda s: 1.0)  # a scheduler built on the base
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*lr_scheduler.step.*")
        for i in range(8):
            x, y = _batch(i)
            opt.zero_grad()
            scaler.scale(F.cross_entropy(model(x), y)).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            base_sched.step()
    assert opt._opt_called and base._opt_called
    assert opt.phase == "embedded" and opt._step == 8
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**4)


# ============================================================ 4. base.add_param_group
@pytest.mark.parametrize("at", [2, 7], ids=["warmup", "embedded"])
def test_base_add_param_group_is_refused_at_the_next_step_before_any_work(at):
    torch.manual_seed(1)
    model = MLP()
    extra = nn.Linear(4, 4)
    model.extra = extra  # a module the optimizer did not see at construction
    base = torch.optim.SGD([model.fc1.weight, model.fc1.bias, model.fc2.weight, model.fc2.bias], lr=0.1)
    opt = CMDOptimizer(model, base, **CMD_KW)
    for i in range(at):
        _step(model, opt, i)
    phase, step = opt.phase, opt._step
    params = list(model.named_parameters())
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    # named, not extra.parameters(): in mode space the last module (extra) also carries r (docs/optimizer.md)
    base.add_param_group({"params": [extra.weight, extra.bias], "lr": 0.01})
    x, y = _batch(99)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match=r"param groups changed after it was wrapped in CMDOptimizer \(2 param "
                                           r"groups now, 1 when it was wrapped \(base.add_param_group\?\)\).*this step "
                                           r"was refused and nothing was changed.*before wrapping it"):
        opt.step()
    assert (opt.phase, opt._step) == (phase, step)
    assert [(n, id(p)) for n, p in model.named_parameters()] == [(n, id(p)) for n, p in params]
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    # the way out: drop the group again and carry on through the switch
    base.param_groups.pop()
    for i in range(at, 8):
        _step(model, opt, i)
    assert opt.phase == "embedded" and opt._step == 8


def test_a_param_appended_to_a_group_is_refused():
    model, base, opt = _build()
    _step(model, opt, 0)
    base.param_groups[0]["params"].append(nn.Parameter(torch.zeros(3)))
    with pytest.raises(RuntimeError, match=r"param group 0 holds 5 tensors now, 4 expected"):
        opt.step()


def test_after_export_groups_may_change():
    model, base, opt = _build()
    for i in range(7):
        _step(model, opt, i)
    opt.export()
    extra = nn.Parameter(torch.ones(2))
    base.add_param_group({"params": [extra]})
    extra.grad = torch.ones(2)
    opt.step()
    assert torch.equal(extra.detach(), torch.full((2,), 0.9))


# ============================================================ 5. Muon, sparse gradients
def test_muon_is_refused_at_construction_with_what_to_do():
    torch.manual_seed(1)
    model = MLP()
    base = torch.optim.Muon([model.fc1.weight, model.fc2.weight], lr=0.02)
    with pytest.raises(TypeError, match=r"Muon updates only 2-D matrices, but in mode space the trainable parameters "
                                        r"are the mode scalars r, a vector: wrap an element-wise optimizer"):
        CMDOptimizer(model, base, **CMD_KW)


def test_sparse_adam_is_refused_at_construction():
    model = nn.Embedding(50, 8, sparse=True)
    with pytest.raises(TypeError, match=r"SparseAdam takes only sparse gradients, but the gradient of the mode "
                                        r"scalars r is dense: use Adam/AdamW"):
        CMDOptimizer(model, torch.optim.SparseAdam(model.parameters()), **CMD_KW)


class Bag(nn.Module):
    def __init__(self, sparse):
        super().__init__()
        self.emb = nn.Embedding(30, 8, sparse=sparse)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.emb(x).mean(1))


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adagrad])
def test_sparse_embedding_trains_in_mode_space_like_a_dense_one(opt_cls):
    """Sparse gradients are densified for the reduction onto r: the same numbers as sparse=False."""
    runs = []
    for sparse in (True, False):
        torch.manual_seed(3)
        model = Bag(sparse)
        opt = CMDOptimizer(model, opt_cls(model.parameters(), lr=0.1), **CMD_KW)
        losses = []
        for i in range(10):
            g = torch.Generator().manual_seed(50_000 + i)
            x, y = torch.randint(0, 30, (16, 5), generator=g), torch.randint(0, 4, (16,), generator=g)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            if opt.phase == "embedded":
                assert model.emb.weight.grad is None  # no N-sized gradient kept
            opt.step()
            losses.append(loss.item())
        assert opt.phase == "embedded"
        runs.append((torch.tensor(losses), opt.space.r_full().detach().clone(), opt.history[0]["sizes"]))
    (l_s, r_s, sizes_s), (l_d, r_d, sizes_d) = runs
    assert sizes_s == sizes_d
    torch.testing.assert_close(l_s, l_d, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r_s, r_d, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(l_s).all()


# ============================================================ 11. smaller items
def test_a_parameter_listed_twice_is_named():
    torch.manual_seed(1)
    model = MLP()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own "duplicate parameters" warning
        base = torch.optim.SGD([model.fc1.weight, model.fc1.bias, model.fc1.weight], lr=0.1)
    with pytest.raises(ValueError, match=r"the base optimizer lists the parameter 'fc1.weight' twice \(param group "
                                         r"0\): give each parameter to the base optimizer once"):
        CMDOptimizer(model, base, **CMD_KW)
    base = torch.optim.SGD([{"params": [model.fc1.weight]}, {"params": [model.fc2.weight]}], lr=0.1)
    base.param_groups[1]["params"].append(model.fc1.weight)  # across groups (torch refuses that in add_param_group)
    with pytest.raises(ValueError, match=r"lists the parameter 'fc1.weight' twice \(param groups 0 and 1\)"):
        CMDOptimizer(model, base, **CMD_KW)


def test_n_modes_follows_a_loaded_checkpoint():
    model, base, opt = _build(n_modes=2)
    for i in range(8):
        _step(model, opt, i)
    assert opt.space.n_modes == 2
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    assert ckpt["opt"]["cmd"]["n_modes"] == 2
    model2, _, opt2 = _build(n_modes=5)
    model2.load_state_dict(ckpt["model"])
    with pytest.warns(UserWarning, match=r"the checkpoint was trained with n_modes=2; this CMDOptimizer was built "
                                         r"with n_modes=5: opt.n_modes is now 2"):
        opt2.load_state_dict(ckpt["opt"])
    assert opt2.n_modes == 2 == opt2.space.n_modes
    # an older checkpoint (no "n_modes" entry): the size of its saved space
    del ckpt["opt"]["cmd"]["n_modes"]
    model3, _, opt3 = _build(n_modes=5)
    with pytest.warns(UserWarning, match="n_modes is now 2"):
        opt3.load_state_dict(ckpt["opt"])
    assert opt3.n_modes == 2
    # same configuration: silent
    model4, _, opt4 = _build(n_modes=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt4.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True)["opt"])


class _Custom:
    pass


def _cli(capsys, *argv):
    from modeopt.cli import main

    status = main(list(argv))
    return status, capsys.readouterr().err.strip()


def test_cli_one_line_errors_for_unreadable_files(tmp_path, capsys):
    pickled = tmp_path / "model.pt"
    torch.save({"obj": _Custom(), "w": torch.zeros(2)}, pickled)
    traj = tmp_path / "traj.pt"
    modeopt.Trajectory(torch.randn(5, 200)).save(traj)
    data = traj.read_bytes()
    cut_end, half = tmp_path / "cut_end.pt", tmp_path / "half.pt"
    cut_end.write_bytes(data[:-1])  # torch: "OSError: [Errno 22] Invalid argument"
    half.write_bytes(data[: len(data) // 2])
    text = tmp_path / "notes.pt"
    text.write_text("not a recording\n")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    expected = {
        pickled: "it holds pickled Python objects (e.g. a model or optimizer saved whole), not tensors",
        cut_end: "the file is truncated (a torch.save zip archive without its end): copy or save it again",
        half: "the file is truncated (a torch.save zip archive without its end)",
        text: "not a file written by torch.save",
        empty: "the file is empty",
    }
    for path, reason in expected.items():
        for cmd in (["analyze", str(path), "--no-figures", "-q", "-o", str(tmp_path / "r")],
                    ["compare", str(path), str(traj), "--no-figures", "-q", "-o", str(tmp_path / "c")]):
            status, err = _cli(capsys, *cmd)
            assert status == 1
            assert err.count("\n") == 0, err  # one line
            assert err.startswith(f"modeopt {cmd[0]}: error: cannot read {path}: {reason}"), err
            assert "weights_only" not in err and "Errno" not in err
    # checkpoint files read one by one say the same
    status, err = _cli(capsys, "analyze", str(pickled), str(pickled), str(pickled), "--no-figures", "-q",
                       "-o", str(tmp_path / "r"))
    assert status == 1 and err == (f"modeopt analyze: error: cannot read checkpoint {pickled}: it holds pickled "
                                   "Python objects (e.g. a model or optimizer saved whole), not tensors; modeopt reads "
                                   "only tensors (save state dicts: torch.save(model.state_dict(), path))")


def test_progress_none_shows_bars_only_on_a_terminal(monkeypatch, capsys):
    """progress=None must reach tqdm as disable=None (tqdm then checks isatty); pytest's stderr is no tty."""
    from modeopt.utils import progress as _progress
    from modeopt.decomposition import algorithm as decomposition
    import importlib

    from modeopt.analysis import dmd

    time_reduction = importlib.import_module("modeopt.trajectories.time_reduction")

    assert (_progress.disable(None, 10, 4), _progress.disable(None, 2, 4)) == (None, True)
    assert (_progress.disable(True, 2, 4), _progress.disable(False, 10, 4)) == (False, True)
    monkeypatch.setattr(decomposition, "CHUNK_ELEMENTS", 1)  # many chunks: bars are due
    monkeypatch.setattr(time_reduction, "CHUNK_ELEMENTS", 1)
    w = torch.randn(6000, 8)
    for progress, shown in [(None, False), (False, False), (True, True)]:
        modeopt.decompose(w, n_modes=2, n_samples=50, seed=0, progress=progress)
        dmd(w, rank=2, progress=progress)
        err = capsys.readouterr().err
        assert ("CMD scan" in err, "CMD assign" in err, "DMD factor" in err) == (shown,) * 3, (progress, err)
