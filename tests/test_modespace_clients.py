"""What other code sees of a model in mode space (issue #15, items 2, 3 and 6).

* Nothing that pairs parameters by position (``AveragedModel`` built before the switch) or reads
  the first one (HF ``model.dtype``) is broken by the switch: the mode scalars come after every
  original parameter in ``model.parameters()``.
* ``torch.save(model)`` / ``torch.load`` and ``copy.deepcopy`` of a model in mode space work, and
  the copy computes the same function with its own, independent mode space.
* Labels outside ``[0, M)`` are refused with a ``ValueError`` when a ``ModeSpace`` is built.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import modeopt
from modeopt.modespace.space import ModeSpace
from workloads import SmallCNN


def _data(n=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g).to(dtype), torch.randint(0, 10, (n,), generator=g)


def _step(model, opt, seed, dtype=torch.float32):
    x, y = _data(seed=seed, dtype=dtype)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x).float(), y).backward()
    opt.step()


def _embedded(warmup=4, **kw):
    torch.manual_seed(0)
    model = SmallCNN(width=4)
    opt = modeopt.CMDOptimizer(model, torch.optim.Adam(model.parameters(), lr=1e-2), n_modes=3,
                               warmup_steps=warmup, snapshot_every=1, n_samples=60, seed=0, progress=False, **kw)
    return model, opt


def test_mode_scalars_come_after_every_original_parameter():
    model, opt = _embedded()
    names = [n for n, _ in model.named_parameters()]
    first = next(model.parameters())
    for s in range(5):
        _step(model, opt, s)
    assert opt.phase == "embedded"
    assert next(model.parameters()) is first is model.conv1.weight
    assert [n for n, _ in model.named_parameters()] == names + ["fc2.modeopt_r0"]
    assert opt.space.r_qualified_names == ["fc2.modeopt_r0"] and opt.space.r_owner is model.fc2
    assert list(model.state_dict()) == names  # r never in the checkpoint
    # strict loads, into the model and into the module that holds r
    model.load_state_dict(model.state_dict())
    model.fc2.load_state_dict(model.fc2.state_dict())
    # the r scalars still reach what iterates model.parameters(): zero_grad and gradient clipping
    x, y = _data()
    nn.functional.cross_entropy(model(x), y).backward()
    r = opt.space.r_params[0]
    assert r.grad is not None and float(r.grad.abs().sum()) > 0
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-6)
    assert float(norm) > 0 and float(r.grad.norm()) <= 1.01e-6
    model.zero_grad()
    assert r.grad is None
    opt.export()
    assert [n for n, _ in model.named_parameters()] == names


def test_averaged_model_built_before_the_switch_is_updated_through_it():
    model, opt = _embedded()
    swa = torch.optim.swa_utils.AveragedModel(model)
    seen = []
    for s in range(7):
        _step(model, opt, s)
        swa.update_parameters(model)
        seen.append([p.detach().clone() for p in list(model.parameters())[:8]])
    assert opt.phase == "embedded" and len(list(model.parameters())) == 9  # 8 originals + r
    want = [torch.stack([step[j] for step in seen]).mean(0) for j in range(8)]
    for got, exp in zip(swa.module.parameters(), want, strict=True):
        torch.testing.assert_close(got, exp, rtol=0, atol=1e-6)
    assert int(swa.n_averaged) == 7


def test_bf16_model_keeps_its_first_parameter_dtype_and_float32_r():
    torch.manual_seed(0)
    model = SmallCNN(width=4).to(torch.bfloat16)
    opt = modeopt.CMDOptimizer(model, torch.optim.Adam(model.parameters(), lr=1e-2), n_modes=3, warmup_steps=4,
                               snapshot_every=1, n_samples=60, seed=0, progress=False)
    for s in range(6):
        _step(model, opt, s, dtype=torch.bfloat16)
    assert opt.phase == "embedded"
    # what HF's model.dtype reads: the first (floating-point) parameter
    assert next(model.parameters()).dtype == torch.bfloat16
    assert next(p for p in model.parameters() if p.is_floating_point()).dtype == torch.bfloat16
    # r stays float32: the only trained state, like an fp32 master copy (bf16 cannot resolve lr-sized steps)
    r = opt.space.r_params[0]
    assert r.dtype == torch.float32
    before = r.detach().clone()
    _step(model, opt, 99, dtype=torch.bfloat16)
    assert float((r.detach() - before).abs().max()) > 0


def test_hf_model_dtype_after_the_switch():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=2)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).to(torch.bfloat16)
    opt = modeopt.CMDOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-3), n_modes=2, warmup_steps=3,
                               snapshot_every=1, n_samples=60, seed=0, progress=False)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        ids = torch.randint(0, 50, (4, 8), generator=g)
        opt.zero_grad()
        model(input_ids=ids, labels=torch.randint(0, 2, (4,), generator=g)).loss.backward()
        opt.step()
    assert opt.phase == "embedded"
    assert model.dtype == torch.bfloat16
    assert [n for n, _ in model.named_parameters()][-1] == opt.space.r_qualified_names[-1]


def _check_copy(model, opt, clone):
    """``clone`` computes what ``model`` does and has its own mode space."""
    x, y = _data(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)
    assert list(clone.state_dict()) == list(model.state_dict())
    hooks = [h for h in clone._forward_pre_hooks.values()]
    space = hooks[0].__self__
    assert isinstance(space, ModeSpace) and space is not opt.space and space.model is clone
    assert space.params[0] is clone.conv1.weight and space.r_params[0] is clone.fc2.modeopt_r0
    # gradients reach the clone's r, not the original's
    nn.functional.cross_entropy(clone(x), y).backward()
    assert float(space.r_params[0].grad.abs().sum()) > 0 and opt.space.r_params[0].grad is None
    # its r moves its own weights
    w0 = model.conv1.weight.detach().clone()
    with torch.no_grad():
        space.r_params[0].add_(0.1)
    assert space.sync() and not torch.equal(clone.conv1.weight, w0)
    assert torch.equal(model.conv1.weight, w0)


def test_whole_model_pickles_in_the_embedded_phase():
    model, opt = _embedded()
    for s in range(6):
        _step(model, opt, s)
    assert opt.phase == "embedded"
    opt.zero_grad()
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    _check_copy(model, opt, loaded)


def test_whole_model_deepcopies_in_the_embedded_phase():
    model, opt = _embedded()
    for s in range(6):
        _step(model, opt, s)
    opt.zero_grad()
    _check_copy(model, opt, copy.deepcopy(model))


def _space_args(model, labels):
    params = [("fc1.weight", model.fc1.weight)]
    a = [torch.ones(model.fc1.weight.numel())]
    return model, params, labels, a, torch.zeros(3, dtype=torch.int64), torch.zeros(3)


@pytest.mark.parametrize("bad, match", [(3, "mode label 3, but there are only 3 modes"),
                                        (300, "mode label 300"),  # would wrap to 44 as uint8
                                        (-1, "negative mode label")])
def test_mode_space_refuses_out_of_range_labels(bad, match):
    model = SmallCNN(width=4)
    lab = torch.zeros(model.fc1.weight.numel(), dtype=torch.int64)
    lab[7] = bad
    with pytest.raises(ValueError, match=match):
        ModeSpace(*_space_args(model, [lab]))
    assert not any("modeopt_r" in n for n, _ in model.named_parameters())  # nothing installed
    with pytest.raises(ValueError, match="fc1.weight has 4096 elements but 5 labels"):
        ModeSpace(*_space_args(model, [torch.zeros(5, dtype=torch.int64)]))
