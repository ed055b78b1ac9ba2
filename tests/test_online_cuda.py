"""Online CMD on a device (``pytest -m cuda tests/test_online_cuda.py``), through the public API.

Marked ``cuda`` and skipped without a GPU; ``MODEOPT_TEST_DEVICE=cpu`` rehearses it on the CPU
(as ``tests/test_cuda.py`` does). Checked on a small MLP, weight-granularity embedding (a
partly frozen and a whole frozen tensor):

* every fitted tensor lives on the device: labels (uint8), mean and co-moment per tensor, the
  per-mode moments and reference maps; 17 B per modelled weight (``state_bytes``);
* ``update()`` and the frozen weights' assignment do not synchronise with the host: on CUDA
  under ``torch.cuda.set_sync_debug_mode("error")`` (which catches syncs inside torch too);
* a checkpoint saved on the device resumes on the CPU, whose checkpoint resumes on the device;
  the run equals the uninterrupted one (bit for bit where the device is the CPU).
"""

from __future__ import annotations

import contextlib
import io
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modeopt

DEVICE = os.environ.get("MODEOPT_TEST_DEVICE", "cuda")
DEV = torch.device(DEVICE)
ON_CUDA = DEV.type == "cuda"
CPU = torch.device("cpu")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(),
                       reason="needs a CUDA GPU (or MODEOPT_TEST_DEVICE=cpu to rehearse on the CPU)"),
]

FIT_AT, EMBED_EVERY = 6, 3


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 64)
        self.fc2 = nn.Linear(64, 64)
        self.fc3 = nn.Linear(64, 4)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def batch(i: int, device):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(32, 16, generator=g).to(device), torch.randint(0, 4, (32,), generator=g).to(device)


def build(device, seed: int = 0):
    torch.manual_seed(seed)
    model = MLP().to(device)
    opt = modeopt.OnlineCMDOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), n_modes=3,
                                     fit_at=FIT_AT, snapshot_every=1, n_samples=200, seed=0, embed_every=EMBED_EVERY,
                                     embed_fraction=0.3, granularity="weight")
    return model, opt


def steps(model, opt, device, start: int, stop: int) -> list[float]:
    losses = []
    for i in range(start, stop):
        x, y = batch(i, device)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def save(model, opt) -> bytes:
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    return buf.getvalue()


def resume(blob: bytes, device):
    ck = torch.load(io.BytesIO(blob), map_location=device, weights_only=True)
    model, opt = build(device, seed=123)  # other initial weights: everything comes from the checkpoint
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["opt"])
    return model, opt


def assert_state_on(opt, device: torch.device):
    online = opt.online
    for t, x in enumerate(online.tensors):
        assert x.device.type == device.type
        assert online.labels[t].device.type == device.type and online.labels[t].dtype == torch.uint8
        assert online.mean[t].device.type == device.type and online.comoment[t].device.type == device.type
    for v in (online.mode_mean, online.mode_m2, online.ref_scale, online.ref_shift):
        assert v.device.type == device.type
    for f in opt.frozen.values():
        assert all(v.device.type == device.type for v in f.values() if v is not None)


def test_online_state_lives_on_the_device_and_update_does_not_sync():
    model, opt = build(DEV)
    steps(model, opt, DEV, 0, FIT_AT + 2 * EMBED_EVERY + 1)
    online = opt.online
    assert online.phase == "fitted" and opt.frozen, opt.embed_history
    assert_state_on(opt, DEV)
    assert online.state_bytes == 17 * online.layout.n + 16 * online.n_modes
    labels, a, b = online.coefficients()
    partly = [t for t, f in opt.frozen.items() if f["mask"] is not None]
    assert partly, "weight-granularity embedding should have frozen part of a tensor"
    whole = {t for t, f in opt.frozen.items() if f["mask"] is None}
    t = next(t for t in opt.embeddable if t not in {u for u, _ in online.ref_index} | whole | {partly[0]})
    opt._freeze_tensor(t, a[t], b[t])  # a whole frozen tensor beside the partly frozen ones
    guard = contextlib.nullcontext()
    if ON_CUDA:
        torch.cuda.synchronize()
        guard = _sync_debug_error()
    count = online.count
    with guard:
        for _ in range(3):
            opt._apply_frozen()
            online.update()
    assert online.count == count + 3
    assert all(bool(torch.isfinite(m).all()) for m in online.mean)


@contextlib.contextmanager
def _sync_debug_error():
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


def test_online_resume_device_cpu_device():
    stop, save_at = FIT_AT + 3 * EMBED_EVERY + 1, FIT_AT + EMBED_EVERY + 1  # fitted, one check done
    model, opt = build(DEV)
    ref_losses = steps(model, opt, DEV, 0, stop)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    ref_cmd = {k: v.clone() for k, v in opt.cmd_state_dict().items()}

    model, opt = build(DEV)
    losses = steps(model, opt, DEV, 0, save_at)
    blob = save(model, opt)
    del model, opt
    model, opt = resume(blob, CPU)
    assert_state_on(opt, CPU)
    losses += steps(model, opt, CPU, save_at, save_at + 3)
    blob = save(model, opt)
    del model, opt
    model, opt = resume(blob, DEV)
    assert_state_on(opt, DEV)
    losses += steps(model, opt, DEV, save_at + 3, stop)
    cmd = opt.cmd_state_dict()
    if not ON_CUDA:  # one device: bit for bit
        assert losses == ref_losses
        for k, v in model.state_dict().items():
            assert torch.equal(v, ref[k]), k
        for k, v in cmd.items():
            assert torch.equal(v, ref_cmd[k]), k
    else:  # CPU arithmetic in between: equal to float32 rounding, the frozen set may differ at the margin
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-3, atol=1e-4)
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, ref[k], rtol=1e-3, atol=1e-4)
