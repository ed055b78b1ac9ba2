"""The processes of tests/test_fsdp.py: CMDOptimizer on an FSDP2 (``fully_shard``) MLP, gloo on CPU.

Launched by ``modeopt.distributed.launch_local``. Each scenario returns plain values and tensors;
a rank writes all of them to ``<out>/rank<r>.pt``; a scenario that raises stores its traceback.
The single-process references (:func:`reference`) run in the test process itself.
"""

from __future__ import annotations

import os
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import modeopt
from modeopt.sharding import count_collectives

GLOBAL_BATCH = 48
CFG = dict(n_modes=4, warmup_steps=30, snapshot_every=3, n_samples=200, seed=1234)
EMBEDDED_STEPS = 20


def make_model() -> nn.Module:
    """Odd layer widths: the FSDP2 shards are uneven on 2 and 4 ranks."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 33), nn.Tanh(), nn.Linear(33, 17), nn.Tanh(), nn.Linear(17, 5))


def batches(seed: int = 0):
    """The same global batches everywhere (a fixed teacher's labels)."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(20, 5, generator=g)
    while True:
        x = torch.randn(GLOBAL_BATCH, 20, generator=g)
        yield x, (x @ teacher).argmax(dim=1)


def shard(model: nn.Module, world: int) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


#: per kind, CMDOptimizer options beyond CFG ("excl": biases kept out of the embedding, moved to the CMD fit)
EXTRA = {"excl": dict(exclude=lambda name, p: p.ndim < 2, init="fit"), "bf16": dict(coef_dtype=torch.bfloat16)}


def base_of(model: nn.Module, kind: str) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)


def full_weights(model: nn.Module) -> dict:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


def train(model, opt, data, steps: int, rank: int, world: int, log: list | None = None, micro: int = 1,
          recording: list | None = None) -> list[float]:
    """``steps`` steps on this rank's slice of each global batch (in ``micro`` accumulated micro-batches);
    ``log`` gets the bytes per step, ``recording`` the recording's bytes before each step."""
    losses = []
    per = GLOBAL_BATCH // world
    for _ in range(steps):
        x, y = next(data)
        x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        phase = opt.phase
        if recording is not None:
            recording.append(opt.recording_bytes)
        with count_collectives() as c:
            opt.zero_grad()
            for xm, ym in zip(x.chunk(micro), y.chunk(micro)):
                loss = F.cross_entropy(model(xm), ym) / micro
                loss.backward()
            opt.step()
        if log is not None:
            log.append({"phase": phase, "bytes": dict(c.bytes), "calls": dict(c.calls)})
        losses.append(float(loss.detach()))
    return losses


def scenario_train(rank: int, world: int, kind: str, micro: int = 1) -> dict:
    """Warm-up, switch, embedded steps (``micro`` accumulated micro-batches per step); what the tests compare."""
    model = shard(make_model(), world)
    opt = modeopt.CMDOptimizer(model, base_of(model, kind), progress=False, **CFG, **EXTRA.get(kind, {}))
    data = batches()
    log, recording = [], []
    losses = train(model, opt, data, CFG["warmup_steps"] + EMBEDDED_STEPS, rank, world, log, micro, recording)
    return {"type": type(opt).__name__, "phase": opt.phase, "weights": full_weights(model), "r": opt.r_full(),
            "losses": losses, "log": log, "history": opt.history, "state_bytes": opt.state_bytes(),
            "n_local": opt.shards.n_local, "n_global": opt.shards.n_global,
            "local_labels": torch.cat([s.to(torch.int64) for s in opt.space["labels"]]),
            "segments": opt.shards.segments(opt.shards.rank),
            "trainable": opt.trainable_parameters(), "recording_bytes": recording}


def scenario_checkpoint(rank: int, world: int, out_dir: str, at: int, tag: str, kind: str = "adamw") -> dict:
    """Train ``at`` steps, save with DCP, train on; then resume a fresh run from the checkpoint and train on."""
    from modeopt import sharded_checkpoint

    path = os.path.join(out_dir, f"ckpt-{tag}")
    model = shard(make_model(), world)
    opt = modeopt.CMDOptimizer(model, base_of(model, kind), progress=False, **CFG)
    data = batches()
    train(model, opt, data, at, rank, world)
    sharded_checkpoint.save(path, model, opt)
    saved_phase = opt.phase
    rest = CFG["warmup_steps"] + 10 - at
    train(model, opt, data, rest, rank, world)
    straight = full_weights(model)

    model2 = shard(make_model(), world)
    with torch.no_grad():  # start from other weights: everything must come from the checkpoint
        for p in model2.parameters():
            p.add_(1.0)
    opt2 = modeopt.CMDOptimizer(model2, base_of(model2, kind), progress=False, **CFG)
    sharded_checkpoint.load(path, model2, opt2)
    loaded = {"phase": opt2.phase, "step": opt2.step_count, "weights": full_weights(model2)}
    data2 = batches()
    for _ in range(at):
        next(data2)
    train(model2, opt2, data2, rest, rank, world)
    return {"saved_phase": saved_phase, "loaded": loaded, "straight": straight, "resumed": full_weights(model2),
            "path": path}


def scenario_save_only(rank: int, world: int, out_dir: str, at: int, tag: str) -> dict:
    """Train ``at`` steps and save (resumed on another world size by :func:`scenario_resume_elsewhere`)."""
    from modeopt import sharded_checkpoint

    model = shard(make_model(), world)
    opt = modeopt.CMDOptimizer(model, base_of(model, "adamw"), progress=False, **CFG)
    data = batches()
    train(model, opt, data, at, rank, world)
    sharded_checkpoint.save(os.path.join(out_dir, f"ckpt-{tag}"), model, opt)
    train(model, opt, data, CFG["warmup_steps"] + 10 - at, rank, world)
    return {"phase": opt.phase, "weights": full_weights(model), "r": opt.r_full()}


def scenario_resume_elsewhere(rank: int, world: int, out_dir: str, at: int, tag: str) -> dict:
    from modeopt import sharded_checkpoint

    model = shard(make_model(), world)
    opt = modeopt.CMDOptimizer(model, base_of(model, "adamw"), progress=False, **CFG)
    sharded_checkpoint.load(os.path.join(out_dir, f"ckpt-{tag}"), model, opt)
    data = batches()
    for _ in range(at):
        next(data)
    loaded_phase = opt.phase
    train(model, opt, data, CFG["warmup_steps"] + 10 - at, rank, world)
    return {"loaded_phase": loaded_phase, "phase": opt.phase, "weights": full_weights(model), "r": opt.r_full()}


def scenario_refusals(rank: int, world: int) -> dict:
    """What the FSDP2 path refuses, with a reason."""
    errors = {}
    model = shard(make_model(), world)
    try:
        modeopt.CMDOptimizer(model, base_of(model, "sgd"), recluster_every=10, **CFG)
    except ValueError as e:
        errors["recluster"] = str(e)
    try:
        modeopt.OnlineCMD(model, n_modes=2, fit_at=6)
    except TypeError as e:
        errors["online"] = str(e)
    plain = make_model()
    opt = modeopt.CMDOptimizer(plain, base_of(plain, "sgd"), **CFG)
    shard(plain, world)
    try:
        modeopt.parallel_wrappers.check_supported(opt.model)
    except TypeError as e:
        errors["sharded_later"] = str(e)
    return {"errors": errors}


def scenario_callback(rank: int, world: int) -> dict:
    """modeopt.integrations.hf.CMDCallback(**options) wrapping the optimizer inside Accelerate's own
    AcceleratedOptimizer on an FSDP2 model, as it does inside the Trainer after accelerator.prepare (the
    Trainer itself cannot run FSDP on CPU: Accelerate drops the FSDP plugin there, docs/scaling-out.md)."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from modeopt.integrations.hf import CMDCallback, find_cmd_optimizer

    model = shard(make_model(), world)
    acc = Accelerator(cpu=True).prepare_optimizer(base_of(model, "adamw"), device_placement=False)
    sched = torch.optim.lr_scheduler.LambdaLR(acc, lambda step: 1.0)
    cb = CMDCallback(progress=False, **CFG)
    cb.on_train_begin(SimpleNamespace(world_size=world), None, None, optimizer=acc, model=model)
    opt = find_cmd_optimizer(acc)
    per = GLOBAL_BATCH // world
    data = batches()
    for _ in range(CFG["warmup_steps"] + EMBEDDED_STEPS):
        x, y = next(data)
        acc.zero_grad()
        F.cross_entropy(model(x[rank * per:(rank + 1) * per]), y[rank * per:(rank + 1) * per]).backward()
        acc.step()
        sched.step()
    return {"type": type(opt).__name__, "phase": opt.phase, "weights": full_weights(model), "r": opt.r_full(),
            "wrapper": type(acc).__name__}


def run(rank: int, world: int, out_dir: str, scenarios: list[tuple]) -> None:
    """Entry of each rank: ``scenarios`` are ``(name, function name, extra args)``."""
    results: dict[str, dict] = {}
    try:
        for name, fn, args in scenarios:
            t0 = time.perf_counter()
            try:
                results[name] = globals()[fn](rank, world, *args)
            except Exception:  # noqa: BLE001 - reported by the test that reads this scenario
                results[name] = {"error": traceback.format_exc()}
            results[name]["seconds"] = time.perf_counter() - t0
            dist.barrier()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def reference(kind: str) -> dict:
    """The same training in one process without FSDP (plain CMDOptimizer, the whole global batch)."""
    model = make_model()
    opt = modeopt.CMDOptimizer(model, base_of(model, kind), progress=False, **CFG, **EXTRA.get(kind, {}))
    losses = train(model, opt, batches(), CFG["warmup_steps"] + EMBEDDED_STEPS, 0, 1)
    return {"weights": full_weights(model), "r": opt.space.r_full().detach().clone(),
            "labels": torch.cat(opt.space.mode_index()), "losses": losses, "history": opt.history}
