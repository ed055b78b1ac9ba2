"""The DLDR / P-SGD subspace baseline."""

import copy

import pytest
import torch

from modeopt.baselines import SubspaceOptimizer, pca_basis
from workloads import SmallCNN, batches, train_steps


def test_pca_basis_recovers_a_planted_subspace():
    g = torch.Generator().manual_seed(0)
    n, t, d = 50_000, 15, 3
    basis, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=torch.float64))
    coef = torch.randn(t, d, generator=g, dtype=torch.float64) * torch.tensor([5.0, 3.0, 1.0], dtype=torch.float64)
    data = (coef @ basis.T + torch.randn(n, dtype=torch.float64, generator=g)).to(torch.float32)  # + a constant offset
    p, sv = pca_basis(data, d, chunk=7_000)  # chunking must not matter
    assert torch.allclose(p.T @ p, torch.eye(d), atol=1e-5)
    # the found span equals the planted one: projecting the planted basis onto it loses nothing
    proj = p.double() @ (p.double().T @ basis)
    assert float((proj - basis).norm() / basis.norm()) < 1e-5
    assert bool(sv[0] >= sv[1] >= sv[2] > 0)
    with pytest.raises(ValueError, match=r"dim=15 needs 1 <= dim <= T - 1 = 14"):
        pca_basis(data, 15)
    with pytest.raises(ValueError, match="spans fewer than dim=4 directions"):
        pca_basis(data, 4)


def _run(mnist, steps, opt_state=None, model_state=None, start=0):
    xtr, ytr, *_ = mnist
    torch.manual_seed(0)
    model = SmallCNN()
    opt = SubspaceOptimizer(model, torch.optim.Adam(model.parameters(), lr=1e-3), dim=4, warmup_steps=30,
                            snapshot_every=5, exclude=["*.bias"])
    if model_state is not None:
        model.load_state_dict(model_state)
        opt.load_state_dict(opt_state)
    data = batches(xtr, ytr, 32, seed=0)
    for _ in range(start):
        next(data)
    losses, ckpt = [], []

    def on_step(i: int, loss: float) -> None:
        losses.append(loss)
        if start == 0 and i == 34:  # the state after 35 steps
            ckpt.append((copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())))

    train_steps(model, opt, data, steps - start, on_step=on_step)
    return model, opt, losses, (ckpt[0] if ckpt else None)


def test_training_stays_in_the_subspace_and_resumes_exactly(mnist):
    model, opt, losses, ckpt = _run(mnist, 45)
    assert opt.phase == "embedded"
    n_bias = sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias"))
    assert opt.trainable_parameters() == 4 + n_bias
    assert opt.param_groups[0]["params"][-1] is opt.c
    # after the switch the weights moved only along the columns of P
    model_at_switch, opt_at_switch, _, _ = _run(mnist, 30)
    w_now = opt._layout.flatten(dict(zip(opt._names, opt._params)))
    w_sw = opt_at_switch._layout.flatten(dict(zip(opt_at_switch._names, opt_at_switch._params)))
    move = (w_now - w_sw).double()
    assert float(move.norm()) > 1e-4
    residual = move - opt.P.double() @ (opt.P.double().T @ move)
    assert float(residual.norm() / move.norm()) < 1e-4
    # resume from a mid-subspace checkpoint: identical losses and weights
    model2, opt2, losses2, _ = _run(mnist, 45, opt_state=ckpt[1], model_state=ckpt[0], start=35)
    assert losses2 == losses[35:]
    for (k, v), (k2, v2) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(v, v2), k


def test_too_few_snapshots_for_the_dimension():
    model = SmallCNN()
    with pytest.raises(ValueError, match=r"dim=10 needs at least 11 warm-up snapshots, but warmup_steps=50 with "
                                         r"snapshot_every=5 records 10"):
        SubspaceOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), dim=10, warmup_steps=50, snapshot_every=5)
