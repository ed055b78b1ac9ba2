"""modeopt on a CUDA GPU, through the public API (``pytest -m cuda tests/test_cuda.py``).

Every test is marked ``cuda`` and skipped when no CUDA GPU is present. The device is
``MODEOPT_TEST_DEVICE`` (default ``"cuda"``), so the same file rehearses on CPU::

    MODEOPT_TEST_DEVICE=cpu PYTHONPATH=. python -m pytest -q -m cuda tests/test_cuda.py

Tests that only mean something on a GPU (``torch.cuda`` memory accounting) skip, with a
reason, on CPU.

What is checked, on ResNet18 (torchvision) and a tiny BERT (transformers, built offline), under
bf16 autocast:

* ``CMDOptimizer`` end to end - warm-up, switch, re-clustering (``recluster_every``), a second
  switch, export: finite and falling loss on a fixed batch; after every switch the trainable
  count is M + the excluded weights; ``a``, the labels, ``r`` live on the device; labels are
  uint8 (M <= 256) and ``a`` has ``coef_dtype``; the exported ``state_dict`` loads (strict) into
  a fresh model of the class and gives bit-identical outputs.
* ``OnlineCMDOptimizer`` - fit, gradual embedding (whole tensors), the ``eval()``/``train()``
  swap: the shadow model's state loads into a fresh model with identical outputs, raw weights are
  restored bit for bit, labels and running moments live on the device.
* Checkpoints across devices (an MLP, deterministic algorithms on): save on the device and resume
  there bit for bit; resume the device's checkpoint on the CPU, continue, save, resume back on the
  device and continue: equal to the uninterrupted run (bit for bit if the device is the CPU).
* ``torch.compile(model, fullgraph=True)`` of an embedded MLP: one training step matches eager.
* The mode-gradient reduction is bit-reproducible (no atomics-order dependence).
* CUDA only: steady-state device memory of the embedded phase against plain AdamW.

Internals read on purpose (the only way to state the device contract): ``opt.space`` of a
``CMDOptimizer`` (``a``, ``labels``, ``r_params``, ``applied``, ``n_modes``; see
``modeopt.modespace.space.ModeSpace``) and ``opt.online`` of an ``OnlineCMDOptimizer`` (``labels``,
``mean``, ``comoment``; see ``modeopt.online.shadow.OnlineCMD``).
"""

from __future__ import annotations

import copy
import io
import os

# cuBLAS needs this before its first use to be deterministic (torch.use_deterministic_algorithms).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import modeopt  # noqa: E402

DEVICE = os.environ.get("MODEOPT_TEST_DEVICE", "cuda")
DEV = torch.device(DEVICE)
ON_CUDA = DEV.type == "cuda"

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(),
                       reason="needs a CUDA GPU (or MODEOPT_TEST_DEVICE=cpu to rehearse on the CPU)"),
]

cuda_only = pytest.mark.skipif(not ON_CUDA, reason=f"measures torch.cuda memory; MODEOPT_TEST_DEVICE={DEVICE}")

M = 8  # modes
WARMUP, EVERY, RECLUSTER = 6, 2, 4  # recluster_steps defaults to max(4 // 4, 3 * 2) = 6
# Phases of a run (step indices): warm-up 0-5 (the switch inside step 5), embedded 6-9 (back to
# full training inside step 9), full 10-15 (the second switch inside step 15), embedded 16-18.
STEPS = WARMUP + RECLUSTER + 6 + RECLUSTER - 1


@pytest.fixture(autouse=True, scope="module")
def _threads():
    """Small tensors: one intra-op thread is faster than two on a busy 2-core rehearsal box."""
    n = torch.get_num_threads()
    if not ON_CUDA:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    warn_before = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn_before = torch.backends.cudnn.benchmark
    # warn_only: an op without a deterministic version (ours included) warns instead of raising;
    # the bit-for-bit assertions are what decides.
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    yield
    torch.use_deterministic_algorithms(before, warn_only=warn_before)
    torch.backends.cudnn.benchmark = cudnn_before


def autocast():
    return torch.autocast(device_type=DEV.type, dtype=torch.bfloat16)


# --------------------------------------------------------------------------- models and data
def resnet18_case():
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=10).to(DEV)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 32, 32, generator=g).to(DEV)
    y = torch.randint(0, 10, (8,), generator=g).to(DEV)

    def loss_fn(m):
        return F.cross_entropy(m(x), y)

    def outputs(m):
        return m(x)

    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, base, loss_fn, outputs, lambda: resnet18(num_classes=10).to(DEV)


BERT_VOCAB = 1000


def bert_config():
    from transformers import BertConfig

    return BertConfig(vocab_size=BERT_VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=128, max_position_embeddings=64, num_labels=2,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def bert_case():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(bert_config()).to(DEV)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(5, BERT_VOCAB, (8, 16), generator=g).to(DEV)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 2, (8,), generator=g).to(DEV)

    def loss_fn(m):
        return m(input_ids=ids, attention_mask=mask, labels=labels).loss

    def outputs(m):
        return m(input_ids=ids, attention_mask=mask).logits

    base = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, fused=True)
    return model, base, loss_fn, outputs, lambda: transformers.BertForSequenceClassification(bert_config()).to(DEV)


CASES = {"resnet18": resnet18_case, "bert": bert_case}


def train_step(model, opt, loss_fn) -> float:
    opt.zero_grad(set_to_none=True)
    with autocast():
        loss = loss_fn(model)
    loss.backward()
    opt.step()
    return float(loss.detach().float())


def excluded_numel(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad and p.ndim < 2)


def assert_falling(losses: list[float]) -> None:
    assert all(torch.isfinite(torch.tensor(losses))), losses
    k = min(4, len(losses) // 2)
    assert sum(losses[-k:]) / k < sum(losses[:k]) / k, f"the loss on a fixed batch did not fall: {losses}"
    assert losses[-1] < losses[0], losses


def assert_on_device(t: torch.Tensor, what: str) -> None:
    assert t.device.type == DEV.type, f"{what} lives on {t.device}, expected {DEVICE}"


def check_space(opt: modeopt.CMDOptimizer, model: nn.Module, n_excluded: int, coef_dtype: torch.dtype) -> None:
    """The mode space just entered: sizes, devices and compact dtypes."""
    space = opt.space
    assert opt.phase == "embedded" and space is not None
    assert space.n_modes == M
    assert opt.trainable_parameters() == M + n_excluded
    assert len(space.a) == len(space.labels) == len(space.params) > 0
    for i, (x, lab, p) in enumerate(zip(space.a, space.labels, space.params)):
        assert_on_device(x, f"a[{i}] ({space.names[i]})")
        assert_on_device(lab, f"labels[{i}] ({space.names[i]})")
        assert_on_device(p, f"weight {space.names[i]}")
        assert lab.dtype == torch.uint8, f"labels[{i}] are {lab.dtype}; expected uint8 for M = {M} <= 256"
        assert x.dtype == coef_dtype, f"a[{i}] is {x.dtype}, expected {coef_dtype}"
        assert x.numel() == lab.numel() == p.numel()
        assert not p.requires_grad
    for j, r in enumerate(space.r_params):
        assert_on_device(r, f"r[{j}]")
        assert r.dtype == torch.float32 and r.requires_grad
    assert_on_device(space.r_in_weights, "the applied r")
    assert sum(r.numel() for r in space.r_params) == M


# --------------------------------------------------------------------------- CMDOptimizer end to end
@pytest.mark.parametrize("case", ["resnet18", "bert"])
def test_cmd_optimizer_end_to_end(case):
    model, base, loss_fn, outputs, fresh = CASES[case]()
    n_excl = excluded_numel(model)
    n_total = sum(p.numel() for p in model.parameters())
    coef_dtype = torch.bfloat16 if case == "bert" else torch.float32
    opt = modeopt.CMDOptimizer(model, base, n_modes=M, warmup_steps=WARMUP, snapshot_every=EVERY,
                               recluster_every=RECLUSTER, n_samples=30 * M, seed=0, progress=False,
                               exclude=lambda n, p: p.ndim < 2, coef_dtype=coef_dtype)
    model.train()
    losses, switches, unembeds = [], 0, 0
    phase = opt.phase
    for step in range(STEPS):
        losses.append(train_step(model, opt, loss_fn))
        if opt.phase != phase:
            if opt.phase == "embedded":
                switches += 1
                check_space(opt, model, n_excl, coef_dtype)
            else:
                unembeds += 1
                assert opt.space is None and opt.trainable_parameters() == n_total
                assert all(p.device.type == DEV.type for p in model.parameters())
            phase = opt.phase
    assert (switches, unembeds, opt.cycle) == (2, 1, 1), (switches, unembeds, opt.cycle)
    assert opt.phase == "embedded"
    assert_falling(losses)

    model.eval()
    with torch.no_grad():
        before = outputs(model)
    exported = opt.export()
    assert exported is model and opt.phase == "exported"
    assert opt.trainable_parameters() == n_total
    assert not any(n.startswith("modeopt_r") for n, _ in model.named_parameters())
    sd = exported.state_dict()
    other = fresh()
    assert set(sd) == set(other.state_dict())
    other.load_state_dict(sd, strict=True)
    other.eval()
    with torch.no_grad():
        after, again = outputs(exported), outputs(other)
    assert torch.equal(before, after), "export changed the model's function"
    assert torch.equal(after, again), "a fresh model loading the exported state_dict computes something else"
    # the exported model trains as a plain model with the same optimizer
    model.train()
    assert torch.isfinite(torch.tensor(train_step(model, opt, loss_fn)))


# --------------------------------------------------------------------------- OnlineCMDOptimizer
@pytest.mark.parametrize("case", ["resnet18", "bert"])
def test_online_cmd_optimizer(case):
    model, base, loss_fn, outputs, fresh = CASES[case]()
    opt = modeopt.OnlineCMDOptimizer(model, base, n_modes=M, fit_at=WARMUP, snapshot_every=EVERY, n_samples=30 * M,
                                     seed=0, embed_every=2, embed_fraction=0.3, granularity="tensor")
    model.train()
    losses = [train_step(model, opt, loss_fn) for _ in range(WARMUP + 8)]
    assert_falling(losses)
    online = opt.online
    assert online.phase == "fitted" and online.n_modes == M
    for t, (lab, mean, com) in enumerate(zip(online.labels, online.mean, online.comoment)):
        name = online.names[t]
        assert_on_device(lab, f"labels of {name}")
        assert lab.dtype == torch.uint8, f"labels of {name} are {lab.dtype}; expected uint8 for M = {M}"
        if t not in online.frozen_tensors:
            assert_on_device(mean, f"running mean of {name}")
            assert_on_device(com, f"co-moment of {name}")
    # gradual embedding froze whole tensors: they left autograd and the optimizer, and follow a r + b
    assert opt.frozen and opt.frozen_fraction() > 0, opt.embed_history
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    for t in opt.frozen:
        p = online.tensors[t]
        assert not p.requires_grad and id(p) not in in_opt
        assert_on_device(p, f"frozen {online.names[t]}")

    # the eval()/train() swap: the shadow model loads into a fresh model; raw weights come back exactly
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    opt.eval()
    with torch.no_grad():
        shadow_out = outputs(model)
    # the live (CMD) tensors: model.state_dict() reports the raw weights while swapped (issue #15)
    shadow_sd = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    assert all(torch.equal(v, raw[k]) for k, v in model.state_dict().items())
    opt.train()
    for k, v in model.state_dict().items():
        assert torch.equal(v, raw[k]), f"opt.train() did not restore {k} exactly"
    cmd_sd = opt.cmd_state_dict()
    for k, v in cmd_sd.items():
        assert torch.equal(v.to(shadow_sd[k].dtype), shadow_sd[k]), k
    other = fresh()
    other.load_state_dict(shadow_sd, strict=True)
    other.eval()
    with torch.no_grad():
        assert torch.equal(outputs(other), shadow_out)
        assert torch.isfinite(shadow_out).all()
    model.train()
    assert torch.isfinite(torch.tensor(train_step(model, opt, loss_fn)))


# --------------------------------------------------------------------------- checkpoints across devices
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 64)
        self.fc2 = nn.Linear(64, 64)
        self.fc3 = nn.Linear(64, 4)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def mlp_batch(i: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(32, 16, generator=g).to(device), torch.randint(0, 4, (32,), generator=g).to(device)


def mlp_run(device, *, seed: int = 0):
    torch.manual_seed(seed)
    model = MLP().to(device)
    base = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    opt = modeopt.CMDOptimizer(model, base, n_modes=3, warmup_steps=WARMUP, snapshot_every=EVERY,
                               recluster_every=RECLUSTER, n_samples=200, seed=0, progress=False,
                               exclude=lambda n, p: p.ndim < 2)
    return model, opt


def mlp_steps(model, opt, device, start: int, stop: int) -> list[float]:
    losses = []
    for i in range(start, stop):
        x, y = mlp_batch(i, device)
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
    ckpt = torch.load(io.BytesIO(blob), map_location=device, weights_only=True)
    model, opt = mlp_run(device, seed=123)  # other initial weights: everything must come from the checkpoint
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    return model, opt


def space_devices(opt) -> set[str]:
    if opt.space is None:
        return set()
    s = opt.space
    return {t.device.type for t in [*s.a, *s.labels, *s.r_params, s.r_in_weights]}


def state_devices(opt) -> set[str]:
    return {v.device.type for st in opt.state.values() for v in st.values()
            if isinstance(v, torch.Tensor) and v.ndim > 0}


# Save points: inside the first warm-up (the recording is in the checkpoint) and in mode space.
# Same-device resume runs 18 steps (through the return to full training in step 9 and the
# second switch in step 15).
@pytest.mark.parametrize("save_at", [3, 7])
def test_resume_same_device_bit_exact(deterministic, save_at):
    total = 18
    model, opt = mlp_run(DEV)
    ref_losses = mlp_steps(model, opt, DEV, 0, total)
    ref = {k: v.clone() for k, v in model.state_dict().items()}

    model, opt = mlp_run(DEV)
    losses = mlp_steps(model, opt, DEV, 0, save_at)
    blob = save(model, opt)
    del model, opt
    model, opt = resume(blob, DEV)
    losses += mlp_steps(model, opt, DEV, save_at, total)
    assert losses == ref_losses
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]), f"{k} differs after a same-device resume at step {save_at}"
    assert opt.phase == "embedded" and opt.cycle == 1


# Cross-device: the device's checkpoint at save_at, 3 steps on the CPU, a CPU checkpoint, 3 steps
# back on the device. Save at 3: the first switch (step 5) happens on the CPU; save at 7: the
# return to full training (step 9) happens on the CPU.
@pytest.mark.parametrize("save_at", [3, 7])
def test_resume_device_cpu_device(deterministic, save_at):
    cpu = torch.device("cpu")
    stop = save_at + 6
    model, opt = mlp_run(DEV)
    ref_losses = mlp_steps(model, opt, DEV, 0, stop)
    ref_labels = [lab.clone().cpu() for lab in opt.space.labels] if opt.space is not None else None
    ref = {k: v.clone() for k, v in model.state_dict().items()}

    model, opt = mlp_run(DEV)
    losses = mlp_steps(model, opt, DEV, 0, save_at)
    blob = save(model, opt)
    del model, opt

    model, opt = resume(blob, cpu)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert space_devices(opt) <= {"cpu"} and state_devices(opt) <= {"cpu"}, (space_devices(opt), state_devices(opt))
    losses += mlp_steps(model, opt, cpu, save_at, save_at + 3)
    assert space_devices(opt) <= {"cpu"}
    blob = save(model, opt)
    del model, opt

    model, opt = resume(blob, DEV)
    assert space_devices(opt) <= {DEV.type} and state_devices(opt) <= {DEV.type}, (space_devices(opt),
                                                                                    state_devices(opt))
    losses += mlp_steps(model, opt, DEV, save_at + 3, stop)
    assert opt.phase == ("embedded" if save_at == 3 else "warmup")
    if ref_labels is not None:
        for lab, ref_lab in zip(opt.space.labels, ref_labels):
            assert torch.equal(lab.cpu().to(torch.int64), ref_lab.to(torch.int64)), \
                "the modes found after the CPU leg differ from the uninterrupted run's"
    if not ON_CUDA:  # one device: bit for bit
        assert losses == ref_losses
        for k, v in model.state_dict().items():
            assert torch.equal(v, ref[k]), k
    else:  # CPU arithmetic in between: equal to float32 rounding
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-4, atol=1e-5)
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, ref[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


# --------------------------------------------------------------------------- determinism of the reduction
def test_mode_gradient_bit_reproducible(deterministic):
    """Two identical backward passes give bit-identical dL/dr (no atomics-order dependence)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 1024), nn.Tanh(), nn.Linear(1024, 1024), nn.Tanh(), nn.Linear(1024, 8)).to(DEV)
    base = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    opt = modeopt.CMDOptimizer(model, base, n_modes=M, warmup_steps=WARMUP, snapshot_every=EVERY, n_samples=30 * M,
                               seed=0, progress=False, exclude=lambda n, p: p.ndim < 2)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(64, 256, generator=g).to(DEV), torch.randint(0, 8, (64,), generator=g).to(DEV)
    for _ in range(WARMUP):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert opt.phase == "embedded"
    grads = []
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        grads.append(torch.cat([r.grad.detach().clone().reshape(-1) for r in opt.space.r_params]))
        assert_on_device(grads[-1], "dL/dr")
    assert torch.isfinite(grads[0]).all() and grads[0].abs().sum() > 0
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2]), grads


# --------------------------------------------------------------------------- torch.compile
def test_compile_fullgraph_embedded_mlp(deterministic):
    """``torch.compile(model, fullgraph=True)`` of an embedded MLP: a training step matches eager."""
    runs = []
    for _ in range(2):
        model, opt = mlp_run(DEV)
        mlp_steps(model, opt, DEV, 0, WARMUP + 1)
        assert opt.phase == "embedded"
        runs.append((model, opt))
    (eager, opt_e), (model_c, opt_c) = runs
    compiled = torch.compile(model_c, fullgraph=True)
    x, y = mlp_batch(50, DEV)
    for _ in range(2):
        results = []
        for m, o in ((eager, opt_e), (compiled, opt_c)):
            o.zero_grad(set_to_none=True)
            loss = F.cross_entropy(m(x), y)
            loss.backward()
            g = torch.cat([r.grad.detach().reshape(-1) for r in o.space.r_params])
            o.step()
            results.append((loss.detach(), g))
        (le, ge), (lc, gc) = results
        torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-5)
        for (k, ve), vc in zip(eager.state_dict().items(), model_c.state_dict().values()):
            torch.testing.assert_close(vc, ve, rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


# --------------------------------------------------------------------------- CUDA memory
@cuda_only
def test_cuda_memory_embedded_below_plain_adamw():
    """Steady state between steps: plain AdamW holds weights + 2 moments (12 B/weight; grads freed
    with set_to_none); the embedded phase holds weights + a + labels (9 B/weight) + a scratch."""
    width, depth = 2048, 8
    x = torch.randn(64, width, device=DEV)
    y = torch.randint(0, 10, (64,), device=DEV)

    def build():
        torch.manual_seed(0)
        layers = []
        for _ in range(depth):
            layers += [nn.Linear(width, width, bias=False), nn.Tanh()]
        return nn.Sequential(*layers, nn.Linear(width, 10)).to(DEV)

    def step(model, opt):
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base_mem = torch.cuda.memory_allocated()
    model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    for _ in range(3):
        step(model, opt)
    torch.cuda.synchronize()
    plain = torch.cuda.memory_allocated() - base_mem
    del model, opt
    torch.cuda.empty_cache()

    base_mem = torch.cuda.memory_allocated()
    model = build()
    opt = modeopt.CMDOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True), n_modes=M,
                               warmup_steps=WARMUP, snapshot_every=EVERY, n_samples=30 * M, seed=0, progress=False,
                               exclude=lambda n, p: p.ndim < 2)
    for _ in range(WARMUP + 3):
        step(model, opt)
    assert opt.phase == "embedded"
    torch.cuda.synchronize()
    embedded = torch.cuda.memory_allocated() - base_mem
    n = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert embedded <= 0.85 * plain, (f"embedded-phase memory {embedded / 2**20:.1f} MiB vs plain AdamW "
                                      f"{plain / 2**20:.1f} MiB ({embedded / plain:.2f}x), {n:,} embedded weights")
