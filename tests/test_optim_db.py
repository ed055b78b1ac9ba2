"""torch's own optimizer test inputs (``optim_db``) through the switch to mode space and a resume.

Each ``OptimizerInfo`` of ``torch.testing._internal.common_optimizers.optim_db`` gives an optimizer
class and its ``OptimizerInput`` configurations (``kwargs``, ``desc``). For every configuration:
train a small MLP through the switch, checkpoint model + optimizer in the middle of the embedded
phase (``torch.save`` / ``torch.load(weights_only=True)``), resume in a fresh model and optimizer,
and require the resumed run to equal the uninterrupted one bit for bit; ``r`` must have moved and
the loss must stay finite.

Not applicable, so expected to be *refused at construction* with a message that says what to do:

* ``Muon`` (updates only 2-D matrices; the mode scalars ``r`` are a vector);
* ``SparseAdam`` (``only_supports_sparse_grads``: ``r``'s gradient is dense).

``LBFGS`` (``step_requires_closure``) is driven with a closure, with ``max_iter=3`` unless the input
sets it (at torch's default of 20 inner iterations and ``lr=1`` this tiny problem either converges
inside one step or diverges, and r then has nothing left to do). Inputs with ``maximize=True`` are
given ``-loss`` to maximize (ascending the loss itself diverges: nothing to check). The inputs are plain kwargs on CPU
float32: the ``foreach`` variants run in the exhaustive (``slow``) set, ``fused``/``capturable``/
``differentiable`` are device- or autograd-specific and out of scope here.

``torch.testing._internal`` has import-time side effects (``torch.backends.disable_global_flags()``,
patched TorchScript calls) and needs ``expecttest``: it is read once in a subprocess, which prints
the configurations as JSON.

The default suite runs a representative subset: per class, the smallest set of configurations that
covers every kwarg key it uses (``maximize``, ``amsgrad``, momentum, tensor ``lr``, ...);
``-m slow`` runs every configuration, plus ``foreach=True`` where the class supports it.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modeopt import CMDOptimizer
from _small import MLP, _one_thread  # noqa: F401  (tests/ is on sys.path; the fixture is autouse)

WARMUP, EVERY, MODES = 6, 2, 3
CMD_KW = dict(n_modes=MODES, warmup_steps=WARMUP, snapshot_every=EVERY, n_samples=100, seed=0)
CUT = WARMUP + 3  # checkpoint after this many steps (mid-embedded)
TOTAL = WARMUP + 7

REFUSED = {
    "Muon": "torch.optim.Muon updates only 2-D matrices",
    "SparseAdam": "torch.optim.SparseAdam takes only sparse gradients",
}

_READ_DB = r"""
import json, sys, types, unittest
try:
    import expecttest  # noqa: F401
except ImportError:  # only its TestCase base class is needed to import torch's test helpers
    m = types.ModuleType("expecttest"); m.TestCase = unittest.TestCase; sys.modules["expecttest"] = m
import torch
from torch.testing._internal.common_optimizers import optim_db

def enc(v):
    if isinstance(v, torch.Tensor):
        return {"__tensor__": v.tolist()}
    if isinstance(v, tuple):
        return {"__tuple__": [enc(x) for x in v]}
    return v

out = []
for info in optim_db:
    for inp in info.optim_inputs_func(device="cpu"):
        assert inp.params is None, inp
        out.append({"cls": info.optim_cls.__name__, "desc": inp.desc,
                    "kwargs": {k: enc(v) for k, v in inp.kwargs.items()},
                    "closure": bool(info.step_requires_closure),
                    "sparse_only": bool(info.only_supports_sparse_grads),
                    "foreach": "foreach" in info.supported_impls})
print(json.dumps(out))
"""


def _dec(v):
    if isinstance(v, dict) and "__tensor__" in v:
        return torch.tensor(v["__tensor__"])
    if isinstance(v, dict) and "__tuple__" in v:
        return tuple(_dec(x) for x in v["__tuple__"])
    return v


def _read_optim_db() -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _READ_DB], capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"reading torch's optim_db failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _subset(configs: list[dict]) -> set[tuple[str, str]]:
    """Per class: its first configuration, then greedily the ones adding a kwarg key not yet covered."""
    chosen, covered = set(), {}
    for c in configs:
        keys = covered.setdefault(c["cls"], None)
        new = set(c["kwargs"]) - (keys or set())
        if keys is None or new:
            chosen.add((c["cls"], c["desc"]))
            covered[c["cls"]] = (keys or set()) | set(c["kwargs"])
    return chosen


CONFIGS = _read_optim_db()
DEFAULT = _subset(CONFIGS)
PARAMS = []
for _c in CONFIGS:
    marks = () if (_c["cls"], _c["desc"]) in DEFAULT else (pytest.mark.slow,)
    PARAMS.append(pytest.param(_c, False, id=f"{_c['cls']}-{_c['desc']}", marks=marks))
    if _c["foreach"] and _c["cls"] not in REFUSED:
        PARAMS.append(pytest.param(_c, True, id=f"{_c['cls']}-{_c['desc']}-foreach", marks=(pytest.mark.slow,)))


def _batch(i: int):
    """Unlearnable labels: gradients stay large, so every optimizer keeps moving r."""
    g = torch.Generator().manual_seed(30_000 + i)
    return torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)


def _build(config, foreach, init_seed=1):
    torch.manual_seed(init_seed)
    model = MLP()
    cls = getattr(torch.optim, config["cls"])
    kwargs = copy.deepcopy({k: _dec(v) for k, v in config["kwargs"].items()})
    if foreach:
        kwargs["foreach"] = True
    if config["closure"]:  # LBFGS: see the module doc
        kwargs.setdefault("max_iter", 3)
    # Muon takes only matrices: give it those (the refusal is then CMDOptimizer's, not Muon's)
    params = [p for p in model.parameters() if p.ndim == 2] if config["cls"] == "Muon" else model.parameters()
    return model, CMDOptimizer(model, cls(params, **kwargs), **CMD_KW)


def _step(model, opt, i, closure_style, sign=1.0):
    x, y = _batch(i)

    def closure():
        opt.zero_grad()
        loss = sign * F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    if closure_style:
        return opt.step(closure).detach()
    loss = closure()
    opt.step()
    return loss.detach()


def _state(model, opt):
    return ({k: v.clone() for k, v in model.state_dict().items()}, opt.space.r_full().detach().clone())


@pytest.mark.parametrize("config,foreach", PARAMS)
def test_optim_db_through_switch_and_resume(config, foreach):
    if config["cls"] in REFUSED:
        assert config["sparse_only"] == (config["cls"] == "SparseAdam")
        with pytest.raises(TypeError, match=REFUSED[config["cls"]]):
            _build(config, foreach)
        return

    closure_style = config["closure"]
    sign = -1.0 if config["kwargs"].get("maximize") else 1.0  # maximize=True: give it -loss to maximize
    model, opt = _build(config, foreach)
    losses, r_switch = [], None
    for i in range(TOTAL):
        losses.append(_step(model, opt, i, closure_style, sign))
        if i == WARMUP - 1:
            # (LBFGS's 20 inner iterations per step can leave fewer distinct modes than asked for)
            assert opt.phase == "embedded" and 1 <= opt.space.n_modes <= MODES
            assert opt.trainable_parameters() == opt.space.n_modes
            r_switch = opt.space.r_full().detach().clone()
        if i == CUT - 1:
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    final_w, final_r = _state(model, opt)
    assert opt.phase == "embedded" and opt._step == TOTAL
    assert not torch.equal(final_r, r_switch), "r did not move"
    assert all(math.isfinite(v.item()) for v in losses)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2, opt2 = _build(config, foreach, init_seed=2)  # different init: everything comes from the checkpoint
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.phase == "embedded" and opt2._step == CUT
    resumed = [_step(model2, opt2, i, closure_style, sign) for i in range(CUT, TOTAL)]
    for a, b in zip(losses[CUT:], resumed):
        assert torch.equal(a, b)
    w2, r2 = _state(model2, opt2)
    assert torch.equal(r2, final_r)
    assert list(w2) == list(final_w) and all(torch.equal(w2[k], final_w[k]) for k in w2)


def test_default_subset_is_representative():
    """Every class of optim_db is in the default run, and every kwarg key of its inputs is exercised."""
    classes = {c["cls"] for c in CONFIGS}
    assert {"SGD", "Adam", "AdamW", "LBFGS", "Muon", "SparseAdam"} <= classes
    assert {cls for cls, _ in DEFAULT} == classes
    for cls in classes:
        keys = set().union(*(set(c["kwargs"]) for c in CONFIGS if c["cls"] == cls))
        got = set().union(*(set(c["kwargs"]) for c in CONFIGS if (c["cls"], c["desc"]) in DEFAULT and c["cls"] == cls))
        assert got == keys, cls
    assert len(DEFAULT) < len(CONFIGS)
