"""BlockwiseCMD: one block trained at a time, then moving in its own modes (issue #20)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import modeopt
from modeopt.blockwise.embedding import embed_block
from modeopt.blockwise.optimizer import find_blocks
from modeopt.trajectories.layout import ParamLayout
from modeopt.trajectories.snapshots import SnapshotBuffer
from modeopt.modespace.switch import initial_mode_space
from modeopt.trajectories.trajectory import Trajectory

from _small import _one_thread  # noqa: F401  (fixture)

PER_BLOCK = 6


class Stack(nn.Module):
    """in 8 -> 32, three residual blocks (Linear 32x32, tanh, LayerNorm), head 32 -> 2."""

    def __init__(self, n_layers: int = 3):
        super().__init__()
        self.inp = nn.Linear(8, 32)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.LayerNorm(32)) for _ in range(n_layers))
        self.head = nn.Linear(32, 2)

    def forward(self, x):
        h = self.inp(x)
        for layer in self.layers:
            h = h + layer(h)
        return self.head(h)


X = torch.randn(512, 8, generator=torch.Generator().manual_seed(1))
Y = (X[:, 0] + 0.5 * X[:, 1] > 0).long()


def make(seed: int = 0, device: str = "cpu", **kw):
    torch.manual_seed(seed)
    model = Stack().to(device)
    args = dict(blocks=find_blocks(model), steps_per_block=PER_BLOCK, n_modes=3, train_always=["head."], n_samples=200,
                seed=0)
    args.update(kw)
    return model, modeopt.BlockwiseCMD(model, torch.optim.AdamW(model.parameters(), lr=1e-2), **args)


def train(model, opt, steps: int, start: int = 0) -> list[float]:
    losses = []
    for i in range(start, start + steps):
        idx = torch.arange(i * 32, i * 32 + 32) % len(Y)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(X[idx]), Y[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_blocks_train_in_turn_and_finished_blocks_move_only_along_their_modes():
    model, opt = make()
    assert find_blocks(model) == ["layers.0.", "layers.1.", "layers.2."]
    trains = lambda: {n for n, p in model.named_parameters() if p.requires_grad}  # noqa: E731
    assert trains() == {"layers.0.0.weight", "layers.0.0.bias", "layers.0.2.weight", "layers.0.2.bias",
                        "head.weight", "head.bias"}  # the input layer is in no block: frozen
    inp_before = model.inp.weight.detach().clone()
    train(model, opt, PER_BLOCK)
    assert opt.active == 1 and len(opt.spaces) == 1 and opt.history[0]["step"] == PER_BLOCK
    # block 0: its matrix is embedded (r trained instead), its bias and norm keep training
    assert trains() == {"layers.0.0.bias", "layers.0.2.weight", "layers.0.2.bias", "layers.1.0.weight",
                        "layers.1.0.bias", "layers.1.2.weight", "layers.1.2.bias", "head.weight", "head.bias",
                        "head.modeopt_block0_r0"}
    # the base optimizer holds state only for what it trains now
    in_groups = {id(p) for g in opt.param_groups for p in g["params"]}
    assert {id(p) for p in opt.state} <= in_groups and id(model.layers[0][0].weight) not in in_groups
    space = opt.spaces[0]
    w0, r0 = model.layers[0][0].weight.detach().clone(), space.r_full().detach().clone()
    train(model, opt, 4, PER_BLOCK)
    dr = (space.r_full().detach() - r0).double()
    moved = model.layers[0][0].weight.detach().double().reshape(-1) - w0.double().reshape(-1)
    expect = space.coefficients()[0].double() * dr[space.mode_index()[0]]
    assert dr.abs().max() > 1e-4 and moved.abs().max() > 1e-5
    torch.testing.assert_close(moved, expect, rtol=1e-4, atol=1e-6)
    assert torch.equal(model.inp.weight, inp_before)
    train(model, opt, 3 * PER_BLOCK, PER_BLOCK + 4)
    assert opt.phase == "embedded" and [h["block"] for h in opt.history] == [0, 1, 2]
    assert opt.recording_bytes == 0 and opt.trainable_parameters() == 3 * 96 + 66 + 9  # free 1-D, head, r


def test_it_learns():
    model, opt = make()
    losses = train(model, opt, 5 * PER_BLOCK)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.75 * first, (first, last)


def test_embed_block_is_cmd_of_the_block():
    """The compact per-tensor path gives the model that decompose + the switch give."""
    torch.manual_seed(0)
    shapes = [(40, 30), (30,), (50, 20)]
    lay = ParamLayout(["a", "b", "c"], shapes)
    drive = torch.randn(3, 8).cumsum(1)
    data = torch.cat([torch.randn(s).reshape(-1, 1) * drive[i % 3] + 0.01 * torch.randn(int(torch.tensor(s).prod()), 8)
                      for i, s in enumerate(shapes)]).T.contiguous()
    params = [t.reshape(s).clone() for t, s in zip(lay.unflatten(data[-1]).values(), shapes)]
    traj = Trajectory(data, lay, list(range(8)))
    recordings = []
    for spec in lay.specs:  # one recording per tensor, as BlockwiseCMD keeps them
        rec = SnapshotBuffer(spec.numel, capacity=8)
        for t in range(8):
            rec.append(ParamLayout([spec.name], [spec.shape]), [data[t, spec.offset : spec.stop]], t)
        recordings.append(rec)
    ours = embed_block(recordings, lay.names, params, [0, 1, 0], 2, n_modes=4, n_samples=300, seed=3,
                       coef_dtype=torch.float32)
    assert recordings == []  # consumed, each freed after its tensor's pass
    d = modeopt.decompose(traj, n_modes=4, n_samples=300, seed=3, progress=False)
    ref = initial_mode_space(d, lay, params, [0, 1, 0], 2, "rms")
    for la, aa, lb, ab in zip(ours.labels, ours.a, ref.labels, ref.a):
        pairs = set(zip(la.long().tolist(), lb.tolist()))
        assert len(pairs) == len({x for x, _ in pairs}) == len({y for _, y in pairs})  # same partition
        torch.testing.assert_close(aa * ours.r[la.long()], ab * ref.r[lb], rtol=1e-5, atol=1e-6)
    assert sorted(ours.r_groups.tolist()) == sorted(ref.r_groups.tolist())


@pytest.mark.parametrize("save_at", [3, PER_BLOCK, 2 * PER_BLOCK + 1, 3 * PER_BLOCK + 2])
def test_resume_is_bit_for_bit_in_every_phase(save_at):
    model, opt = make()
    train(model, opt, save_at)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    rest = train(model, opt, 3 * PER_BLOCK + 5 - save_at, save_at)

    model2, opt2 = make(seed=7)  # other initial weights: everything must come from the checkpoint
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    model2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    assert opt2.active == save_at // PER_BLOCK and opt2.step_count == save_at
    assert train(model2, opt2, 3 * PER_BLOCK + 5 - save_at, save_at) == rest
    for (n, p), (_, q) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(p, q), n


def test_lr_scheduler_reaches_the_modes():
    model, opt = make()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.0 if s >= PER_BLOCK + 1 else 1.0)
    for i in range(PER_BLOCK + 3):
        train(model, opt, 1, i)
        sched.step()
    r = opt.spaces[0].r_full().detach().clone()
    w = model.layers[0][0].weight.detach().clone()
    train(model, opt, 2, PER_BLOCK + 3)
    assert opt.param_groups[0]["lr"] == 0.0
    # lr 0: AdamW does not move r, so neither do the block's weights
    assert torch.equal(opt.spaces[0].r_full().detach(), r) and torch.equal(model.layers[0][0].weight, w)


def test_export_gives_plain_weights_that_load_into_the_original_class():
    model, opt = make()
    train(model, opt, 2 * PER_BLOCK + 2)
    x = X[:16]
    with torch.no_grad():
        before = model(x)
    out = opt.export()
    assert not any("modeopt" in n for n, _ in out.named_parameters())
    fresh = Stack()
    fresh.load_state_dict(out.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), before, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="exported"):
        opt.step()
    with pytest.raises(RuntimeError, match="exported"):  # found in review: it saved a state no optimizer loads
        opt.state_dict()


def test_damaged_checkpoints_are_refused_and_change_nothing():
    model, opt = make()
    train(model, opt, PER_BLOCK + 2)
    good = opt.state_dict()
    model2, opt2 = make()
    model2.load_state_dict(model.state_dict())
    snapshot = copy.deepcopy(opt2.state_dict())

    def damaged(edit):
        sd = copy.deepcopy(good)
        edit(sd)
        return sd

    cases = [
        (lambda sd: sd["blockwise"].pop("spaces"), "not a BlockwiseCMD state"),
        (lambda sd: sd["blockwise"].update(active=5), "out of range"),
        (lambda sd: sd["blockwise"]["spaces"][0]["labels"][0].fill_(7), r"labels must lie in \[0, 3\)"),
        (lambda sd: sd["blockwise"]["spaces"][0]["a"][0].fill_(float("nan")), "finite"),
        (lambda sd: sd["blockwise"]["spaces"][0].update(r=torch.zeros(2)), "shape"),
        (lambda sd: sd["blockwise"].update(blocks=[["x."]]), "same blocks"),
        (lambda sd: sd["blockwise"].update(buffer=None), "recording"),
        (lambda sd: sd["base"]["param_groups"][0]["params"].pop(), "param group 0"),
        (lambda sd: sd["blockwise"]["buffer"][0].update(data=torch.zeros(2, 5)), "records 1024 weights"),
        (lambda sd: sd["blockwise"]["buffer"].pop(), "must hold 1 tensors"),
        # found in review: these raised TypeError, the first two after the mode spaces were rebuilt
        (lambda sd: sd["blockwise"].update(history=[1]), "history"),
        (lambda sd: sd["blockwise"].update(history=[None]), "history"),
        (lambda sd: sd["blockwise"].update(blocks=None), "blocks"),
        (lambda sd: sd["blockwise"].update(spaces=5), "finished block"),
        (lambda sd: sd["blockwise"]["spaces"][0].update(names=None), "embeds"),
        # the base optimizer's part: these raised AttributeError / KeyError after the mode spaces were rebuilt
        (lambda sd: sd["base"].update(state=None), "not a torch.optim state_dict"),
        (lambda sd: sd["base"].pop("state"), "not a torch.optim state_dict"),
        (lambda sd: sd["base"]["param_groups"].__setitem__(0, 5), "not dicts"),
        (lambda sd: sd["base"]["param_groups"][0].update(params=[0] * 10), "not a torch.optim state_dict"),
    ]
    for edit, msg in cases:
        with pytest.raises(ValueError, match=msg):
            opt2.load_state_dict(damaged(edit))
        assert opt2.active == 0 and not opt2.spaces
        assert not any("modeopt" in n for n, _ in model2.named_parameters())
        assert str(opt2.state_dict()) == str(snapshot)
    opt2.load_state_dict(good)
    assert opt2.active == 1


def test_bad_arguments_say_what_to_do():
    torch.manual_seed(0)
    model = Stack()
    adam = lambda: torch.optim.AdamW(model.parameters(), lr=1e-2)  # noqa: E731
    model.layers[1][2].weight.requires_grad_(False)  # frozen by the user: stays frozen in its block
    default = modeopt.BlockwiseCMD(model, adam(), steps_per_block=6)
    train(model, default, 7)
    assert not model.layers[1][2].weight.requires_grad and default.active == 1  # layers.1 active now
    model.layers[1][2].weight.requires_grad_(True)
    assert default.blocks == [("layers.2.",), ("layers.1.",), ("layers.0.",)]  # top layer first
    default.export()
    with pytest.raises(TypeError, match=r"train_always must be a list.*pass \['head\.'\]"):  # not 5 prefixes
        modeopt.BlockwiseCMD(model, adam(), steps_per_block=6, train_always="head.")
    with pytest.raises(TypeError, match="blocks must be a list"):
        modeopt.BlockwiseCMD(model, adam(), "layers.0.", steps_per_block=6)
    with pytest.raises(ValueError, match="overlap"):
        modeopt.BlockwiseCMD(model, adam(), ["layers.", "layers.1."], steps_per_block=6)
    with pytest.raises(ValueError, match="no parameter"):
        modeopt.BlockwiseCMD(model, adam(), ["layers.0.", "nothing."], steps_per_block=6)
    with pytest.raises(ValueError, match="snapshot"):
        modeopt.BlockwiseCMD(model, adam(), steps_per_block=2)
    with pytest.raises(ValueError, match="n_modes=50 > n_samples=40"):
        modeopt.BlockwiseCMD(model, adam(), steps_per_block=6, n_modes=50, n_samples=40)
    with pytest.raises(ValueError, match="fewer than n_modes"):
        modeopt.BlockwiseCMD(model, adam(), steps_per_block=6, n_modes=2000, n_samples=5000)
    with pytest.raises(ValueError, match="ModuleList"):
        modeopt.BlockwiseCMD(nn.Linear(3, 3), torch.optim.SGD(nn.Linear(3, 3).parameters(), lr=0.1), steps_per_block=6)
    first = modeopt.BlockwiseCMD(model, adam(), steps_per_block=6)
    train(model, first, 6)
    with pytest.raises(RuntimeError, match="already in mode space"):
        modeopt.BlockwiseCMD(model, adam(), steps_per_block=6)


def test_divergence_is_reported_at_the_embedding_with_the_tensor_name():
    model, opt = make()
    train(model, opt, 2)
    with torch.no_grad():
        model.layers[0][0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layers\.0\.0\.weight.*NaN"):
        train(model, opt, PER_BLOCK)


def test_hf_trainer_runs_it_unchanged(tmp_path):
    pytest.importorskip("accelerate")
    transformers = pytest.importorskip("transformers")
    from test_hf import TokenTask, hf_args, tiny_bert

    model = tiny_bert()  # not pretrained: its embeddings must learn too, so they are the first block
    blocks = ["bert.embeddings.", "bert.encoder.layer.0.", "bert.encoder.layer.1."]
    opt = modeopt.BlockwiseCMD(model, torch.optim.AdamW(model.parameters(), lr=3e-3), blocks, steps_per_block=12,
                               n_modes=4, train_always=["bert.pooler.", "classifier."], n_samples=200)
    trainer = transformers.Trainer(model=model, args=hf_args(tmp_path), train_dataset=TokenTask(),
                                   optimizers=(opt, None))
    trainer.train()
    assert opt.step_count == 40 and [h["block"] for h in opt.history] == [0, 1, 2]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.4 * losses[0], losses  # plain AdamW on every weight: 0.68 -> 0.17 here
    trainer.save_model(str(tmp_path / "final"))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "final" / "model.safetensors"))
    assert set(saved) == set(tiny_bert().state_dict())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_it_matches_the_cpu_run():
    def run(device):
        model, opt = make(device=device)
        losses = []
        for i in range(2 * PER_BLOCK + 3):
            idx = torch.arange(i * 32, i * 32 + 32) % len(Y)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(X[idx].to(device)), Y[idx].to(device))
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert all(a.device.type == torch.device(device).type for s in opt.spaces for a in s.a)
        return losses, {k: v.cpu() for k, v in model.state_dict().items()}

    cpu_losses, cpu_sd = run("cpu")
    gpu_losses, gpu_sd = run("cuda")
    assert max(abs(a - b) for a, b in zip(cpu_losses, gpu_losses)) < 1e-3
    for k in cpu_sd:
        torch.testing.assert_close(gpu_sd[k], cpu_sd[k], rtol=1e-3, atol=1e-4)


def test_export_keeps_the_parameters_the_user_froze_frozen():
    torch.manual_seed(0)
    model = Stack()
    model.inp.weight.requires_grad_(False)  # frozen by the user, outside every block
    model.layers[0][2].weight.requires_grad_(False)  # frozen by the user, inside block 0
    opt = modeopt.BlockwiseCMD(model, torch.optim.AdamW(model.parameters(), lr=1e-2), find_blocks(model),
                               steps_per_block=PER_BLOCK, n_modes=3, train_always=["head."], n_samples=200)
    train(model, opt, PER_BLOCK + 2)
    opt.export()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"inp.weight", "layers.0.2.weight"}  # everything else trainable again, as before


@pytest.mark.filterwarnings("error")  # no "copy of a model in mode space ... changes nothing": this copy drives it
@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_a_copy_of_the_optimizer_mid_block_goes_on_like_the_original(how):
    model, opt = make()
    train(model, opt, PER_BLOCK + 2)  # block 1 active, block 0 in mode space
    if how == "deepcopy":
        opt2 = copy.deepcopy(opt)
    else:
        buf = io.BytesIO()
        torch.save(opt, buf)
        buf.seek(0)
        opt2 = torch.load(buf, weights_only=False)
    model2 = opt2.model
    assert model2 is not model
    steps = 2 * PER_BLOCK  # through the embeddings of blocks 1 and 2
    assert train(model2, opt2, steps, PER_BLOCK + 2) == train(model, opt, steps, PER_BLOCK + 2)
    assert [h["block"] for h in opt2.history] == [0, 1, 2]
    for (n, p), (_, q) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(p, q), n


def test_lbfgs_with_a_closure_goes_through_the_changes_of_block():
    torch.manual_seed(0)
    model = Stack()
    opt = modeopt.BlockwiseCMD(model, torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4), find_blocks(model),
                               steps_per_block=PER_BLOCK, n_modes=3, train_always=["head."], n_samples=200)
    noisy = torch.randint(0, 2, (len(Y),), generator=torch.Generator().manual_seed(2))  # not learnt in 20 steps

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(X), noisy)
        loss.backward()
        return loss

    losses = [float(opt.step(closure).detach()) for _ in range(3 * PER_BLOCK + 2)]
    assert opt.phase == "embedded" and len(opt.history) == 3
    assert losses[-1] < 0.9 * losses[0], losses


def test_sgd_base_gets_unit_norm_modes_by_default_and_does_not_jump_at_an_embedding():
    """Found in review: with mode_scale="rms" fixed, SGD on r takes a step N_m times an SGD step on the
    weights (dL/dr sums a_i dL/dw_i over the mode): 0.45 -> 4.6 at the step after the first embedding.
    Like CMDOptimizer, the default is now "auto": "norm" for SGD (the projected SGD step), "rms" for Adam."""
    torch.manual_seed(0)
    model = Stack()
    opt = modeopt.BlockwiseCMD(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), find_blocks(model),
                               steps_per_block=PER_BLOCK, n_modes=3, train_always=["head."], n_samples=200)
    assert opt.mode_scale == "norm" and make()[1].mode_scale == "rms"
    losses = train(model, opt, 3 * PER_BLOCK + 3)
    assert max(losses[PER_BLOCK:]) < 1.5 * max(losses[:PER_BLOCK]), losses
    with pytest.raises(ValueError, match="'auto', 'rms' or 'norm'"):
        modeopt.BlockwiseCMD(model, torch.optim.SGD(model.parameters(), lr=0.05), steps_per_block=6, mode_scale="x")


def test_weights_tied_across_blocks_belong_to_the_first_block_and_an_emptied_block_says_so():
    torch.manual_seed(0)
    model = Stack()
    model.layers[1][0].weight = model.layers[0][0].weight  # layer 1's only matrix is layer 0's
    adam = lambda: torch.optim.AdamW(model.parameters(), lr=1e-2)  # noqa: E731
    with pytest.raises(ValueError, match=r"\['layers\.1\.0\.weight'\] are tied.*one block"):
        modeopt.BlockwiseCMD(model, adam(), find_blocks(model), steps_per_block=PER_BLOCK, n_modes=3)
    opt = modeopt.BlockwiseCMD(model, adam(), [["layers.0.", "layers.1."], "layers.2."], steps_per_block=PER_BLOCK,
                               n_modes=3, train_always=["head."], n_samples=200)
    train(model, opt, PER_BLOCK + 1)
    assert opt.spaces[0].names == ["layers.0.0.weight"] and model.layers[1][0].weight is model.layers[0][0].weight
    w = model.layers[0][0].weight.detach().clone()
    train(model, opt, 2, PER_BLOCK + 1)
    assert not torch.equal(model.layers[1][0].weight, w)  # the shared tensor moves along block 0's modes


def test_find_blocks_warns_when_another_stack_of_layers_would_be_frozen():
    """Found in review: on an encoder-decoder (T5) blocks=None took the decoder's layers only and froze
    the whole encoder without a word."""

    class EncDec(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
            self.dec = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    with pytest.warns(UserWarning, match=r"layers of 'dec'; \['enc'\].*freezes them"):
        assert find_blocks(EncDec()) == ["dec.0.", "dec.1.", "dec.2."]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert find_blocks(Stack()) == ["layers.0.", "layers.1.", "layers.2."]


def test_modes_join_their_weights_group_and_per_group_lambdas_reach_them():
    torch.manual_seed(0)
    model = Stack()
    mats = [p for p in model.parameters() if p.ndim == 2]
    vecs = [p for p in model.parameters() if p.ndim < 2]
    base = torch.optim.AdamW([{"params": mats, "weight_decay": 0.0}, {"params": vecs, "lr": 1e-3, "weight_decay": 0.0}],
                             lr=1e-2)
    opt = modeopt.BlockwiseCMD(model, base, find_blocks(model), steps_per_block=PER_BLOCK, n_modes=3,
                               train_always=["head."], n_samples=200)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 0.0 if s >= PER_BLOCK else 1.0, lambda s: 1.0])
    for i in range(PER_BLOCK):
        train(model, opt, 1, i)
        sched.step()
    assert opt.spaces[0].groups == [0] and any(p is opt.spaces[0].r_params[0] for p in opt.param_groups[0]["params"])
    r, w = opt.spaces[0].r_full().detach().clone(), model.layers[0][0].weight.detach().clone()
    bias = model.layers[0][0].bias.detach().clone()
    train(model, opt, 3, PER_BLOCK)
    assert [g["lr"] for g in opt.param_groups] == [0.0, 1e-3]
    assert torch.equal(opt.spaces[0].r_full().detach(), r) and torch.equal(model.layers[0][0].weight, w)
    assert not torch.equal(model.layers[0][0].bias, bias)  # group 1 still trains


def test_a_nan_gradient_of_r_skips_the_step_and_changes_nothing():
    model, opt = make()
    train(model, opt, PER_BLOCK + 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = opt.spaces[0].r_full().detach().clone()
    state = copy.deepcopy(opt.base.state_dict())
    opt.zero_grad()
    (nn.functional.cross_entropy(model(X[:32]), Y[:32]) * float("nan")).backward()
    with pytest.warns(modeopt.optim.nonfinite.NonFiniteWarning, match="skipped"):
        assert opt.step() is None
    assert opt.skipped_steps == 1 and opt.step_count == PER_BLOCK + 1
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(opt.spaces[0].r_full().detach(), r)
    assert str(opt.base.state_dict()) == str(state)
    losses = train(model, opt, 3, PER_BLOCK + 1)  # and training goes on, finite
    assert all(torch.isfinite(torch.tensor(losses))) and torch.isfinite(opt.spaces[0].r_full()).all()


def test_a_ddp_wrapped_model_is_refused_with_the_reason(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        ddp = nn.parallel.DistributedDataParallel(Stack())
        with pytest.raises(TypeError, match="BlockwiseCMD trains on one process.*DistributedDataParallel.*CMDOptimizer"):
            modeopt.BlockwiseCMD(ddp, torch.optim.AdamW(ddp.parameters(), lr=1e-2), steps_per_block=6)
    finally:
        dist.destroy_process_group()
