"""Regressions of issue #15 (QA: real clients and hostile input), numbered as in the QA report.

Each test failed on the code before the fix. MLP with n_modes=3, warm-up/fit at 6, a snapshot every 2.
"""

from __future__ import annotations

import copy
import errno
import io
import shutil
import time

import pytest
import torch
from torch import nn

import modeopt
from modeopt import CMDOptimizer, OnlineCMD, OnlineCMDOptimizer


def mlp(d=8, h=16) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, 2))


def data(d=8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, d, generator=g), torch.randint(0, 2, (16,), generator=g)


X, Y = data()


def step(model, opt):
    opt.zero_grad()
    nn.functional.cross_entropy(model(X), Y).backward()
    opt.step()


def cmd(model=None, **kw):
    model = model or mlp()
    args = dict(n_modes=3, warmup_steps=6, snapshot_every=2, seed=0, **kw)
    return model, CMDOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.05), **args)


def ocmd(model=None, base=torch.optim.SGD, **kw):
    model = model or mlp()
    args = dict(n_modes=3, fit_at=6, snapshot_every=2, seed=0, **kw)
    return model, OnlineCMDOptimizer(model, base(model.parameters(), lr=0.05), **args)


def snapshot_of(opt: OnlineCMDOptimizer, model: nn.Module) -> dict:
    """What a failed load must leave as it was."""
    return {"calls": opt.online.calls, "phase": opt.online.phase, "frozen": sorted(opt.frozen),
            "history": copy.deepcopy(opt.embed_history), "base": copy.deepcopy(opt.base.state_dict()),
            "groups": [[id(p) for p in g["params"]] for g in opt.base.param_groups],
            "grad": [p.requires_grad for p in model.parameters()]}


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture(scope="module")
def frozen_state():
    """An OnlineCMDOptimizer state with whole frozen tensors and partly frozen ones ('prev' too)."""
    out = {}
    for gran in ("tensor", "weight"):
        model, opt = ocmd(embed_every=2, granularity=gran, embed_fraction=0.5)
        for _ in range(16):
            step(model, opt)
        sd = opt.state_dict()
        assert sd["frozen"] and sd["prev"], gran
        out[gran] = sd
    assert out["tensor"]["frozen_whole"]
    assert any("mask" in f for f in out["weight"]["frozen"].values())
    return out


# ------------------------------------------------------------------------- F2: HF Trainer, eval + save
def test_f2_state_dicts_while_swapped_give_raw_weights():
    model, opt = ocmd()
    for _ in range(8):
        step(model, opt)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    opt.eval()
    live = {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()}  # the CMD weights in the model
    assert any(not torch.equal(live[k], raw[k]) for k in raw)
    sd = opt.state_dict()  # was: RuntimeError "call opt.train() before state_dict()"
    for k, v in model.state_dict().items():  # raw weights, for a checkpoint that resumes exactly
        assert torch.equal(v, raw[k]), k
    for k, v in opt.cmd_state_dict().items():
        assert torch.equal(v, live[k]), k
    # a copy of the swapped model reports its own values; a pickled one too (no optimizer pickled)
    clone = copy.deepcopy(model)
    assert all(torch.equal(v, live[k]) for k, v in clone.state_dict().items())
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    assert all(torch.equal(v, live[k]) for k, v in again.state_dict().items())
    # under a prefix (a wrapper module), too
    wrapped = nn.ModuleDict({"inner": model})
    assert all(torch.equal(v, raw[k.removeprefix("inner.")]) for k, v in wrapped.state_dict().items())
    with pytest.raises(RuntimeError, match=r"call opt.train\(\) before load_state_dict"):
        opt.load_state_dict(sd)
    opt.train()
    assert not model._state_dict_hooks
    assert all(torch.equal(v, raw[k]) for k, v in model.state_dict(keep_vars=True).items())
    opt.load_state_dict(sd)  # the state saved in eval mode resumes


def _tiny_bert(seed):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, num_labels=2)
    return BertForSequenceClassification(cfg)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 2, (n,), generator=g)
        self.x = 5 + self.y[:, None] * 90 + torch.randint(0, 90, (n, 12), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "attention_mask": torch.ones_like(self.x[i]), "labels": self.y[i]}


def test_f2_trainer_saves_after_eval_and_resumes_raw_weights(tmp_path):
    """eval and save at step 8: the save used to raise 'call opt.train() before state_dict()' and the
    checkpoint's model held the CMD weights. Now it holds the raw ones and the resume is bit-exact."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from safetensors.torch import load_file
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class RawAt8(TrainerCallback):
        raw = None

        def on_step_end(self, args, state, control, model=None, **kw):  # before the Trainer evaluates
            if state.global_step == 8:
                RawAt8.raw = {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()}

    def run(out, resume=None):
        model = _tiny_bert(0 if resume is None else 7)
        opt = OnlineCMDOptimizer(model, torch.optim.AdamW(model.parameters(), lr=3e-3), n_modes=3, fit_at=6,
                                 snapshot_every=2, n_samples=100, seed=0)
        args = TrainingArguments(output_dir=str(out), max_steps=16, per_device_train_batch_size=8,
                                 eval_strategy="steps", eval_steps=8, save_strategy="steps", save_steps=8,
                                 report_to=[], use_cpu=True, disable_tqdm=True, log_level="error", seed=0,
                                 logging_steps=4)
        trainer = Trainer(model=model, args=args, train_dataset=_Tokens(128), eval_dataset=_Tokens(16, seed=1),
                          optimizers=(opt, None), callbacks=[RawAt8()])
        trainer.train(resume_from_checkpoint=resume)
        return model, opt, trainer

    model_a, opt_a, trainer_a = run(tmp_path / "a")
    assert opt_a.online.phase == "fitted" and opt_a.swapped  # the last eval left the CMD weights in
    saved = load_file(str(tmp_path / "a" / "checkpoint-8" / "model.safetensors"))
    for k, v in saved.items():
        assert torch.equal(v, RawAt8.raw[k]), k
    model_b, opt_b, trainer_b = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-8"))
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()  # raw, both swapped
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
    for k, v in opt_a.cmd_state_dict().items():
        assert torch.equal(v, opt_b.cmd_state_dict()[k]), k
    losses = [{h["step"]: h["loss"] for h in t.state.log_history if "loss" in h and h["step"] > 8}
              for t in (trainer_a, trainer_b)]
    assert losses[0] and losses[0] == losses[1]


# ------------------------------------------------------------------ F4: a failed load changes nothing
@pytest.mark.parametrize("bad", [[1], None, "x"])
def test_f4_bad_embed_history_is_refused_before_anything_changes(frozen_state, bad):
    sd = dict(frozen_state["weight"])
    sd["embed_history"] = bad
    model, opt = ocmd(embed_every=2, granularity="weight", embed_fraction=0.5)
    before = snapshot_of(opt, model)
    with pytest.raises(ValueError, match="the state's 'embed_history' must be a list of dicts"):
        opt.load_state_dict(sd)
    assert _same(snapshot_of(opt, model), before)


def test_f4_a_base_optimizer_that_refuses_its_state_changes_nothing(frozen_state, monkeypatch):
    model, opt = ocmd(embed_every=2, granularity="tensor", embed_fraction=0.5)
    before = snapshot_of(opt, model)

    def refuse(state):
        raise KeyError("param_groups")

    monkeypatch.setattr(opt.base, "load_state_dict", refuse)
    with pytest.raises(ValueError, match="the state's base optimizer does not load into this one .*nothing was"):
        opt.load_state_dict(frozen_state["tensor"])
    assert _same(snapshot_of(opt, model), before)
    monkeypatch.undo()
    opt.load_state_dict(frozen_state["tensor"])
    assert opt.frozen and opt.online.phase == "fitted"
    step(model, opt)


# ----------------------------------------------------- F5: frozen / prev entries of the wrong dtype or shape
def test_f5_frozen_and_prev_entries_are_checked_for_dtype_and_shape(frozen_state):
    part = next(k for k, f in frozen_state["weight"]["frozen"].items() if "mask" in f)

    def edit(fn):
        sd = copy.deepcopy(frozen_state["weight"])
        fn(sd)
        return sd

    cases = [
        (lambda sd: sd["frozen"][part].update(a=sd["frozen"][part]["a"].double()),
         r"coefficients a must be a 1-D torch.float32 tensor, got a torch.float64"),
        (lambda sd: sd["frozen"][part].update(a_full=sd["frozen"][part]["a_full"].view(16, 8)),
         r"coefficients a_full must be a 1-D torch.float32 tensor, got a torch.float32 tensor of shape \(16, 8\)"),
        (lambda sd: sd["prev"][part].__setitem__(0, sd["prev"][part][0].view(16, 8)),
         r"previous coefficients must be a 1-D torch.float64 tensor, got .* shape \(16, 8\)"),
        (lambda sd: sd["frozen"][part].update(mask=sd["frozen"][part]["mask"].to(torch.uint8)),
         r"mask entries must be a 1-D torch.bool tensor, got a torch.uint8 tensor of shape \(128,\)"),
    ]
    for fn, msg in cases:
        model, opt = ocmd(embed_every=2, granularity="weight", embed_fraction=0.5)
        before = snapshot_of(opt, model)
        with pytest.raises(ValueError, match=msg):
            opt.load_state_dict(edit(fn))
        assert _same(snapshot_of(opt, model), before)
    model, opt = ocmd(embed_every=2, granularity="weight", embed_fraction=0.5)
    opt.load_state_dict(frozen_state["weight"])
    for _ in range(3):
        step(model, opt)


# --------------------------------------------------------------- F6: the checkpoint's n_modes
def test_f6_checkpoint_n_modes_is_validated():
    model, opt = cmd()
    for _ in range(3):
        step(model, opt)
    warm = opt.state_dict()
    for _ in range(5):
        step(model, opt)
    emb = opt.state_dict()
    assert emb["cmd"]["space"]["r"].numel() == 3
    for bad in (-1, 0, 2.5, "3", None, True):
        sd = copy.deepcopy(warm)
        sd["cmd"]["n_modes"] = bad
        _, fresh = cmd()
        with pytest.raises(ValueError, match=r"the checkpoint's 'n_modes' must be an integer >= 1"):
            fresh.load_state_dict(sd)
        assert fresh.n_modes == 3 and fresh._step == 0
    for bad in (500, 2000):  # 178 embeddable weights; n_samples 1000
        sd = copy.deepcopy(warm)
        sd["cmd"]["n_modes"] = bad
        _, fresh = cmd()
        with pytest.raises(ValueError, match=rf"n_modes={bad} exceeds this optimizer's n_samples=1000 or its 178"):
            fresh.load_state_dict(sd)
    sd = copy.deepcopy(emb)
    sd["cmd"]["n_modes"] = 2
    _, fresh = cmd()
    with pytest.raises(ValueError, match="mode space has 3 mode scalars but its n_modes is 2"):
        fresh.load_state_dict(sd)
    old = copy.deepcopy(warm)
    del old["cmd"]["n_modes"]  # checkpoints from before n_modes was saved still load
    cmd()[1].load_state_dict(old)


# -------------------------------------------------- F7: a re-clustering checkpoint without recluster_every
def test_f7_recluster_warmup_checkpoint_needs_recluster_every():
    model, opt = cmd(recluster_every=4)
    while not (opt.cycle == 1 and opt.phase == "warmup" and opt._buffer is not None):
        step(model, opt)
    sd = opt.state_dict()
    _, fresh = cmd()
    with pytest.raises(ValueError, match=r"re-clustering cycle 1, but this CMDOptimizer was built without "
                                         r"recluster_every: build it with the saved run's recluster_every"):
        fresh.load_state_dict(sd)
    assert fresh.cycle == 0 and fresh._step == 0
    model2, fresh = cmd(model=mlp(), recluster_every=4)
    fresh.load_state_dict(sd)
    step(model2, fresh)


# -------------------------------------------------------------------- F8: OnlineCMD counts and moments
def test_f8_online_state_count_and_moment_shapes():
    model = mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.05)
    online = OnlineCMD(model, n_modes=3, fit_at=6, snapshot_every=2, seed=0)
    for _ in range(8):
        step(model, base)
        online.update()
    sd = online.state_dict()
    for edit, msg in [
        (lambda s: s.update(count=10**20),
         r"the state's 'count' must be an integer >= 0 and <= 2\*\*53, got 100000000000000000000"),
        (lambda s: s.update(calls=2**60), r"the state's 'calls' must be an integer >= 0 and <= 2\*\*53"),
        (lambda s: s["mean"].__setitem__(0, s["mean"][0].view(16, 8)),
         r"'mean' of '0.weight' must be a 1-D float64 tensor, got a torch.float64 tensor of shape \(16, 8\)"),
        (lambda s: s["comoment"].__setitem__(0, s["comoment"][0].float()),
         r"'comoment' of '0.weight' must be a 1-D float64 tensor, got a torch.float32"),
        (lambda s: s["labels"].__setitem__(0, s["labels"][0].view(16, 8)),
         r"'0.weight': the state's mode labels must be a 1-D tensor"),
    ]:
        bad = copy.deepcopy(sd)
        edit(bad)
        fresh = OnlineCMD(model, n_modes=3, fit_at=6, snapshot_every=2, seed=0)
        with pytest.raises(ValueError, match=msg):
            fresh.load_state_dict(bad)
        assert fresh.phase == "recording" and fresh.calls == 0
    fresh = OnlineCMD(model, n_modes=3, fit_at=6, snapshot_every=2, seed=0)
    fresh.load_state_dict(sd)
    fresh.update()
    with fresh.applied() as m:
        m(X)


# ------------------------------------------------------------------------- F12: a full disk
def test_f12_recording_on_a_full_disk_raises_oserror_and_stays_readable(tmp_path, monkeypatch):
    from modeopt.analysis import Recording, load_snapshots
    from modeopt.analysis import atomic_files

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    real_save = torch.save
    full = {"on": False}

    def save(obj, f, *a, **k):
        if full["on"]:
            with open(f, "wb") as fh:  # a partial file, as the zip writer leaves it
                fh.write(b"PK\x03\x04" + b"\0" * 100)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 768 vs 662")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    free = shutil.disk_usage(tmp_path).free
    with Recording(model, every=1, directory=tmp_path / "run", dtype=torch.bfloat16) as rec:
        for _ in range(3):
            step(model, opt)
            rec.step()
        full["on"] = True
        monkeypatch.setattr(atomic_files.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(free, free - 10, 10))
        step(model, opt)
        with pytest.raises(OSError, match=r"the disk is full: snapshot snapshot-000003.pt could not be written to "
                                          r".*it needs about 1,\d\d\d bytes, 10 are free there.*free space or record "
                                          r"to another directory") as e:
            rec.step()
        assert e.value.errno == errno.ENOSPC
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
            "anchor.pt", "manifest.json", "snapshot-000000.pt", "snapshot-000001.pt", "snapshot-000002.pt"]
        assert load_snapshots(tmp_path / "run").data.shape[0] == 3
        full["on"] = False
        step(model, opt)
        assert rec.step()  # the next snapshot is written
    traj = load_snapshots(tmp_path / "run")
    assert list(traj.steps) == [1, 2, 3, 5]


def test_f12_full_anchor_write_leaves_no_anchor_in_memory(tmp_path, monkeypatch):
    from modeopt.analysis import Recording, load_snapshots

    model = mlp()

    def save(obj, f, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 768 vs 662")

    rec = Recording(model, every=1, directory=tmp_path / "run", dtype=torch.bfloat16)
    with monkeypatch.context() as m:
        m.setattr(torch, "save", save)
        with pytest.raises(OSError):
            rec.step()
    assert rec._writer.anchor is None
    rec.step()
    rec.step()
    rec.step()
    assert load_snapshots(tmp_path / "run").data.shape[0] == 3


def test_f12_real_one_mib_tmpfs(small_tmpfs):
    from modeopt.analysis import Recording, load_snapshots

    mnt = small_tmpfs
    model = mlp(h=2000)  # 88 kB per float32 snapshot: about 11 fit
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = Recording(model, every=1, directory=mnt / "run")
    err = None
    for _ in range(30):
        step(model, opt)
        try:
            rec.step()
        except OSError as e:
            err = e
            break
    assert err is not None and err.errno == errno.ENOSPC, err
    assert "the disk is full" in str(err) and "bytes" in str(err)
    assert not list((mnt / "run").glob("*.tmp"))
    n = load_snapshots(mnt / "run").data.shape[0]  # readable up to the last complete snapshot
    assert n == rec.n_snapshots >= 5


# --------------------------------------------------------------------- F13: messages and consistency
def test_f13_duplicate_names_say_which_and_what_to_do():
    model = mlp()
    msg = r"the tensor '0.weight' is listed twice: list each tensor once"
    with pytest.raises(ValueError, match=msg):
        OnlineCMD(model, n_modes=3, fit_at=6, snapshot_every=2, names=["0.weight", "0.weight"])
    with pytest.raises(ValueError, match=msg):
        modeopt.TrajectoryRecorder(model, names=["0.weight", "0.bias", "0.weight"])


def test_f13_online_optimizer_refuses_a_duplicated_parameter():
    model = mlp()
    p = model[0].weight
    with pytest.warns(UserWarning):  # torch's own warning about the duplicate
        base = torch.optim.SGD([p, p, *list(model.parameters())[1:]], lr=0.1)
    with pytest.raises(ValueError, match=r"the base optimizer lists the parameter '0.weight' twice \(param group 0\)"):
        OnlineCMDOptimizer(model, base, n_modes=3, fit_at=6, snapshot_every=2)


def test_f13_reordered_names_say_the_order_differs():
    model = mlp()
    names = [n for n, _ in model.named_parameters()]
    online = OnlineCMD(model, n_modes=3, fit_at=6, snapshot_every=2, names=names[::-1])
    sd = online.state_dict()
    fresh = OnlineCMD(model, n_modes=3, fit_at=6, snapshot_every=2, names=names)
    with pytest.raises(ValueError, match=r"same tensors in a different order \(position 0: '2.bias' in the state, "
                                         r"'0.weight' here\): build it with names= in the saved run's order"):
        fresh.load_state_dict(sd)
    other = OnlineCMD(model, n_modes=3, fit_at=6, snapshot_every=2, names=names[:2])
    with pytest.raises(ValueError, match=r"4 tensors in the state, 2 here; only here: \[\], only in the state: "
                                         r"\['2.bias', '2.weight'\]"):
        other.load_state_dict(fresh.state_dict())
    # CMDOptimizer: the same for a reordered checkpoint
    m1, o1 = cmd()
    sd = o1.state_dict()
    sd["cmd"]["names"] = sd["cmd"]["names"][::-1]
    with pytest.raises(ValueError, match=r"the checkpoint embeds the same parameters in a different order"):
        cmd()[1].load_state_dict(sd)


def test_f13_trajectory_load_of_a_pickled_model_is_one_line(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(mlp(), path)
    for mmap in (False, True):
        with pytest.raises(ValueError) as e:
            modeopt.Trajectory.load(path, mmap=mmap)
        text = str(e.value)
        assert text.startswith(f"cannot read {path}: it holds pickled Python objects (e.g. a model or optimizer "
                               "saved whole), not tensors"), text
        assert "\n" not in text and "weights_only" not in text


def test_f13_recording_state_with_other_n_modes_warns():
    model = mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.05)
    online = OnlineCMD(model, n_modes=4, fit_at=6, snapshot_every=2, seed=0)
    for _ in range(3):
        step(model, base)
        online.update()
    fresh = OnlineCMD(model, n_modes=3, fit_at=6, snapshot_every=2, seed=0)
    with pytest.warns(UserWarning, match=r"recorded for n_modes=4; this OnlineCMD was built with n_modes=3: "
                                         r"online.n_modes is now 4"):
        fresh.load_state_dict(online.state_dict())
    assert fresh.n_modes == 4


# ----------------------------------------------------------- F14: a tensor replaced inside a param group
def test_f14_replaced_tensor_in_a_group_is_refused_before_the_switch():
    model, opt = cmd()
    step(model, opt)
    names = [n for n, _ in model.named_parameters()]
    opt.base.param_groups[0]["params"][-1] = nn.Parameter(torch.randn(2))  # same count, foreign tensor
    for _ in range(8):
        with pytest.raises(RuntimeError, match=r"param group 0 holds a tensor of shape \(2,\) that is not the "
                                               r"model's at position 3, where it held another tensor.*nothing was "
                                               r"changed"):
            step(model, opt)
    assert opt.phase == "warmup" and opt._step == 1 and [n for n, _ in model.named_parameters()] == names
    # a model parameter moved to another position is refused too; in mode space as well
    model, opt = cmd(exclude=["2.bias"])
    for _ in range(7):
        step(model, opt)
    assert opt.phase == "embedded" and len(opt.base.param_groups[0]["params"]) == 2
    g = opt.base.param_groups[0]["params"]
    g[0], g[-1] = g[-1], g[0]
    with pytest.raises(RuntimeError, match=r"param group 0 holds '[\w.]*modeopt_r0' at position 0"):
        step(model, opt)
    g[0], g[-1] = g[-1], g[0]
    step(model, opt)


def test_f14_identity_check_costs_little():
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(100)])  # 200 tensors
    _, opt = cmd(model=model)
    opt._check_groups()
    t0 = time.perf_counter()
    for _ in range(1000):
        opt._check_groups()
    per_call = (time.perf_counter() - t0) / 1000
    assert per_call < 200e-6, per_call  # measured ~10 us; a loose bound for busy CI machines


# ----------------------------------------------------------------------------------- F1, F3, F9
def test_f1_a_nan_closure_loss_in_mode_space_never_reaches_the_weights():
    """LBFGS evaluates its closure several times per step, with the weights brought up to date with r
    before each evaluation: a non-finite r of a line search must not be written into the weights."""
    torch.set_num_threads(1)
    model = mlp()
    opt = CMDOptimizer(model, torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=5), n_modes=3,
                       warmup_steps=6, snapshot_every=2, seed=0)

    def closure(poison=False):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(X), Y)
        loss = loss * float("nan") if poison else loss
        loss.backward()
        return loss

    for _ in range(7):
        opt.step(closure)
    assert opt.phase == "embedded"
    weights = [p.detach().clone() for p in opt.space.params]
    r = opt.space.r_full().detach().clone()
    with pytest.warns(RuntimeWarning, match=r"step \d+: the new value of the mode scalars r holds NaN/inf"):
        opt.step(lambda: closure(poison=True))
    assert opt.skipped_steps == 1
    assert all(torch.equal(p, w) for p, w in zip(opt.space.params, weights))
    assert torch.equal(opt.space.r_full().detach(), r) and torch.equal(opt.space.r_in_weights, r)
    opt.step(closure)  # a good step afterwards trains again, finitely
    assert all(bool(torch.isfinite(p).all()) for p in opt.space.params)
    assert not torch.equal(opt.space.r_full().detach(), r)


def test_f3_export_keeps_a_group_added_in_mode_space_and_refuses_what_it_cannot_restore():
    model, opt = cmd()
    for _ in range(7):
        step(model, opt)
    assert opt.phase == "embedded"
    extra = nn.Parameter(torch.randn(3))
    opt.base.add_param_group({"params": [extra]})
    with pytest.raises(RuntimeError, match=r"call opt.export\(\) first"):
        step(model, opt)
    model = opt.export()  # what the refusal recommends: it works, and keeps the added group
    assert opt.phase == "exported" and opt.space is None
    assert [len(g["params"]) for g in opt.base.param_groups] == [4, 1]
    assert opt.base.param_groups[1]["params"][0] is extra
    assert all(p.requires_grad for p in model.parameters())
    # a group that holds one of the embedded weights cannot be restored: refused, nothing changed
    model, opt = cmd()
    for _ in range(7):
        step(model, opt)
    opt.base.add_param_group({"params": [model[0].weight]})
    with pytest.raises(RuntimeError, match=r"export\(\) cannot restore .* holds a parameter the wrapper embeds.*"
                                           r"Nothing was changed"):
        opt.export()
    assert opt.phase == "embedded" and opt.space is not None and not model[0].weight.requires_grad
    opt.base.param_groups.pop()
    opt.export()
    assert opt.phase == "exported"


def test_f9_a_copy_trained_by_another_optimizer_warns_and_a_copied_pair_trains():
    model, opt = cmd()
    for _ in range(7):
        step(model, opt)
    lone = copy.deepcopy(model)
    torch.testing.assert_close(lone(X), model(X), rtol=0, atol=0)
    other = torch.optim.SGD(lone.parameters(), lr=0.5)
    with pytest.warns(UserWarning, match=r"a \*copy\* of a model in mode space.*call opt.export\(\) first"):
        step(lone, other)
    # model and optimizer copied together: the copy's optimizer drives the copy's mode space, silently
    model2, opt2 = copy.deepcopy((model, opt))
    assert opt2.space is not opt.space and opt2.space.params[0] is model2[0].weight
    before = model2[0].weight.detach().clone()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step(model2, opt2)
    assert not torch.equal(before, model2[0].weight)
    step(model, opt)  # the original, stepped alike, lands on the same weights
    torch.testing.assert_close(model2[0].weight, model[0].weight, rtol=0, atol=0)


def test_half_precision_weights_switch_without_a_warning_now_that_they_stay_exact():
    """The switch used to warn about bf16 weights drifting (in-place updates); they are formed from a
    frozen base now (tests/test_half_precision.py), so nothing warns."""
    import warnings

    torch.manual_seed(0)
    model = mlp().to(torch.bfloat16)
    opt = CMDOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-3), n_modes=3, warmup_steps=6,
                       snapshot_every=2, seed=0)
    x = X.to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(8):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x).float(), Y).backward()
            opt.step()
    assert opt.phase == "embedded"


def test_f15_coefficients_no_switch_can_produce_are_refused_on_load():
    model, opt = cmd()
    for _ in range(8):
        step(model, opt)
    sd = copy.deepcopy(opt.state_dict())
    sd["cmd"]["space"]["a"][0][3] = 1e38
    fresh_model, fresh = cmd()
    with pytest.raises(ValueError, match=r"'0.weight': its coefficients a reach \|a\| = 1e\+38, above .* which no "
                                         r"switch produces"):
        fresh.load_state_dict(sd)
    assert fresh.phase == "warmup" and fresh.space is None
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))  # the intact one loads
    assert fresh.phase == "embedded"
