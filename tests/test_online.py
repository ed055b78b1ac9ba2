"""Online CMD (a shadow model kept exact from running moments) and gradual embedding."""

import copy
import warnings

import pytest
import torch
from torch import nn

import modeopt
from modeopt import OnlineCMD, OnlineCMDOptimizer
from modeopt.modespace.space import kernels
from workloads import SmallCNN, batches, evaluate, train_steps


def _planted_run(steps=200, fit_at=60, snapshot_every=3, sample_every=2, seed=0):
    """Drive a model's tensors through a planted 3-mode trajectory; return the OnlineCMD and the samples."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 20), nn.BatchNorm1d(20), nn.Linear(20, 5))
    online = OnlineCMD(model, n_modes=3, fit_at=fit_at, snapshot_every=snapshot_every, sample_every=sample_every,
                       seed=seed)
    n = online.layout.n
    g = torch.Generator().manual_seed(1)
    prof = torch.randn(3, steps, generator=g).cumsum(1) * 0.01
    lab = torch.randint(0, 3, (n,), generator=g)
    a = torch.randn(n, generator=g)
    b = torch.randn(n, generator=g) * 5  # weights far larger than their movement: the case that breaks naive sums
    samples = []
    for t in range(steps):
        w = a * prof[lab, t] + b + 1e-4 * torch.randn(n, generator=g)
        with torch.no_grad():
            for spec, tensor in zip(online.layout.specs, online.tensors):
                tensor.copy_(w[spec.offset : spec.stop].view_as(tensor))
        samples.append(w.clone())
        online.update()
    steps_used = list(range(snapshot_every, fit_at + 1, snapshot_every))
    steps_used += list(range(fit_at + sample_every - fit_at % sample_every, steps + 1, sample_every))
    return online, samples, steps_used


def test_running_moments_equal_the_batch_least_squares_fit():
    online, samples, used = _planted_run()
    assert online.phase == "fitted" and online.count == len(used) == 90
    w = torch.stack([samples[s - 1].double() for s in used], 1)  # (N, T): exactly the samples it saw
    labels, a, b = online.coefficients()
    labels, a, b = torch.cat([kernels.as_index(x).long() for x in labels]), torch.cat(a), torch.cat(b)
    refs = torch.tensor([online.layout.specs[t].offset + i for t, i in online.ref_index])
    r = w[refs]
    rc, wc = r - r.mean(1, keepdim=True), w - w.mean(1, keepdim=True)
    a_batch = (wc * rc[labels]).sum(1) / (rc * rc).sum(1)[labels]
    b_batch = w.mean(1) - a_batch * r.mean(1)[labels]
    assert float(((a - a_batch).abs() / a_batch.abs()).max()) < 1e-6
    assert float((b - b_batch).abs().max() / b_batch.abs().max()) < 1e-6
    # the CMD weights: a * r_now + b, named like the model's tensors
    cmd = online.layout.flatten(online.cmd_state_dict(), dtype=torch.float64)
    expect = a_batch * samples[-1].double()[refs][labels] + b_batch
    assert float((cmd - expect).abs().max() / expect.abs().max()) < 1e-6
    # memory: 8 (mean) + 8 (co-moment) + the mode (1 byte: uint8 labels on every path) per weight, 16 per mode
    assert all(lab.dtype == torch.uint8 for lab in online.labels)
    assert online.state_bytes == 17 * online.layout.n + 16 * 3


def test_applied_averaged_model_and_load_into_leave_the_training_untouched():
    online, samples, _ = _planted_run()
    model = online.model
    raw = copy.deepcopy(model.state_dict())
    shadow = online.averaged_model()
    cmd = online.cmd_state_dict()
    with online.applied() as m:
        assert m is model
        for k, v in cmd.items():
            assert torch.equal(model.state_dict()[k], v)
    for k, v in raw.items():
        assert torch.equal(model.state_dict()[k], v)  # restored bit for bit
    for k, v in cmd.items():
        assert torch.equal(shadow.state_dict()[k], v)
    assert "1.running_mean" in cmd  # BatchNorm statistics are modelled too


def test_bad_input_and_refusals():
    model = SmallCNN()
    with pytest.raises(ValueError, match=r"fit_at=8 with snapshot_every=3 records 2 snapshot\(s\) before the fit; "
                                         r"CMD needs at least 3: make fit_at >= 9"):
        OnlineCMD(model, fit_at=8, snapshot_every=3)
    with pytest.raises(ValueError, match=r"n_modes=50 > n_samples=40"):
        OnlineCMD(model, n_modes=50, n_samples=40, fit_at=30)
    with pytest.raises(RuntimeError, match=r"has not fitted yet \(step 0 of fit_at=30\)"):
        OnlineCMD(model, fit_at=30).coefficients()
    # NaN at the fit point: a warning naming the tensor, training goes on, the fit is retried
    online = OnlineCMD(model, n_modes=2, fit_at=6, snapshot_every=2)
    for _ in range(5):
        with torch.no_grad():
            model.fc1.weight.add_(0.01 * torch.randn_like(model.fc1.weight))
            model.conv1.weight.add_(0.01 * torch.randn_like(model.conv1.weight))
        online.update()
    with torch.no_grad():
        model.fc2.bias[3] = float("inf")
    with pytest.warns(UserWarning, match=r"cannot fit at step 6: 'fc2.bias' holds NaN/inf\. Training goes on"):
        online.update()
    assert online.phase == "recording"
    # a parameter added after construction: a clear error at the next sample
    model.extra = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"the model changed after the OnlineCMD was built \(added: \['extra.bias', "
                                         r"'extra.weight'\], removed: \[\]\)"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            online.update()
            online.update()


def _train(mnist, steps, opt, model, seed=0, start=0):
    xtr, ytr, *_ = mnist
    data = batches(xtr, ytr, 32, seed=seed)
    for _ in range(start):
        next(data)
    losses = []
    train_steps(model, opt, data, steps - start, on_step=lambda i, loss: losses.append(loss))
    return losses


def _build(granularity="tensor", embed_every=6):
    torch.manual_seed(0)
    model = SmallCNN()
    opt = OnlineCMDOptimizer(model, torch.optim.Adam(model.parameters(), lr=1e-3), n_modes=3, fit_at=12,
                             snapshot_every=2, sample_every=2, seed=0, embed_every=embed_every, embed_fraction=0.5,
                             granularity=granularity)
    return model, opt


@pytest.mark.parametrize("granularity", ["tensor", "weight"])
def test_gradual_embedding_freezes_and_frozen_weights_follow_their_references(mnist, granularity):
    model, opt = _build(granularity)
    _train(mnist, 40, opt, model)
    assert opt.frozen, "something must be frozen after several checks"
    assert opt.frozen_fraction() > 0
    refs = {(t, i) for t, i in opt.online.ref_index}
    r = opt.online.references_now().to(torch.float32)
    for t, f in opt.frozen.items():
        p = opt.online.tensors[t]
        full = kernels.as_index(opt.online.labels[t]).long()
        lab = full if f["mask"] is None else full[f["mask"]]
        value = p.detach().view(-1) if f["mask"] is None else p.detach().view(-1)[f["mask"]]
        assert torch.allclose(value, torch.addcmul(f["b"], f["a"], r[lab]), rtol=0, atol=1e-6)  # a * r_now + b
        assert not any((t, i) in refs for i in (range(p.numel()) if f["mask"] is None else
                                                 torch.nonzero(f["mask"]).flatten().tolist()))
        if f["mask"] is None:  # a whole frozen tensor stops costing
            assert not p.requires_grad and p.grad is None
            assert all(p is not q for g in opt.param_groups for q in g["params"])
            assert p not in opt.state


def test_tensor_granularity_saves_gradients_and_state(mnist):
    """Make the whole-tensor case happen deterministically: force a tensor frozen, then check that no
    gradient is computed for it and the optimizer skips it."""
    model, opt = _build("tensor", embed_every=None)
    _train(mnist, 14, opt, model)
    labels, a, b = opt.online.coefficients()
    with_refs = {tt for tt, _ in opt.online.ref_index}
    t = max((i for i in opt.embeddable if i not in with_refs), key=lambda i: opt.online.tensors[i].numel())
    p = opt.online.tensors[t]
    opt._freeze_tensor(t, a[t], b[t])
    before = p.detach().clone()
    _train(mnist, 20, opt, model, start=14)
    assert p.grad is None and not p.requires_grad
    assert p not in opt.state and all(p is not q for g in opt.param_groups for q in g["params"])
    assert opt.online.mean[t].numel() == 0  # its running moments were freed
    assert not torch.equal(p, before)  # it still moves, following its references


def test_freezing_a_reference_tensor_hands_the_reference_off(mnist):
    """The tensor holding a mode's reference can freeze: another free weight of the mode carries the
    profile, in the same units, so frozen weights keep following and nothing jumps."""
    model, opt = _build("tensor", embed_every=None)
    _train(mnist, 14, opt, model)
    online = opt.online
    t = max({tt for tt, _ in online.ref_index}, key=lambda i: online.tensors[i].numel())
    modes = [m for m, (tt, _) in enumerate(online.ref_index) if tt == t]
    r_before = online.references_now()
    cmd_before = opt.cmd_state_dict()
    opt.freeze([online.names[t]])
    assert all(online.ref_index[m][0] != t for m in modes)  # handed off to weights of other tensors
    assert all(online.tensors[online.ref_index[m][0]].requires_grad for m in modes)
    assert all(float(online.ref_scale[m]) != 1.0 for m in modes)
    # the new references give the same profile, up to their own fit residual
    torch.testing.assert_close(online.references_now(), r_before, rtol=0, atol=0.05 * float(r_before.abs().max()))
    # and the CMD model of the other tensors barely moves
    cmd_after = opt.cmd_state_dict()
    other = [n for i, n in enumerate(online.names) if i != t and "running" not in n and "num_batches" not in n]
    drift = max(float((cmd_after[n] - cmd_before[n]).abs().max()) for n in other)
    assert drift < 0.05 * max(float(cmd_before[n].abs().max()) for n in other)
    p = online.tensors[t]
    before = p.detach().clone()
    _train(mnist, 30, opt, model, start=14)
    assert not p.requires_grad and not torch.equal(p, before)  # frozen, and it follows the new references
    r = online.references_now().to(torch.float32)
    f = opt.frozen[t]
    lab = kernels.as_index(online.labels[t]).long()
    torch.testing.assert_close(p.detach().view(-1), torch.addcmul(f["b"], f["a"], r[lab]), rtol=0, atol=1e-6)


def test_a_mode_with_no_other_free_weight_keeps_its_reference_tensor(mnist):
    model, opt = _build("tensor", embed_every=None)
    _train(mnist, 14, opt, model)
    online = opt.online
    t, _ = online.ref_index[0]
    for u in opt.embeddable:  # make mode 0 live in tensor t only
        if u != t:
            lab = kernels.as_index(online.labels[u])
            online.labels[u] = torch.where(lab == 0, torch.ones_like(lab), lab).to(online.labels[u].dtype)
    with pytest.raises(ValueError, match="has no other free weight to carry it"):
        opt.freeze([online.names[t]])
    assert t not in opt.frozen and online.tensors[t].requires_grad  # nothing changed
    with pytest.raises(ValueError, match=r"hand_off needs a finite, non-zero slope a \(got a=0.0, b=1.0\)"):
        online.hand_off(0, t, 0, 0.0, 1.0)
    opt.freeze([online.names[t]], allow_references=True)  # asked for: mode 0 stops
    assert t in opt.frozen


def test_gradual_tensor_embedding_freezes_most_of_a_cnn(mnist):
    """With hand-offs, whole-tensor gradual embedding is not held back by where the references are."""
    model, opt = _build("tensor", embed_every=4)
    _train(mnist, 60, opt, model)
    assert opt.frozen_fraction() > 0.5
    assert sum(h["hand_offs"] for h in opt.embed_history) >= 1


@pytest.mark.parametrize("stop,granularity", [(8, "weight"), (12, "weight"), (20, "weight"), (33, "weight"),
                                              (33, "tensor")])  # recording, the fit step, fitted, partly frozen
def test_resume_is_bit_exact_in_every_phase(mnist, stop, granularity, tmp_path):
    model, opt = _build(granularity)
    _train(mnist, stop, opt, model)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ck.pt")
    rest = _train(mnist, 45, opt, model, start=stop)
    model2, opt2 = _build(granularity)
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    model2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    rest2 = _train(mnist, 45, opt2, model2, start=stop)
    assert rest2 == rest
    for (k, v), (k2, v2) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(v, v2), k
    for k, v in opt.cmd_state_dict().items():
        assert torch.equal(opt2.cmd_state_dict()[k], v), k


def test_eval_train_swap_and_the_shadow_model(mnist):
    xtr, ytr, xte, yte = mnist
    torch.manual_seed(0)
    model = SmallCNN()
    opt = OnlineCMDOptimizer(model, torch.optim.Adam(model.parameters(), lr=1e-3), n_modes=5, fit_at=30,
                             snapshot_every=3, seed=0)
    _train(mnist, 60, opt, model)
    raw = copy.deepcopy(model.state_dict())
    raw_acc = evaluate(model, xte, yte)
    opt.eval()
    cmd_acc = evaluate(model, xte, yte)
    with pytest.raises(RuntimeError, match=r"call opt.train\(\) before training steps"):
        opt.step()
    opt.state_dict()  # allowed while swapped (issue #15): the HF Trainer saves right after evaluating
    for k, v in raw.items():  # and the model's state dict reports the raw weights meanwhile
        assert torch.equal(model.state_dict()[k], v)
    opt.train()
    for k, v in raw.items():
        assert torch.equal(model.state_dict()[k], v)
    assert cmd_acc > 0.8 and raw_acc > 0.8 and cmd_acc != raw_acc
    shadow = SmallCNN()
    shadow.load_state_dict(opt.cmd_state_dict())  # a plain state dict: loads into the original class
    assert evaluate(shadow, xte, yte) == cmd_acc


def test_bad_optimizer_arguments():
    model = SmallCNN()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="granularity must be 'tensor' or 'weight'"):
        OnlineCMDOptimizer(model, base, fit_at=30, granularity="layer")
    with pytest.raises(ValueError, match=r"embed_fraction must be in \(0, 1\]"):
        OnlineCMDOptimizer(model, base, fit_at=30, embed_every=5, embed_fraction=0)


# ------------------------------------------------------------------ devices, memory, host syncs
def test_compact_labels_and_17_bytes_per_weight_without_the_fused_kernels():
    """The labels are uint8 (M <= 256) on the torch path too, and the results are those of the fused path."""
    fused, _, _ = _planted_run()
    with kernels.use_fused(False):
        online, _, _ = _planted_run()
        assert all(lab.dtype == torch.uint8 for lab in online.labels)
        assert online.state_bytes == 17 * online.layout.n + 16 * online.n_modes
        cmd = online.cmd_state_dict()
    for k, v in fused.cmd_state_dict().items():
        torch.testing.assert_close(cmd[k], v, rtol=1e-6, atol=1e-6)
    assert kernels.label_dtype(300) == torch.int16 and kernels.label_dtype(256) == torch.uint8


class _HostSync(AssertionError):
    pass


def _no_host_sync(monkeypatch):
    """Make every way of reading a tensor's value on the host raise."""
    def refuse(name):
        def f(*args, **kwargs):
            raise _HostSync(f"host sync: Tensor.{name}")
        return f

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse(name))


def test_update_after_the_fit_never_synchronises_with_the_host(mnist, monkeypatch):
    """update() (and the frozen weights' assignment) read no tensor value on the host after the fit:
    the references are gathered on the device and the moments stay there. Checked by making
    .item(), bool(), float(), int(), .tolist() raise inside those calls."""
    model, opt = _build("weight", embed_every=None)
    opt.online.sample_every = 1
    _train(mnist, 14, opt, model)
    online = opt.online
    labels, a, b = online.coefficients()
    refs = {t for t, _ in online.ref_index}
    t_whole = next(t for t in opt.embeddable if t not in refs)
    t_part = next(t for t in opt.embeddable if t != t_whole and online.tensors[t].numel() > 4)
    pick = torch.zeros(a[t_part].numel(), dtype=torch.bool)
    pick[1::3] = True
    pick[[i for tt, i in online.ref_index if tt == t_part]] = False
    opt._freeze_tensor(t_whole, a[t_whole], b[t_whole])
    opt._freeze_weights(t_part, pick, a[t_part], b[t_part])
    count = online.count
    with monkeypatch.context() as m:
        _no_host_sync(m)
        for _ in range(3):
            with torch.no_grad():
                for x in online.tensors:
                    if x.is_floating_point():
                        x.add_(1e-3)
            opt._apply_frozen()
            online.update()
        with pytest.raises(_HostSync):  # the patch is live
            bool(torch.ones(()))
    assert online.count == count + 3
    # after a load, too: the loaded labels are checked at the load, not at the first update
    sd = online.state_dict()
    online.load_state_dict(sd)
    with monkeypatch.context() as m:
        _no_host_sync(m)
        online.update()
    assert online.count == count + 4


def test_a_state_saved_on_cuda_resumes_on_the_cpu_via_map_location(mnist, monkeypatch, tmp_path):
    """Simulated device move: the checkpoint's storages are tagged 'cuda:0' as a GPU run's would be;
    it loads with map_location='cpu' into a CPU model, the state follows the model's tensors, and
    the resumed run equals the uninterrupted one bit for bit."""
    model, opt = _build("weight")
    _train(mnist, 26, opt, model)  # fitted and partly frozen (the check at step 24 froze weights)
    assert opt.frozen
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ck.pt")
    rest = _train(mnist, 32, opt, model, start=26)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):  # the file really says 'cuda'
            torch.load(tmp_path / "ck.pt", weights_only=True)
    ck = torch.load(tmp_path / "ck.pt", weights_only=True, map_location="cpu")
    model2, opt2 = _build("weight")
    model2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    online = opt2.online
    for t, x in enumerate(online.tensors):
        assert online.labels[t].device == x.device and online.labels[t].dtype == torch.uint8
        assert online.mean[t].device == x.device and online.comoment[t].device == x.device
    for v in (online.mode_mean, online.mode_m2, online.ref_scale, online.ref_shift):
        assert v.device == online.reference_device
    rest2 = _train(mnist, 32, opt2, model2, start=26)
    assert rest2 == rest
    for (k, v), v2 in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(v, v2), k
    for k, v in opt.cmd_state_dict().items():
        assert torch.equal(opt2.cmd_state_dict()[k], v), k


def test_int64_labels_of_an_older_checkpoint_load_compact():
    online, _, _ = _planted_run()
    sd = online.state_dict()
    old = dict(sd, labels=[kernels.as_index(lab).long() for lab in sd["labels"]])
    before = online.cmd_state_dict()
    online.load_state_dict(old)
    assert all(lab.dtype == torch.uint8 for lab in online.labels)
    assert online.state_bytes == 17 * online.layout.n + 16 * online.n_modes
    for k, v in online.cmd_state_dict().items():
        assert torch.equal(v, before[k]), k
