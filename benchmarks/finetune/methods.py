"""The fine-tuning recipes, a small registry: a new recipe is one decorated function.

A recipe gets the freshly loaded model (every weight trainable, as loaded), its learning rate and
the run's :class:`Spec`, and returns a :class:`Setup`: the model to train (possibly wrapped), the
optimizer to step (an LR scheduler is put on it) and optionally ``on_step`` (called after every
step, e.g. to note an optimizer's state) and ``info`` (extra fields of the run's record).

What is "trainable" is measured, not declared: after every step the run counts the parameters of
the model that require grad (mode scalars included), so a recipe must leave ``requires_grad`` set
exactly on what its optimizer trains at that step.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Spec:
    total_steps: int
    steps_per_epoch: int
    seed: int
    weight_decay: float = 0.01


@dataclass
class Setup:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    on_step: Callable[[int], None] | None = None
    info: Callable[[], dict] = field(default=lambda: {})


@dataclass
class Method:
    name: str
    label: str
    grid: tuple[float, ...]
    build: Callable[[nn.Module, float, Spec], Setup]
    notes: str = ""


METHODS: dict[str, Method] = {}


def method(name: str, label: str, grid: tuple[float, ...], notes: str = ""):
    def register(build):
        METHODS[name] = Method(name, label, tuple(grid), build, notes)
        return build
    return register


def _adamw(params, lr: float, spec: Spec) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=lr, weight_decay=spec.weight_decay)


HEAD = "classifier."  # the fresh classification head of BertForSequenceClassification
N_LAYERS = 6


@method("full", "full fine-tune (AdamW, every weight)", (1e-5, 3e-5, 1e-4))
def full(model, lr, spec):
    return Setup(model, _adamw(model.parameters(), lr, spec))


@method("lora", "LoRA r = 8, alpha 16, query + value, head trained (peft)", (1e-4, 3e-4, 1e-3),
        "peft LoraConfig(r=8, lora_alpha=16, target_modules=[query, value], lora_dropout=0, "
        "modules_to_save=[classifier]); AdamW on the adapters and the head")
def lora(model, lr, spec):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0,
                     modules_to_save=["classifier"])
    model = get_peft_model(model, cfg)
    return Setup(model, _adamw([p for p in model.parameters() if p.requires_grad], lr, spec))


@method("bitfit", "BitFit: biases + LayerNorms + head (AdamW)", (3e-4, 1e-3, 3e-3))
def bitfit(model, lr, spec):
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith(".bias") or ".LayerNorm." in n or n.startswith(HEAD))
    return Setup(model, _adamw([p for p in model.parameters() if p.requires_grad], lr, spec))


BADAM_SWITCH_EVERY = 4


@method("badam", "BAdam (published `badam` 1.4 BlockOptimizer around AdamW), blocks = the 6 encoder layers",
        (1e-5, 3e-5, 1e-4),
        f"badam.BlockOptimizer(AdamW, block_prefix_list=[[bert.encoder.layer.i.] for i in 0..5], "
        f"switch_mode='random', switch_block_every={BADAM_SWITCH_EVERY}, "
        "active_modules=[bert.pooler., classifier.]); the embeddings are in no block (the package's "
        "default, include_embedding=False), so they stay frozen")
def badam(model, lr, spec):
    from badam import BlockOptimizer

    blocks = [[f"bert.encoder.layer.{i}."] for i in range(N_LAYERS)]
    base = _adamw(model.parameters(), lr, spec)
    with warnings.catch_warnings():  # "BAdam expect model to be loaded in fp16/bf16": fp32 on purpose (CPU)
        warnings.simplefilter("ignore")
        opt = BlockOptimizer(base, list(model.named_parameters()), block_prefix_list=blocks,
                             switch_block_every=BADAM_SWITCH_EVERY, switch_mode="random",
                             active_modules=["bert.pooler.", HEAD], verbose=0)
    return Setup(model, opt)


def _cmd(model, lr, spec, **dtypes):
    import modeopt

    warm = max(3, spec.total_steps // 4)
    every = 2 if warm >= 8 else 1
    base = _adamw(model.parameters(), lr, spec)
    opt = modeopt.CMDOptimizer(model, base, n_modes=10, warmup_steps=warm, snapshot_every=every, n_samples=1000,
                               seed=spec.seed, exclude=lambda n, p: p.ndim < 2 or n.startswith(HEAD),
                               progress=False, **dtypes)
    seen = {"recording_bytes": 0, "switch_step": None}

    def on_step(step: int) -> None:
        seen["recording_bytes"] = max(seen["recording_bytes"], int(opt.recording_bytes))
        if seen["switch_step"] is None and opt.phase == "embedded":
            seen["switch_step"] = step

    def info() -> dict:
        return {"warmup_steps": warm, "snapshot_every": every, "phase": opt.phase, **seen,
                "n_modes": int(opt.space.n_modes) if opt.phase == "embedded" else None}

    return Setup(model, opt, on_step, info)


CMD_NOTES = ("modeopt.CMDOptimizer(AdamW, n_modes=10, warmup_steps=budget/4, snapshot_every=2, n_samples=1000, "
             "exclude = 1-D tensors (biases, LayerNorms) and the head, as in docs/evidence.md)")


@method("cmd", "CMD (modeopt.CMDOptimizer): AdamW warm-up 1/4 of the budget, then M = 10 modes; biases, norms, head free",
        (1e-5, 3e-5, 1e-4), CMD_NOTES)
def cmd(model, lr, spec):
    return _cmd(model, lr, spec)


@method("cmd_bf16", "CMD as above, coef_dtype and record_dtype bfloat16", (1e-5, 3e-5, 1e-4),
        CMD_NOTES + " with coef_dtype=record_dtype=torch.bfloat16")
def cmd_bf16(model, lr, spec):
    return _cmd(model, lr, spec, coef_dtype=torch.bfloat16, record_dtype=torch.bfloat16)


def _blockwise(model, lr, spec, *, top_down: bool, coef_dtype=torch.bfloat16):
    import modeopt
    from modeopt.blockwise.optimizer import find_blocks

    blocks = find_blocks(model)  # bert.encoder.layer.0. ... .5.
    if top_down:
        blocks = blocks[::-1]
    per_block = max(3, spec.total_steps // len(blocks))
    every = 2 if per_block >= 6 else 1
    opt = modeopt.BlockwiseCMD(model, _adamw(model.parameters(), lr, spec), blocks, steps_per_block=per_block,
                               n_modes=10, snapshot_every=every, train_always=["bert.pooler.", HEAD], n_samples=300,
                               seed=spec.seed, coef_dtype=coef_dtype)  # bf16: the recorded results
    seen = {"recording_bytes": 0}

    def on_step(step: int) -> None:
        seen["recording_bytes"] = max(seen["recording_bytes"], int(opt.recording_bytes))

    def info() -> dict:
        return {"steps_per_block": per_block, "snapshot_every": every, "phase": opt.phase, **seen,
                "blocks": [h["block"] for h in opt.history], "embedded_at": [h["step"] for h in opt.history]}

    return Setup(model, opt, on_step, info)


BLOCKWISE_NOTES = ("modeopt.BlockwiseCMD(AdamW, blocks = the 6 encoder layers, steps_per_block = budget/6, n_modes=10 "
                   "per block, n_samples=300, snapshot_every=2, record and coef dtype bf16, train_always=[bert.pooler., classifier.], "
                   "a block's biases and LayerNorms trained from its first step on, word/position embeddings frozen)")


@method("blockwise", "Blockwise CMD (modeopt.BlockwiseCMD): one encoder layer at a time by AdamW, bottom up, each "
        "then moving in its own 10 modes; head trained, embeddings frozen", (3e-4, 1e-3, 3e-3), BLOCKWISE_NOTES)
def blockwise(model, lr, spec):
    return _blockwise(model, lr, spec, top_down=False)


@method("blockwise_td", "Blockwise CMD as above, top layer first", (3e-4, 1e-3, 3e-3), BLOCKWISE_NOTES + ", order 5..0")
def blockwise_td(model, lr, spec):
    return _blockwise(model, lr, spec, top_down=True)


@method("blockwise_td_q8", "Blockwise CMD top layer first, coef_dtype int8 (8-bit a, 4-bit labels: 1.5 B per weight)",
        (3e-4, 1e-3, 3e-3), BLOCKWISE_NOTES + ", order 5..0, coef_dtype=torch.int8")
def blockwise_td_q8(model, lr, spec):
    return _blockwise(model, lr, spec, top_down=True, coef_dtype=torch.int8)


def _checkpointed(build):
    """The same recipe with activation checkpointing (HF ``gradient_checkpointing_enable``, non-reentrant):
    each encoder layer's activations are recomputed in the backward pass instead of kept."""
    def wrapped(model, lr, spec):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return build(model, lr, spec)
    return wrapped


method("lora_ckpt", "LoRA as above, with activation checkpointing", (1e-3, 3e-3, 1e-2),
       "lora + model.gradient_checkpointing_enable(use_reentrant=False)")(_checkpointed(lora))
method("blockwise_td_ckpt", "Blockwise CMD top first, with activation checkpointing", (3e-4, 1e-3, 3e-3),
       BLOCKWISE_NOTES + ", order 5..0, + model.gradient_checkpointing_enable(use_reentrant=False)")(
    _checkpointed(blockwise_td))
method("full_ckpt", "full fine-tune, with activation checkpointing", (3e-5, 1e-4, 3e-4),
       "full + model.gradient_checkpointing_enable(use_reentrant=False)")(_checkpointed(full))
