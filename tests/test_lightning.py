"""PyTorch Lightning as a client: the optimizers from ``configure_optimizers`` (schedulers, accumulation,
clipping, bf16-mixed, resume from checkpoints), ``OnlineCMDCallback`` and, in one 2-process launch,
``strategy="ddp"``. A 2-layer MLP on synthetic data (``tests/_lightning_worker.py``); every fit is a
few dozen steps."""

from __future__ import annotations

import importlib.util
import types
import warnings

import pytest
import torch

if importlib.util.find_spec("lightning") is None:
    pytest.skip("needs lightning: pip install 'modeopt[lightning]'", allow_module_level=True)

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import modeopt  # noqa: E402
from modeopt.integrations.lightning import CMDCallback, OnlineCMDCallback  # noqa: E402

import _lightning_worker as W  # noqa: E402  (tests/ is on sys.path; the spawned ranks import it too)

KINDS = ["cmd", "blockwise", "online"]
pytestmark = [pytest.mark.filterwarnings(f"ignore:{m}") for m in (
    ".*does not have many workers", ".*val_dataloader", ".*LeafSpec", ".*Checkpoint directory",
    ".*number of training batches", ".*shuffling enabled", ".*dirpath has changed", ".*Be aware that when using")]
DONE = {"cmd": "embedded", "blockwise": "embedded", "online": "fitted"}


@pytest.fixture(autouse=True)
def _one_thread():
    # results compared bit for bit are computed in one process here: one thread keeps the fits short
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fit(module: W.Net, epochs: int = 2, callbacks=(), ckpt_path=None, **kw) -> pl.Trainer:
    kw.setdefault("enable_checkpointing", any(isinstance(c, ModelCheckpoint) for c in callbacks))
    trainer = pl.Trainer(max_epochs=epochs, callbacks=list(callbacks), **W.QUIET, **kw)
    trainer.fit(module, W.loader(W.data()), ckpt_path=ckpt_path)
    return trainer


def phase(opt) -> str:
    return opt.online.phase if isinstance(opt, modeopt.OnlineCMDOptimizer) else opt.phase


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- the optimizers
@pytest.mark.parametrize("interval", ["step", "epoch"])
@pytest.mark.parametrize("kind", KINDS)
def test_optimizers_from_configure_optimizers_with_a_scheduler(kind, interval):
    module = W.Net(kind, interval)
    trainer = fit(module, epochs=3)
    opt = trainer.optimizers[0]
    assert phase(opt) == DONE[kind] and trainer.global_step == 3 * W.STEPS_PER_EPOCH
    # the scheduler drove the shared param groups once per step / epoch, through the switch
    count = trainer.global_step if interval == "step" else 3
    assert opt.param_groups[0]["lr"] == pytest.approx(W.LR * W.GAMMA ** count, rel=1e-12)
    losses = torch.tensor(module.losses)
    assert torch.isfinite(losses).all()
    assert losses[-W.STEPS_PER_EPOCH:].mean() < 0.8 * losses[:W.STEPS_PER_EPOCH].mean()


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_accumulation_and_clipping_act_on_what_the_optimizer_steps(kind):
    """accumulate_grad_batches=2: one optimizer step per 2 batches (the warm-up/fit counts steps);
    gradient_clip_val: Lightning clips the optimizer's param groups, i.e. dL/dr in mode space."""
    clip = 0.05
    module = W.Net(kind, "step")
    before, after = [], []

    class Norms(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # before Lightning clips
            before.append(torch.nn.utils.get_total_norm([p.grad for g in optimizer.param_groups for p in g["params"]
                                                         if p.grad is not None]).item())

    def hook(opt, args, kwargs):  # after the base optimizer stepped: the gradients it used, clipped
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        after.append((phase(module.trainer.optimizers[0]), torch.nn.utils.get_total_norm(grads).item()))

    class Hook(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            trainer.optimizers[0].base.register_step_post_hook(hook)

    trainer = fit(module, epochs=4, callbacks=[Norms(), Hook()], accumulate_grad_batches=2, gradient_clip_val=clip)
    opt = trainer.optimizers[0]
    assert trainer.global_step == 2 * W.STEPS_PER_EPOCH and len(module.losses) == 4 * W.STEPS_PER_EPOCH
    assert phase(opt) == DONE[kind]
    assert len(after) == trainer.global_step
    assert max(before) > 2 * clip  # clipping had work to do ...
    assert all(n <= clip * (1 + 1e-5) for _, n in after), (before, after)  # ... and every step saw clipped ones
    if kind == "cmd":
        assert opt.step_count == trainer.global_step and {p for p, _ in after} == {"warmup", "embedded"}


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_mixed(kind):
    module = W.Net(kind, "step")
    trainer = fit(module, epochs=3, precision="bf16-mixed")
    assert module.out_dtype == torch.bfloat16  # autocast ran the forward
    assert phase(trainer.optimizers[0]) == DONE[kind]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in module.state_dict().values())
    losses = torch.tensor(module.losses)
    assert losses[-W.STEPS_PER_EPOCH:].mean() < 0.8 * losses[:W.STEPS_PER_EPOCH].mean()


class _EvaluatesTheShadow(W.Net):
    """OnlineCMDOptimizer's eval()/train() around validation, as docs/lightning.md shows."""

    def on_validation_epoch_start(self):
        self.trainer.optimizers[0].eval()

    def on_validation_epoch_end(self):
        self.trainer.optimizers[0].train()


def test_online_cmd_optimizer_eval_and_train_around_validation(tmp_path):
    module, seen, ds = _EvaluatesTheShadow("online", None), [], W.data()

    class Probe(pl.Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            opt = trainer.optimizers[0]
            if opt.online.phase == "fitted" and not trainer.sanity_checking and batch_idx == 0:
                # the tensors themselves: state_dict() reports the raw weights while they are swapped out
                live = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
                seen.append((live, dict(opt.cmd_state_dict())))
                trainer.save_checkpoint(tmp_path / "during.ckpt")

    trainer = pl.Trainer(max_epochs=3, callbacks=[Probe()], enable_checkpointing=False, **W.QUIET)
    trainer.fit(module, W.loader(ds), DataLoader(ds, batch_size=64))
    assert len(seen) == 2 and not trainer.optimizers[0].swapped
    for evaluated, shadow in seen:
        assert same({k: evaluated[k] for k in shadow}, shadow)
    # the last validation ran after the last step: a checkpoint saved in it holds those (raw) weights
    assert same(torch.load(tmp_path / "during.ckpt", weights_only=True)["state_dict"], W.weights(module))
    assert not same(W.weights(module), {**W.weights(module), **seen[-1][1]})


# ----------------------------------------------------------------------------- resuming
def _checkpointed_run(kind: str, tmp_path, **ckpt_args) -> tuple[W.Net, list, OnlineCMDCallback | None, pl.Trainer]:
    callback = OnlineCMDCallback(n_modes=3, fit_at=12, snapshot_every=2, n_samples=60) if kind == "callback" else None
    module = W.Net("adamw" if kind == "callback" else kind, "step")
    cbs = [ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, **ckpt_args)] + ([callback] if callback else [])
    trainer = fit(module, epochs=4, callbacks=cbs)
    return module, sorted(tmp_path.glob("*.ckpt")), callback, trainer


def _resume(kind: str, path, tmp_path, probe=None) -> tuple[W.Net, OnlineCMDCallback | None, pl.Trainer]:
    callback = OnlineCMDCallback(n_modes=3, fit_at=12, snapshot_every=2, n_samples=60) if kind == "callback" else None
    module = W.Net("adamw" if kind == "callback" else kind, "step", seed=7)  # other initial weights: all restored
    cbs = [ModelCheckpoint(dirpath=tmp_path, save_top_k=-1)] + ([callback] if callback else []) + ([probe] if probe else [])
    trainer = fit(module, epochs=4, callbacks=cbs, ckpt_path=path)
    return module, callback, trainer


@pytest.mark.parametrize("kind", ["adamw", "cmd", "blockwise", "online", "callback"])
def test_epoch_end_checkpoints_resume_bit_for_bit_in_every_phase(kind, tmp_path):
    """ModelCheckpoint at epoch ends, fit(ckpt_path=...) with a new module and Trainer: the same final
    weights (and shadow model) bit for bit, from before and after the switch / fit. The loader is
    shuffled per epoch by ``set_epoch`` (what Lightning calls), so epoch e's order is the run's own."""
    module, ckpts, callback, trainer = _checkpointed_run(kind, tmp_path / "run", every_n_epochs=1,
                                                         filename="{epoch}")
    final = W.weights(module)
    phases = []
    for path in ckpts[:3]:  # after epochs 0, 1, 2: steps 8, 16, 24
        state = torch.load(path, weights_only=True)
        if kind == "callback":
            phases.append(state["callbacks"][callback.state_key]["online"]["phase"])
        elif kind == "online":
            phases.append(state["optimizer_states"][0]["online"]["phase"])
        resumed, cb2, _ = _resume(kind, path, tmp_path / f"resume-{path.stem}")
        assert same(W.weights(resumed), final), f"{kind}: resuming from {path.name} changed the result"
        if kind == "callback":
            assert same(cb2.cmd_state_dict(), callback.cmd_state_dict())
            assert cb2.online.calls == callback.online.calls == 32
    if kind in ("callback", "online"):
        assert phases == ["recording", "fitted", "fitted"]
    if kind == "cmd":
        assert [h["step"] for h in trainer.optimizers[0].history] == [12]  # the switch between checkpoints 1 and 2


@pytest.mark.parametrize("kind", ["adamw", "cmd", "callback"])
def test_mid_epoch_checkpoints_replay_the_epoch_start_as_for_plain_adamw(kind, tmp_path):
    """A checkpoint at step 12, half-way through epoch 1: Lightning restores the state exactly but
    restarts the epoch's data, so the resumed run trains on that epoch's first half twice and never
    on its second half. The final weights then differ from the uninterrupted run, for plain AdamW as
    for the CMD optimizers; what they see after resuming is the same for all of them."""
    module, ckpts, callback, _ = _checkpointed_run(kind, tmp_path / "run", every_n_train_steps=12,
                                                   filename="{step}")
    at_12 = {}

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if not at_12:
                at_12.update(W.weights(pl_module))

    with pytest.warns(UserWarning, match="dataloader is not resumable"):  # Lightning says so, too
        resumed, cb2, trainer = _resume(kind, ckpts[0], tmp_path / "resume", probe=Probe())
    assert ckpts[0].name == "step=12.ckpt" and trainer.global_step == 32
    # what the resumed run trained on: epoch 1's first 4 batches again, then epochs 2 and 3
    assert resumed.seen == module.seen[8:12] + module.seen[16:32]
    assert not same(W.weights(resumed), W.weights(module))
    # the state at the restart is the checkpoint's, exactly: the difference is the data alone
    assert same(at_12, torch.load(ckpts[0], weights_only=True)["state_dict"])
    if kind == "callback":
        assert cb2.online.calls == callback.online.calls == 32 and cb2.online.phase == "fitted"


# ----------------------------------------------------------------------------- the callback
def _callback_fit(epochs: int = 3, **kw) -> tuple[W.Net, OnlineCMDCallback, pl.Trainer, list]:
    cb = OnlineCMDCallback(n_modes=3, fit_at=12, snapshot_every=2, n_samples=60, **kw)
    module = W.Net("adamw", None)
    seen = []

    class Probe(pl.Callback):  # after the OnlineCMDCallback in the list: sees what validation evaluates
        def on_validation_start(self, trainer, pl_module):
            if not trainer.sanity_checking and cb.online.phase == "fitted":
                seen.append((trainer.global_step, W.weights(pl_module), dict(cb.cmd_state_dict())))

    ds = W.data()
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[cb, Probe()], enable_checkpointing=False, **W.QUIET)
    trainer.fit(module, W.loader(ds), DataLoader(ds, batch_size=64))
    return module, cb, trainer, seen


def test_callback_swaps_the_shadow_in_for_validation_test_and_predict():
    module, cb, trainer, seen = _callback_fit()
    assert cb.online.phase == "fitted" and cb.online.calls == 24
    assert [s for s, _, _ in seen] == [16, 24]  # validation after epochs 1 and 2 (fit at step 12)
    for _, evaluated, shadow in seen:
        assert same({k: evaluated[k] for k in shadow}, shadow)
    raw = W.weights(module)
    shadow = {k: v.clone() for k, v in cb.cmd_state_dict().items()}
    assert not same(raw, shadow)
    ds = DataLoader(W.data(), batch_size=64)
    loss = trainer.test(module, ds, verbose=False)[0]["test_loss"]
    assert same(W.weights(module), raw)  # raw weights back, bit for bit
    pred = torch.cat(trainer.predict(module, ds))
    assert same(W.weights(module), raw)
    cmd_model = cb.online.averaged_model()
    x, y = W.data().tensors
    with torch.no_grad():
        assert torch.equal(pred, cmd_model(x))
        assert loss == pytest.approx(torch.nn.functional.cross_entropy(cmd_model(x), y).item(), rel=1e-6)
        assert loss != pytest.approx(torch.nn.functional.cross_entropy(module(x), y).item(), rel=1e-4)


def test_callback_swap_for_chooses_the_stages_and_export_at_end():
    module, cb, trainer, seen = _callback_fit(swap_for=("test",), export_at_end=True)
    assert [s for s, _, _ in seen] == [16, 24]
    for _, evaluated, shadow in seen:  # validation kept the raw weights
        assert not same({k: evaluated[k] for k in shadow}, shadow)
    assert cb.exported and same({k: v for k, v in W.weights(module).items()}, dict(cb.cmd_state_dict()))


def test_callback_checkpoint_holds_raw_weights_and_test_from_a_checkpoint_uses_the_shadow(tmp_path):
    module, cb, trainer, _ = _callback_fit()
    path = tmp_path / "c.ckpt"
    saved_during = {}

    class SaveDuringValidation(pl.Callback):
        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            if not saved_during:
                trainer.save_checkpoint(path)
                saved_during.update(W.weights(pl_module))

    raw = W.weights(module)
    trainer.callbacks.append(SaveDuringValidation())
    trainer.validate(module, DataLoader(W.data(), batch_size=64), verbose=False)
    assert same({k: saved_during[k] for k in cb.cmd_state_dict()}, dict(cb.cmd_state_dict()))  # swapped then
    state = torch.load(path, weights_only=True)
    assert same(state["state_dict"], raw)  # ... yet the checkpoint holds the raw weights
    # a fresh module, Trainer and callback: test(ckpt_path=...) evaluates the restored shadow model
    cb2 = OnlineCMDCallback(n_modes=3, fit_at=12, snapshot_every=2, n_samples=60)
    fresh = W.Net("adamw", None, seed=3)
    t2 = pl.Trainer(callbacks=[cb2], **W.QUIET)
    out = t2.predict(fresh, DataLoader(W.data(), batch_size=64), ckpt_path=path)
    x, _ = W.data().tensors
    with torch.no_grad():
        assert torch.equal(torch.cat(out), cb.online.averaged_model()(x))
    assert same(W.weights(fresh), raw)


def test_callback_refuses_bad_arguments_and_cmd_optimizers():
    good = dict(n_modes=3, fit_at=12, snapshot_every=2, n_samples=60)
    for bad, match in (({"fit_at": 4}, "at least 3"), ({"n_modes": 0}, "n_modes"), ({"swap_for": ("val",)}, "unknown"),
                       ({"swap_for": 3}, "collection"), ({"export_at_end": "yes"}, "export_at_end"),
                       ({"names": "net.0.weight"}, "names"), ({"seed": 1.5}, "seed"),
                       ({"record_dtype": torch.int8}, "record_dtype")):
        with pytest.raises(ValueError, match=match):
            OnlineCMDCallback(**{**good, **bad})
    assert OnlineCMDCallback(**good, swap_for="test").swap_for == {"test"}
    for kind, match in (("cmd", "already trains in mode space"), ("online", "keeps its own")):
        with pytest.raises(TypeError, match=match):
            fit(W.Net(kind, None), epochs=1, callbacks=[OnlineCMDCallback(**good)])
    with pytest.raises(ValueError, match="not a state of this callback"):
        OnlineCMDCallback(**good).load_state_dict({"n_averaged": 3})
    with pytest.warns(UserWarning, match="will not be fitted"):
        fit(W.Net("adamw", None), epochs=1, callbacks=[OnlineCMDCallback(**{**good, "fit_at": 40})])
    cb = OnlineCMDCallback(**{**good, "fit_at": 40}, export_at_end=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        module = W.Net("adamw", None)
        fit(module, epochs=1, callbacks=[cb])
    assert not cb.exported and cb.online.phase == "recording"
    with pytest.raises(RuntimeError, match="no shadow model yet"):
        OnlineCMDCallback(**good).cmd_state_dict()
    from lightning.pytorch.strategies import FSDPStrategy

    with pytest.raises(TypeError, match="not FSDPStrategy"):  # refused before anything is built
        OnlineCMDCallback(**good).setup(types.SimpleNamespace(strategy=FSDPStrategy()), W.Net(), "fit")


def test_callback_goes_on_over_a_second_fit_of_the_same_module():
    cb = OnlineCMDCallback(n_modes=3, fit_at=12, snapshot_every=2, n_samples=60)
    module = W.Net("adamw", None)
    with pytest.warns(UserWarning, match="will not be fitted"):
        fit(module, epochs=1, callbacks=[cb])
    assert cb.online.calls == 8 and cb.online.phase == "recording"
    fit(module, epochs=1, callbacks=[cb])  # a new Trainer: its global_step starts at 0 again
    assert cb.online.calls == 16 and cb.online.phase == "fitted"


def test_cmd_callback_records_the_switch_and_refuses_nothing_in_one_process():
    cb = CMDCallback()
    trainer = fit(W.Net("cmd", "step"), epochs=2, callbacks=[cb])
    assert cb.history == [{"step": 12, "phase": "embedded", "cycle": 0, "trainable_params": 3}]
    assert trainer.optimizers[0].phase == "embedded"


# ----------------------------------------------------------------------------- DDP: one 2-process launch
@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    import torch.distributed as dist

    from modeopt.distributed.ddp import launch_local

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("lightning-ddp")
    launch_local(W.run_scenarios, (str(out), list(W.SCENARIOS)), nprocs=2, timeout=240)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _both(ddp, name):
    for rank, res in enumerate(ddp):
        if "error" in res[name]:
            pytest.fail(f"scenario {name!r} failed on rank {rank}:\n{res[name]['error']}")
    return ddp[0][name], ddp[1][name]


def test_ddp_cmd_optimizer_all_reduces_the_mode_scalars(ddp):
    r0, r1 = _both(ddp, "cmd")
    assert r0["phase"] == "embedded" and r0["global_step"] == 2 * W.STEPS_PER_EPOCH  # half the data per rank
    n = sum(v.numel() for v in W.Net().state_dict().values())
    by_phase = {}
    for e in r0["log"]:
        by_phase.setdefault(e["phase"], set()).add(e["bytes"])
    assert by_phase == {"warmup": {4 * n}, "embedded": {4 * r0["n_modes"]}}, by_phase
    assert r0["history"] == r1["history"] and r0["history"][0]["trainable_params"] == 3
    assert r0["switches"][0].get("agreed", True)
    assert same(r0["weights"], r1["weights"])
    assert r0["lr"] == pytest.approx(W.LR * W.GAMMA ** r0["global_step"], rel=1e-12)


def test_ddp_online_callback_keeps_one_shadow_on_both_ranks(ddp):
    r0, r1 = _both(ddp, "online")
    assert r0["phase"] == "fitted" and r0["calls"] == r1["calls"] > 8
    assert r0["seed"] == r1["seed"]  # seed=None: rank 0's draw, broadcast
    assert r0["repaired"] == r1["repaired"] == 0
    assert same(r0["raw"], r1["raw"]) and same(r0["shadow"], r1["shadow"])
    assert not same(r0["raw"], {**r0["raw"], **r0["shadow"]})
    assert same(r0["after_validate"], r0["raw"])  # validation swapped the shadow in and back out
