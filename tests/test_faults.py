"""Faults: damaged or foreign checkpoints, a full disk under record_dir, NaN/inf, tied weights, bad set-ups.

Cases that crashed the process before (segfault, malloc abort, SIGBUS) run in a fresh process and must
end in a clean Python error: exit status 1 and the message on stderr.
"""

import errno
import os
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modeopt import CMDOptimizer, OnlineCMD, OnlineCMDOptimizer
from modeopt.cmd_optimizer.optimizer import NonFiniteWarning
from modeopt.trajectories.snapshots import SnapshotBuffer

torch.set_num_threads(1)


def _r0(model):
    """The first mode-scalar tensor, wherever the mode space registered it (the model's last module)."""
    return next(p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] == "modeopt_r0")


def _has_r(model) -> bool:
    return any(n.rsplit(".", 1)[-1].startswith("modeopt_r") for n, _ in model.named_parameters())


def _mlp(width=16, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, width), nn.Tanh(), nn.Linear(width, 3))


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)


def _cmd(width=16, lr=0.1, **kw):
    model = _mlp(width)
    args = dict(n_modes=2, warmup_steps=6, snapshot_every=2, n_samples=20, seed=0)
    args.update(kw)
    return model, CMDOptimizer(model, torch.optim.SGD(model.parameters(), lr=lr), **args)


def _train(model, opt, steps, nan_at=(), data=None):
    x, y = _data() if data is None else data
    for i in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if i in nan_at:
            loss = loss * float("nan")
        loss.backward()
        opt.step()


def _flat(obj, prefix=""):
    """Every tensor and plain value of a nested state, by path (tensors cloned)."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}/{k}"))
        return out
    if isinstance(obj, (list, tuple)):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flat(v, f"{prefix}/{i}"))
        return out
    return {prefix: obj.detach().clone() if isinstance(obj, torch.Tensor) else obj}


def _same(x, y):
    assert x.keys() == y.keys()
    for k in x:
        if isinstance(x[k], torch.Tensor):
            assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k
        else:
            assert x[k] == y[k], k


def _whole_state(model, opt):
    return {"model": _flat(model.state_dict()), "opt": _flat(opt.state_dict()),
            "params": [(n, p.requires_grad, tuple(p.shape)) for n, p in model.named_parameters()],
            "groups": [[id(p) for p in g["params"]] for g in opt.param_groups]}


def _assert_unchanged(before, model, opt):
    after = _whole_state(model, opt)
    _same(before["model"], after["model"])
    _same(before["opt"], after["opt"])
    assert before["params"] == after["params"] and before["groups"] == after["groups"]


def _run_script(fresh, body: str):
    """``body`` in a fresh process (a fork of the server in tests/_forkserver.py, which imported torch and
    modeopt once): a crash there is a negative return code, not a crashed test session."""
    code = "import torch, torch.nn.functional as F\nfrom torch import nn\ntorch.set_num_threads(1)\n" + textwrap.dedent(body)
    return fresh.run(code)


# ------------------------------------------- 6. checkpoints that do not fit
_SAVE_AND_LOAD = """
from modeopt import CMDOptimizer
def make(width):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, width), nn.Tanh(), nn.Linear(width, 3))
    opt = CMDOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), n_modes=2, warmup_steps=6,
                       snapshot_every=2, n_samples=20, seed=0)
    return model, opt
x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
def train(model, opt, steps):
    for _ in range(steps):
        opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()
model, opt = make({saved}); train(model, opt, 7)
sd = opt.state_dict()
{edit}
torch.save(sd, "{path}")
sd = torch.load("{path}", weights_only=True)
model, opt = make({loaded}); train(model, opt, 7)
opt.load_state_dict(sd)
train(model, opt, 3)
print("TRAINED ON")
"""


@pytest.mark.parametrize("saved, loaded, edit, message", [
    (16, 32, "", r"checkpoint tensor '0.weight' has 128 mode labels, the model's parameter has 256 weights"),
    (16, 2000, "", r"checkpoint tensor '0.weight' has 128 mode labels, the model's parameter has 16000 weights"),
    (16, 16, "sd['cmd']['space']['labels'][2][5] = 200",
     r"checkpoint tensor '2.weight' has mode labels from 0 to 200, but the checkpoint has 2 modes"),
])
def test_a_foreign_or_damaged_checkpoint_is_a_clean_error_in_a_fresh_process(saved, loaded, edit, message, tmp_path,
                                                                            fresh_process):
    res = _run_script(fresh_process, _SAVE_AND_LOAD.format(saved=saved, loaded=loaded, edit=edit, path=tmp_path / "opt.pt"))
    assert res.returncode == 1, (res.returncode, res.stderr[-2000:])  # not a signal (negative) nor success
    assert "ValueError: " + message.replace("\\", "") in res.stderr.replace("\\", "")
    assert "the checkpoint is from a different model" in res.stderr or "damaged or was edited" in res.stderr
    assert "TRAINED ON" not in res.stdout


def test_a_wider_models_checkpoint_is_refused_not_trained_with_wrong_coefficients():
    model, opt = _cmd()
    _train(model, opt, 8)
    before = _whole_state(model, opt)
    with pytest.raises(ValueError, match=r"checkpoint tensor '0.weight' has 256 mode labels, the model's parameter has "
                                         r"128 weights \(shape \(16, 8\)\): the checkpoint is from a different model; "
                                         r"build the same model \(same layer sizes\) as the saved run"):
        opt.load_state_dict(_embedded_state(width=32))
    _assert_unchanged(before, model, opt)


def _embedded_state(width=16):
    model, opt = _cmd(width)
    _train(model, opt, 8)
    assert opt.phase == "embedded"
    return opt.state_dict()


def _corrupt(sd, path, value):
    d = sd
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value(d[path[-1]]) if callable(value) else value
    return sd


def _nan_at(i):
    def f(t):
        t = t.clone()
        t.view(-1)[i] = float("nan")
        return t
    return f


@pytest.mark.parametrize("path, value, message", [
    (("cmd", "space", "a", 0), _nan_at(3), r"checkpoint tensor '0.weight': its coefficients a hold NaN/inf"),
    (("cmd", "space", "r"), _nan_at(1), r"the checkpoint's r holds NaN/inf"),
    (("cmd", "space", "applied"), lambda t: t[:1], r"applied r must be a floating-point tensor of shape \(2,\)"),
    (("cmd", "space", "r_groups"), lambda t: t + 3, r"puts mode scalars into param group\(s\) \[3\], this optimizer has 1"),
    (("cmd", "space", "labels", 1), lambda t: t.float(), r"'0.bias': its mode labels must be an integer tensor"),
    (("cmd", "space", "a", 3), lambda t: t[:2], r"checkpoint tensor '2.bias' has 2 coefficients, the model's parameter has 3"),
    (("cmd", "phase"), "warmup", r"the checkpoint's phase is 'warmup' but it holds a mode space"),
    (("cmd", "step"), -4, r"the checkpoint's 'step' must be an integer >= 0, got -4"),
    (("base", "param_groups", 0, "params"), lambda p: p + [99], r"param group 0 of the checkpoint's base optimizer holds 2"),
])
def test_a_rejected_checkpoint_leaves_optimizer_and_model_as_they_were(path, value, message):
    sd = _corrupt(_embedded_state(), path, value)
    for steps in (3, 8):  # the receiving optimizer in warm-up, and in mode space
        model, opt = _cmd()
        _train(model, opt, steps)
        before = _whole_state(model, opt)
        with pytest.raises(ValueError, match=message):
            opt.load_state_dict(sd)
        _assert_unchanged(before, model, opt)
        assert opt.phase == ("warmup" if steps == 3 else "embedded")
        assert _has_r(model) == (steps == 8)
        _train(model, opt, 2)  # still usable


def test_a_recording_that_does_not_fit_is_rejected_before_anything_changes():
    model, opt = _cmd()
    _train(model, opt, 4)
    sd = opt.state_dict()
    wide = _cmd(width=32)[1]
    _train(wide.model, wide, 4)
    cases = [
        (wide.state_dict()["cmd"]["buffer"], r"recording does not fit this optimizer: the saved recording holds "
                                             r"snapshots of shape \(2, 387\), this one records 195 weights"),
        (dict(sd["cmd"]["buffer"], data=sd["cmd"]["buffer"]["data"].double()), r"saved snapshots are torch.float64"),
        (dict(sd["cmd"]["buffer"], count=1), r"count 1 is not an integer >= its 2 rows"),
        (dict(sd["cmd"]["buffer"], steps=[2]), r"steps must be 2 integers"),
    ]
    target_model, target = _cmd()
    _train(target_model, target, 3)
    for buf, message in cases:
        bad = {"base": sd["base"], "cmd": dict(sd["cmd"], buffer=buf)}
        before = _whole_state(target_model, target)
        with pytest.raises(ValueError, match=message):
            target.load_state_dict(bad)
        _assert_unchanged(before, target_model, target)
    target.load_state_dict(sd)  # the intact one loads
    assert target._step == 4 and len(target._buffer) == 2


def test_online_cmd_rejects_foreign_and_damaged_state_unchanged():
    def run(width, steps=8):
        model = _mlp(width)
        online = OnlineCMD(model, n_modes=2, fit_at=6, snapshot_every=2, n_samples=20, seed=0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = _data()
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            online.update()
        return online

    good = run(16).state_dict()
    cases = [
        (run(32).state_dict(), r"'0.weight' has 256 mode labels, the model's tensor has 128 values"),
        (run(32, steps=3).state_dict(), r"snapshots of shape \(1, 387\), this one records 195"),
        (dict(good, labels=[t.clone().fill_(7) for t in good["labels"]]), r"'0.weight' has mode labels from 7 to 7, "
                                                                          r"but the state has 2 modes"),
        (dict(good, mode_m2=good["mode_m2"][:1]), r"'mode_m2' must be a floating-point tensor of shape \(2,\)"),
        (dict(good, mean=[good["mean"][0] * float("nan")] + good["mean"][1:]), r"'mean' of '0.weight' holds NaN/inf"),
        (dict(good, ref_index=[[0, 999], [1, 0]]), r"reference 0 points at element 999 of tensor 0 \('0.weight', 128"),
        (dict(good, phase="done"), r"phase 'done' is not 'recording' or 'fitted'"),
        (dict(good, count=-1), r"'count' must be an integer >= 0, got -1"),
    ]
    for fitted in (False, True):
        online = run(16, steps=8 if fitted else 3)
        for sd, message in cases:
            before = _flat(online.state_dict())
            with pytest.raises(ValueError, match=message):
                online.load_state_dict(sd)
            _same(before, _flat(online.state_dict()))
        online.load_state_dict(good)
        assert online.phase == "fitted" and online.calls == 8


def test_online_cmd_labels_out_of_range_are_a_clean_error_in_a_fresh_process(tmp_path, fresh_process):
    res = _run_script(fresh_process, f"""
        from modeopt import OnlineCMD, OnlineCMDOptimizer
        def make():
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
            return model, OnlineCMDOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), n_modes=2, fit_at=4,
                                             snapshot_every=1, n_samples=20, seed=0)
        x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
        def train(model, opt, steps):
            for _ in range(steps):
                opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()
        model, opt = make(); train(model, opt, 6)
        sd = opt.state_dict()
        sd["online"]["labels"][0][3] = 250
        torch.save(sd, "{tmp_path / 'o.pt'}")
        model, opt = make(); train(model, opt, 6)
        opt.load_state_dict(torch.load("{tmp_path / 'o.pt'}", weights_only=True))
        train(model, opt, 3)
        print("TRAINED ON")
    """)
    assert res.returncode == 1, (res.returncode, res.stderr[-2000:])
    assert "ValueError: '0.weight' has mode labels from 0 to 250, but the state has 2 modes" in res.stderr
    assert "TRAINED ON" not in res.stdout


def test_online_optimizer_rejects_a_damaged_frozen_state_unchanged():
    def run():
        model = _mlp(16)
        opt = OnlineCMDOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), n_modes=2, fit_at=4,
                                 snapshot_every=1, n_samples=20, seed=0)
        _train(model, opt, 6)
        opt.freeze(["2.weight"])
        _train(model, opt, 2)
        return model, opt

    model, opt = run()
    good = opt.state_dict()
    t = [n for n in opt.online.names].index("2.weight")
    bad_a = {**good, "frozen": {**good["frozen"], str(t): {**good["frozen"][str(t)], "a": torch.zeros(5)}}}
    bad_t = {**good, "frozen": {**good["frozen"], "9": good["frozen"][str(t)]}, "frozen_whole": [t, 9]}
    bad_groups = {**good, "base": {**good["base"], "param_groups": good["base"]["param_groups"] * 2}}
    model2, opt2 = run()
    _train(model2, opt2, 1)
    for sd, message in [(bad_a, r"frozen tensor '2.weight' has 5 coefficients a, the model's tensor has 48"),
                        (bad_t, r"frozen tensor 9 is not a tensor this optimizer may freeze"),
                        (bad_groups, r"base optimizer has 2 param group\(s\), this one 1")]:
        before = _whole_state(model2, opt2)
        with pytest.raises(ValueError, match=message):
            opt2.load_state_dict(sd)
        _assert_unchanged(before, model2, opt2)
    opt2.load_state_dict(good)
    assert opt2.online.calls == 8


# ------------------------------------------------ 7. record_dir on a full disk
def test_record_dir_reserves_its_file_and_a_full_disk_is_a_clean_recoverable_error(tmp_path, monkeypatch):
    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    model, opt = _cmd(record_dir=str(tmp_path))
    x, y = _data()
    need = 3 * 195 * 4
    _train(model, opt, 1, data=(x, y))
    with pytest.raises(OSError, match=rf"the memory-mapped snapshot file needs {need:,} bytes in '{tmp_path}', but "
                                      rf"only [\d,]+ bytes are free there \(No space left on device\)\. Free space "
                                      r"there, choose another record_dir .* record_dtype=torch.bfloat16 halves the "
                                      r"file, a smaller max_snapshots keeps fewer rows") as e:
        _train(model, opt, 1, data=(x, y))  # step 2: the first snapshot
    assert e.value.errno == errno.ENOSPC
    assert opt.phase == "warmup" and opt._step == 2 and opt.recording_bytes == 0 and list(tmp_path.iterdir()) == []
    monkeypatch.undo()  # space freed: the next step records the missed snapshot, and training goes on
    _train(model, opt, 1, data=(x, y))
    assert opt._buffer.raw()[1] == [3] and opt.recording_bytes == need
    _train(model, opt, 3, data=(x, y))
    assert opt.phase == "embedded" and opt.history[-1]["step"] == 6


def test_without_fallocate_the_file_is_written_with_zeros(tmp_path, monkeypatch):
    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    monkeypatch.setattr("modeopt.trajectories.mapped_files._ZERO_CHUNK", 1000)  # several chunks
    buf = SnapshotBuffer(1000, capacity=3, directory=tmp_path)
    assert buf.data.shape == (3, 1000) and bool((buf.data == 0).all())
    writes = []
    real_write = os.write

    def write_until_full(fd, data):
        writes.append(len(data))
        if sum(writes) > 5000:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write_until_full)
    with pytest.raises(OSError, match=r"needs 12,000 bytes in .* \(No space left on device\)"):
        SnapshotBuffer(1000, capacity=3, directory=tmp_path)
    assert list(tmp_path.iterdir()) == []  # the half-written file is gone


def test_a_real_full_tmpfs_fails_at_allocation_not_with_sigbus(small_tmpfs, fresh_process):
    res = _run_script(fresh_process, f"""
        from modeopt.trajectories.snapshots import SnapshotBuffer
        buf = SnapshotBuffer(200_000, capacity=3, directory="{small_tmpfs}")  # 2.4 MB > 1 MiB
        buf.data.fill_(1.0)
        print("WROTE")
    """)
    assert res.returncode == 1, (res.returncode, res.stderr[-2000:])
    assert "OSError: [Errno 28] the memory-mapped snapshot file needs 2,400,000 bytes" in res.stderr
    assert "WROTE" not in res.stdout
    assert list(small_tmpfs.iterdir()) == []
    buf = SnapshotBuffer(20_000, capacity=3, directory=small_tmpfs)  # 240 kB fits
    buf.data.fill_(1.0)


# ------------------------------------------------------------------ 9. NaN/inf
def test_nan_loss_in_mode_space_skips_the_step_and_keeps_the_weights_finite():
    model, opt = _cmd()
    _train(model, opt, 8)
    assert opt.phase == "embedded" and opt._step == 8
    r_before = _r0(model).detach().clone()
    w_before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(NonFiniteWarning, match=r"modeopt: step 9: the gradient of the mode scalars r holds NaN/inf: "
                                              r"the step is skipped, like GradScaler does") as rec:
        _train(model, opt, 3, nan_at=(0, 2))
    assert sum(issubclass(w.category, NonFiniteWarning) for w in rec) == 1  # warned once
    assert opt.skipped_steps == 2 and opt._step == 9  # one good step counted
    assert all(bool(torch.isfinite(v).all()) for v in model.state_dict().values())
    assert bool(torch.isfinite(_r0(model)).all()) and not torch.equal(_r0(model), r_before)
    # the skipped steps changed nothing: one good step from the same state gives the same weights
    ref_model, ref = _cmd()
    _train(ref_model, ref, 9)
    for k, v in ref_model.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    assert not all(torch.equal(v, w_before[k]) for k, v in model.state_dict().items())


def test_a_non_finite_new_r_is_put_back_and_raise_policy_leaves_the_state_intact():
    model, opt = _cmd()
    _train(model, opt, 8)
    r = _r0(model).detach().clone()
    w = {k: v.clone() for k, v in model.state_dict().items()}
    opt.param_groups[0]["lr"] = float("inf")  # finite gradient, infinite step
    with pytest.warns(NonFiniteWarning, match=r"step 9: the new value of the mode scalars r holds NaN/inf"):
        _train(model, opt, 1)
    assert torch.equal(_r0(model).detach(), r) and opt.skipped_steps == 1 and opt._step == 8
    _same(_flat(w), _flat(model.state_dict()))
    opt.param_groups[0]["lr"] = 0.1
    opt.nan_policy = "raise"
    with pytest.raises(FloatingPointError, match=r"step 9: the gradient of the mode scalars r holds NaN/inf "
                                                 r"\(nan_policy='raise'\)\. The step was not applied"):
        _train(model, opt, 1, nan_at=(0,))
    assert torch.equal(_r0(model).detach(), r) and opt._step == 8 and opt.skipped_steps == 1
    _same(_flat(w), _flat(model.state_dict()))
    opt.nan_policy = "maybe"
    with pytest.raises(ValueError, match="nan_policy must be 'skip' or 'raise', got 'maybe'"):
        _train(model, opt, 1, nan_at=(0,))


def test_a_nan_snapshot_is_not_recorded_and_the_next_finite_weights_are():
    model, opt = _cmd()
    _train(model, opt, 3)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.warns(NonFiniteWarning, match=r"modeopt: step 4: parameter '0.weight' holds NaN/inf: this snapshot "
                                              r"is not recorded and the next finite weights are recorded instead"):
        _train(model, opt, 1)
    assert opt.skipped_snapshots == 1 and opt._buffer.raw()[1] == [2]
    model.load_state_dict(saved)  # the user rolls the weights back (a transient NaN)
    _train(model, opt, 1)
    assert opt._buffer.raw()[1] == [2, 5]
    _train(model, opt, 1)
    assert opt.phase == "embedded" and opt.history[-1]["step"] == 6 and opt.skipped_snapshots == 1
    assert all(bool(torch.isfinite(v).all()) for v in model.state_dict().values())


def test_the_switch_waits_for_finite_weights_then_raises():
    model, opt = _cmd()
    _train(model, opt, 5)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[2].bias[1] = float("inf")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        _train(model, opt, 2)
    texts = [str(w.message) for w in rec if issubclass(w.category, NonFiniteWarning)]
    assert texts[-1] == ("modeopt: step 7: parameter '0.weight' holds NaN/inf: the switch to mode space waits a step "
                         "(wait 2 of at most opt.max_switch_delay=10; then it raises)")
    assert opt.phase == "warmup" and opt.skipped_snapshots == 1
    model.load_state_dict(saved)
    _train(model, opt, 1)  # finite again: recorded, then the switch
    assert opt.phase == "embedded" and opt.history[-1]["step"] == 8 and opt._buffer is None

    model, opt = _cmd()
    opt.max_switch_delay = 3
    _train(model, opt, 5)
    with torch.no_grad():
        model[2].bias[1] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteWarning)
        _train(model, opt, 3)  # steps 6..8 wait
        with pytest.raises(ValueError, match=r"refuses to embed at step 9: parameter '0.weight' holds NaN/inf\. The "
                                             r"training state is unchanged \(still in warm-up\).*\(the switch waited "
                                             r"3 step\(s\) for it\)"):
            _train(model, opt, 1)
    assert opt.phase == "warmup" and not _has_r(model)


def test_a_checkpoint_holding_a_nan_snapshot_is_repaired_on_load():
    model, opt = _cmd(record_dtype=torch.bfloat16)
    _train(model, opt, 5)
    sd = opt.state_dict()
    data = sd["cmd"]["buffer"]["data"].clone()
    data[0, 5] = float("nan")
    sd["cmd"]["buffer"] = dict(sd["cmd"]["buffer"], data=data)
    model2, opt2 = _cmd(record_dtype=torch.bfloat16)
    model2.load_state_dict(model.state_dict())
    with pytest.warns(NonFiniteWarning, match=r"the checkpoint's warm-up recording held 1 snapshot\(s\) with NaN/inf "
                                              r"\(steps 2\): dropped on load, 1 finite snapshot\(s\) kept"):
        opt2.load_state_dict(sd)
    assert opt2._buffer.raw()[1] == [4]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        _train(model2, opt2, 2)  # step 6 records the 2nd finite snapshot; too few: waits, records step 7
    assert [str(w.message) for w in rec if issubclass(w.category, NonFiniteWarning)] == [
        "modeopt: step 6: only 2 finite snapshot(s), CMD needs 3: the switch to mode space waits a step "
        "(wait 1 of at most opt.max_switch_delay=10; then it raises)"]
    assert opt2.phase == "embedded" and opt2.history[-1]["step"] == 7
    # the repaired state holds no NaN: the snapshot is gone, not carried on
    model3, opt3 = _cmd(record_dtype=torch.bfloat16)
    with pytest.warns(NonFiniteWarning):
        opt3.load_state_dict(sd)
    assert bool(torch.isfinite(opt3.state_dict()["cmd"]["buffer"]["data"]).all())


# --------------------------------------------- 10. tied weights and set-ups
class TinyLM(nn.Module):
    def __init__(self, vocab=20, dim=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight  # tied: one Parameter under two names

    def forward(self, x):
        return self.head(torch.tanh(self.mix(self.emb(x))))


def test_cmd_state_dict_of_tied_weights_loads_strictly_into_the_model_class():
    torch.manual_seed(0)
    model = TinyLM()
    opt = OnlineCMDOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.5), n_modes=2, fit_at=6,
                             snapshot_every=2, n_samples=20, seed=0)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 20, (16, 6), generator=g)
    for _ in range(10):
        opt.zero_grad()
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.reshape(-1, 20), tokens[:, 1:].reshape(-1)).backward()
        opt.step()
    assert opt.online.phase == "fitted"
    sd = opt.cmd_state_dict()
    assert set(sd) == set(model.state_dict()) == {"emb.weight", "mix.weight", "mix.bias", "head.weight"}
    assert sd["head.weight"] is sd["emb.weight"]
    assert not torch.equal(sd["emb.weight"], model.emb.weight)  # the CMD weights, not the raw ones
    fresh = TinyLM()
    fresh.load_state_dict(sd, strict=True)
    assert fresh.head.weight is fresh.emb.weight and torch.equal(fresh.emb.weight, sd["emb.weight"])
    before_fit = OnlineCMD(TinyLM(), n_modes=2, fit_at=6, snapshot_every=2, n_samples=20).cmd_state_dict()
    assert set(before_fit) == {"emb.weight", "mix.weight", "mix.bias", "head.weight"}


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_modes=30, n_samples=20), r"n_modes=30 > n_samples=20: ask for fewer modes or sample more weights"),
    (dict(n_modes=200, n_samples=1000), r"n_modes=200 > the 195 weights modelled: ask for fewer modes"),
    (dict(n_samples=2.5), r"n_samples must be an integer >= 1, got 2.5"),
    (dict(sample_every=0), r"sample_every must be an integer >= 1, got 0"),
    (dict(sample_every=1.5), r"sample_every must be an integer >= 1, got 1.5"),
    (dict(max_snapshots=2), r"max_snapshots must be an integer >= 3, got 2"),
    (dict(seed=1.5), r"seed must be an integer or None, got 1.5"),
    (dict(record_dtype=torch.int8), r"record_dtype must be a floating-point torch.dtype, got torch.int8"),
    (dict(fit_at=-3), r"fit_at must be an integer >= 1, got -3"),
])
def test_online_set_ups_that_cannot_work_are_refused_at_construction(kwargs, message):
    args = dict(n_modes=2, fit_at=6, snapshot_every=2, n_samples=20)
    args.update(kwargs)
    model = _mlp()
    with pytest.raises(ValueError, match=message):
        OnlineCMD(model, **args)
    with pytest.raises(ValueError, match=message):
        OnlineCMDOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), **args)


def test_online_optimizer_refuses_a_foreign_base_optimizer():
    model = _mlp()
    other = nn.Linear(3, 3)
    with pytest.raises(ValueError, match=r"the base optimizer's param group 0 holds a tensor of shape \(3, 3\) that is "
                                         r"not a parameter of the model: build the base optimizer on model.parameters"):
        OnlineCMDOptimizer(model, torch.optim.SGD(other.parameters(), lr=0.1), n_modes=2, fit_at=6)
    with pytest.raises(TypeError, match="base_optimizer must be a torch.optim.Optimizer, got str"):
        OnlineCMDOptimizer(model, "sgd", n_modes=2, fit_at=6)
    with pytest.raises(ValueError, match=r"embed_every must be an integer >= 1, got True"):
        OnlineCMDOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), n_modes=2, fit_at=6, embed_every=True)
