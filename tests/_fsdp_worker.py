"""The processes of tests/test_fsdp.py: CMDOptimizer on an FSDP2 (``fully_shard``) MLP, gloo on CPU.

Launched by ``modeopt.distributed.ddp.launch_local``. Each scenario returns plain values and tensors;
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
from modeopt.distributed.sharding import count_collectives

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


def shard(model: nn.Module, world: int, per_layer: bool = True) -> nn.Module:
    """Each Linear its own FSDP unit, then the root (``per_layer=False``: the root alone, one all-gather a step)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear) and per_layer:
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
    from modeopt.cmd_optimizer import sharded_checkpoint

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
    from modeopt.cmd_optimizer import sharded_checkpoint

    model = shard(make_model(), world)
    opt = modeopt.CMDOptimizer(model, base_of(model, "adamw"), progress=False, **CFG)
    data = batches()
    train(model, opt, data, at, rank, world)
    sharded_checkpoint.save(os.path.join(out_dir, f"ckpt-{tag}"), model, opt)
    train(model, opt, data, CFG["warmup_steps"] + 10 - at, rank, world)
    return {"phase": opt.phase, "weights": full_weights(model), "r": opt.r_full()}


def scenario_resume_elsewhere(rank: int, world: int, out_dir: str, at: int, tag: str) -> dict:
    from modeopt.cmd_optimizer import sharded_checkpoint

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
        modeopt.OnlineCMDOptimizer(model, base_of(model, "sgd"), n_modes=2, fit_at=6)
    except TypeError as e:
        errors["online_optimizer"] = str(e)
    plain = make_model()
    opt = modeopt.CMDOptimizer(plain, base_of(plain, "sgd"), **CFG)
    shard(plain, world)
    try:
        modeopt.distributed.wrappers.check_supported(opt.model)
    except TypeError as e:
        errors["sharded_later"] = str(e)
    return {"errors": errors}


def _local_batch(data, rank: int, world: int):
    x, y = next(data)
    per = GLOBAL_BATCH // world
    return x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]


def _attempt(fn) -> str | None:
    try:
        fn()
        return None
    except Exception as e:  # noqa: BLE001 - the test checks type and message
        return f"{type(e).__name__}: {e}"


def scenario_hostile(rank: int, world: int, out_dir: str) -> dict:
    """ShardedCMDOptimizer under hostile use (issue 26): a NaN loss on one rank in mode space; NaN in one
    rank's recording at the switch; damaged checkpoints (NaN in r, in r's base state, in one rank's shard
    of a, labels out of range on one rank). Every rank must reach the same decision (no rank may hang)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    from modeopt.cmd_optimizer import sharded_checkpoint

    out: dict = {}
    model = shard(make_model(), world)
    opt = modeopt.CMDOptimizer(model, base_of(model, "adamw"), progress=False, **CFG)
    data = batches()
    train(model, opt, data, CFG["warmup_steps"] + 2, rank, world)
    before = (full_weights(model), opt.r_full(), opt.step_count)
    x, y = _local_batch(data, rank, world)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.zero_grad()
        (F.cross_entropy(model(x), y) * (float("nan") if rank == 0 else 1.0)).backward()
        returned = opt.step()
    weights = full_weights(model)
    out["skip"] = {"warnings": [str(w.message) for w in caught], "returned": returned,
                   "unchanged": all(torch.equal(weights[k], before[0][k]) for k in weights)
                   and torch.equal(opt.r_full(), before[1]) and opt.step_count == before[2],
                   "skipped": getattr(opt, "skipped_steps", None)}
    losses = train(model, opt, data, 3, rank, world)
    out["skip"]["finite_after"] = all(torch.isfinite(torch.tensor(losses))) and bool(torch.isfinite(opt.r_full()).all())
    opt.max_consecutive_skips = 0  # a run of skips too long: every rank raises alike
    x, y = _local_batch(data, rank, world)
    opt.zero_grad()
    (F.cross_entropy(model(x), y) * float("nan")).backward()
    out["skip"]["stuck"] = _attempt(opt.step)
    opt.max_consecutive_skips = 10

    path = os.path.join(out_dir, "ckpt-hostile")
    sharded_checkpoint.save(path, model, opt)
    damage = {
        "r": lambda sd: sd["cmd"]["space"]["r"].__setitem__(0, float("nan")),
        "base_r": lambda sd: next(v for v in sd["base"]["state"].values()
                                  if not hasattr(v["exp_avg"], "to_local"))["exp_avg"].fill_(float("nan")),
        "a_rank0": lambda sd: rank == 0 and sd["cmd"]["space"]["a"]["0"].to_local().view(-1).__setitem__(
            0, float("nan")),
        "labels_rank1": lambda sd: rank == 1 and sd["cmd"]["space"]["labels"]["2"].to_local().view(-1).__setitem__(
            0, 99),
    }
    out["load"] = {}
    for name, edit in damage.items():
        model2 = shard(make_model(), world)
        opt2 = modeopt.CMDOptimizer(model2, base_of(model2, "adamw"), progress=False, **CFG)
        head = {"optim": {"cmd": {"meta": ""}}}
        dcp.load(head, checkpoint_id=path)
        import json

        opt2.prepare_load(json.loads(head["optim"]["cmd"]["meta"]))
        sd = {"model": model2.state_dict(), "optim": opt2.state_dict()}
        dcp.load(sd, checkpoint_id=path)
        with torch.no_grad():
            edit(sd["optim"])
        out["load"][name] = _attempt(lambda: opt2.load_state_dict(sd["optim"]))
    model3 = shard(make_model(), world)
    opt3 = modeopt.CMDOptimizer(model3, base_of(model3, "adamw"), progress=False, **CFG)
    sharded_checkpoint.load(path, model3, opt3)
    out["load"]["skipped_steps_resumed"] = getattr(opt3, "skipped_steps", None)

    model4 = shard(make_model(), world)  # NaN in one rank's recording: every rank refuses the switch
    opt4 = modeopt.CMDOptimizer(model4, base_of(model4, "adamw"), progress=False, **CFG)
    data4 = batches()
    train(model4, opt4, data4, CFG["warmup_steps"] - 1, rank, world)
    if rank == world - 1:
        opt4.recording[1, 0] = float("nan")
    out["switch"] = _attempt(lambda: train(model4, opt4, data4, 1, rank, world))
    out["switch_phase"] = opt4.phase
    return out


#: OnlineCMD settings of the shadow-model scenarios: the fit after 12 steps (4 snapshots), then a sample every 2
ONLINE = dict(n_modes=4, fit_at=12, snapshot_every=3, sample_every=2, n_samples=200, seed=1234)
ONLINE_STEPS, ONLINE_SAVE_AT = 30, (7, 20)  # steps in all; checkpoints in the recording and after the fit


def local_state(online) -> dict:
    return {k: [x.clone() for x in getattr(online, k)] for k in ("labels", "mean", "comoment")} | {
        "mode_mean": online.mode_mean.clone(), "mode_m2": online.mode_m2.clone(), "count": online.count,
        "calls": online.calls, "phase": online.phase}


#: per OnlineCMD scenario, settings beyond ONLINE ("bf16": a low-precision window kept in a ring of 3 snapshots)
ONLINE_EXTRA = {"online": {}, "online_bf16": dict(record_dtype=torch.bfloat16, max_snapshots=3)}


def scenario_online(rank: int, world: int, out_dir: str, tag: str = "online") -> dict:
    """modeopt.OnlineCMD beside an SGD training of the FSDP2 model: bytes per update(), per-rank state, the
    shadow weights (gathered); a DCP checkpoint at each ONLINE_SAVE_AT loaded into a second OnlineCMD of
    the same model, which then updates in lockstep with the first."""
    from modeopt.online import sharded as sharded_shadow

    model = shard(make_model(), world)
    opt = base_of(model, "sgd")
    cfg = {**ONLINE, **ONLINE_EXTRA[tag]}
    online = modeopt.OnlineCMD(model, **cfg)
    data, per = batches(), GLOBAL_BATCH // world
    log, resumed, loaded = [], {}, {}
    for step in range(1, ONLINE_STEPS + 1):
        x, y = next(data)
        opt.zero_grad()
        F.cross_entropy(model(x[rank * per:(rank + 1) * per]), y[rank * per:(rank + 1) * per]).backward()
        opt.step()
        phase = online.phase
        with count_collectives() as c:
            online.update()
        for other in resumed.values():
            other.update()
        log.append({"phase": phase, "bytes": dict(c.bytes), "calls": dict(c.calls), "state_bytes": online.state_bytes})
        if step in ONLINE_SAVE_AT:
            path = os.path.join(out_dir, f"{tag}-{step}")
            sharded_shadow.save(path, online)
            twin = modeopt.OnlineCMD(model, **{**cfg, "seed": 99})  # seed too comes from the checkpoint
            sharded_shadow.load(path, twin)
            loaded[step] = {"saved": local_state(online), "loaded": local_state(twin),
                            "buffer": None if online.phase == "fitted" else
                            (online._buffer.raw()[0].clone(), twin._buffer.raw()[0].clone())}
            resumed[step] = twin
    cmd = online.cmd_state_dict()
    other = shard(make_model(), world)
    other.load_state_dict(cmd)  # the DTensors load into another FSDP2 model as they are
    raw = full_weights(model)
    with online.applied():
        applied = full_weights(model)
    out = {"type": type(online).__name__, "phase": online.phase, "history": online.history,
            "cmd": {k: v.full_tensor() for k, v in cmd.items()}, "placements": {k: str(v.placements) for k, v in cmd.items()},
            "local_cmd": {k: v.to_local().clone() for k, v in cmd.items()},
            "resumed_cmd": {s: {k: v.to_local().clone() for k, v in o.cmd_state_dict().items()} for s, o in resumed.items()},
            "state": local_state(online), "resumed_state": {s: local_state(o) for s, o in resumed.items()},
            "loaded": loaded, "log": log, "state_bytes": online.state_bytes, "n_local": online.shards.n_local,
            "n_global": online.shards.n_global, "local_numels": online.shards.local_numels,
            "segments": online.shards.segments(rank), "reference_rows": online.reference_rows,
            "weights": raw, "loaded_into_other": full_weights(other), "applied": applied,
            "coefficients": [torch.cat(x) for x in online.coefficients()],
            "restored": full_weights(model)}
    out["host_sync"] = host_reads_in(online.update, 2)  # last: the other results are the run's as it was
    return out


def host_reads_in(fn, times: int) -> str | None:
    """Call ``fn`` ``times`` times with every way of reading a tensor's value on the host made to raise;
    the error, or None. Every rank calls it alike (fn may be collective)."""
    names = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def refuse(name):
        def f(*args, **kwargs):
            raise RuntimeError(f"host read: Tensor.{name}")
        return f

    try:
        for n in names:
            setattr(torch.Tensor, n, refuse(n))
        try:
            for _ in range(times):
                fn()
        except RuntimeError as e:
            return str(e)
        try:
            bool(torch.ones(()))
        except RuntimeError:
            return None  # the patch was live, and fn read nothing
        return "the patch was not live"
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def scenario_online_resume(rank: int, world: int, src_dir: str) -> dict:
    """Resume scenario_online's checkpoints on this world size: train the model to the saved step (its
    weights are not in the OnlineCMD checkpoint), load, then train and update to the end."""
    from modeopt.online import sharded as sharded_shadow

    out = {}
    for at in ONLINE_SAVE_AT:
        model = shard(make_model(), world)
        opt = base_of(model, "sgd")
        online = modeopt.OnlineCMD(model, **{**ONLINE, "seed": 99})
        data, per = batches(), GLOBAL_BATCH // world
        for step in range(1, ONLINE_STEPS + 1):
            x, y = next(data)
            opt.zero_grad()
            F.cross_entropy(model(x[rank * per:(rank + 1) * per]), y[rank * per:(rank + 1) * per]).backward()
            opt.step()
            if step == at:
                sharded_shadow.load(os.path.join(src_dir, f"online-{at}"), online)
                out[f"phase_{at}"] = online.phase
            elif step > at:
                online.update()
        out[at] = {k: v.full_tensor() for k, v in online.cmd_state_dict().items()}
        out[f"n_local_{at}"] = online.shards.n_local
    return out


def other_shards(sd: dict, rank: int) -> dict:
    """On rank 0 only, the recording of parameter 0 as another world size would shard it (one row short)."""
    if rank == 0:
        sd["record"]["0"] = sd["record"]["0"].to_local()[:, :-1].clone()
    return sd


def scenario_online_misuse(rank: int, world: int) -> dict:
    """NaN in one rank's shards while recording (every rank skips that snapshot); what is refused, with a reason."""
    import warnings

    model = shard(make_model(), world)
    online = modeopt.OnlineCMD(model, **ONLINE)
    p = next(model.parameters())
    out = {"errors": {}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for call in range(1, 5):
            if call == 3 and rank == world - 1:  # only the last rank's shard is poisoned
                saved = p.to_local().detach().clone()
                with torch.no_grad():
                    p.to_local()[0] = float("nan")
            online.update()
            if call == 3 and rank == world - 1:
                with torch.no_grad():
                    p.to_local().copy_(saved)
    out["warnings"] = [str(w.message) for w in caught]
    out["skipped"], out["recorded_steps"] = online.skipped_snapshots, online._buffer.raw()[1]
    attempts = {"averaged_model": lambda: online.averaged_model(), "hand_off": lambda: online.hand_off(0, 0, 0, 1.0, 0.0),
                "coefficients": lambda: online.coefficients(),
                "wrong_shards": lambda: online.load_state_dict(other_shards(online.state_dict(), rank))}
    bn = shard(nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6)), world)
    attempts["buffer"] = lambda: modeopt.OnlineCMD(bn, n_modes=2, fit_at=6, names=["0.weight", "1.running_mean"])
    attempts["optimizer"] = lambda: modeopt.OnlineCMDOptimizer(model, base_of(model, "sgd"), n_modes=2, fit_at=6)
    for name, fn in attempts.items():
        try:
            fn()
            out["errors"][name] = None
        except Exception as e:  # noqa: BLE001 - the test checks type and message
            out["errors"][name] = f"{type(e).__name__}: {e}"
    return out


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


def online_reference(tag: str = "online") -> dict:
    """scenario_online's training in one process, without FSDP, with a plain OnlineCMD."""
    model = make_model()
    opt = base_of(model, "sgd")
    online = modeopt.OnlineCMD(model, **ONLINE, **ONLINE_EXTRA[tag])
    data = batches()
    for _ in range(ONLINE_STEPS):
        x, y = next(data)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        online.update()
    return {"cmd": online.cmd_state_dict(), "history": online.history, "weights": full_weights(model),
            "labels": torch.cat([lab.to(torch.int64) for lab in online.labels]),
            "coefficients": [torch.cat(x) for x in online.coefficients()],
            "reference_rows": [online.layout.specs[t].offset + i for t, i in online.ref_index]}


def reference(kind: str) -> dict:
    """The same training in one process without FSDP (plain CMDOptimizer, the whole global batch)."""
    model = make_model()
    opt = modeopt.CMDOptimizer(model, base_of(model, kind), progress=False, **CFG, **EXTRA.get(kind, {}))
    losses = train(model, opt, batches(), CFG["warmup_steps"] + EMBEDDED_STEPS, 0, 1)
    return {"weights": full_weights(model), "r": opt.space.r_full().detach().clone(),
            "labels": torch.cat(opt.space.mode_index()), "losses": losses, "history": opt.history}


# ------------------------------------------------------------------ half-precision weights (issue 25)
#: bf16/fp16 parameters: a short warm-up, then HALF_STEPS embedded steps (the exactness check needs >= 1,000)
HALF = dict(n_modes=4, warmup_steps=12, snapshot_every=3, n_samples=200, seed=1234)
HALF_STEPS = 1000


def _half_batch(data, rank: int, world: int, dtype: torch.dtype):
    x, y = _local_batch(data, rank, world)
    return x.to(dtype), y


def _half_step(model, opt, x, y) -> float:
    opt.zero_grad()
    loss = F.cross_entropy(model(x).float(), y)
    loss.backward()
    opt.step()
    return float(loss.detach())


def _gathered_space(opt) -> dict:
    """The whole a and labels per embedded tensor (all-gathered from the checkpoint's DTensors: collective)."""
    sp = opt.state_dict()["cmd"]["space"]
    return {"a": [sp["a"][str(j)].full_tensor().float() for j in range(len(opt._emb_names))],
            "labels": [sp["labels"][str(j)].full_tensor().to(torch.int64) for j in range(len(opt._emb_names))],
            "names": list(opt._emb_names)}


def _seen_weights(model, x) -> dict:
    """The weights each Linear's forward computes with (FSDP2's unsharded, all-gathered tensors)."""
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(f"{i}.weight", mod.weight.detach().clone()))
             for i, m in enumerate(model) if isinstance(m, nn.Linear)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def scenario_half(rank: int, world: int, dtype_name: str, steps: int = HALF_STEPS, per_layer: bool = False,
                  float_last: bool = False) -> dict:
    """A bf16/fp16 FSDP2 model: warm-up, switch, ``steps`` embedded steps of SGD with momentum. Returns the
    weights at the switch and at the end (model.state_dict(), and what the forward computes with), r at both,
    the whole a and labels: the test checks each weight against round(w_switch + a (r - r_switch)[m])."""
    import warnings

    dtype = getattr(torch, dtype_name)
    model = make_model().to(dtype)
    if float_last:  # the last Linear float32, computing in the half dtype (MixedPrecisionPolicy), its own unit
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        model[4].float()
        mesh = init_device_mesh("cpu", (world,))
        for i in (0, 2):
            fully_shard(model[i], mesh=mesh)
        fully_shard(model[4], mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=dtype))
        model = fully_shard(model, mesh=mesh)
    else:
        model = shard(model, world, per_layer)
    opt = modeopt.CMDOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), progress=False,
                               **HALF)
    data = batches(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(HALF["warmup_steps"]):
            _half_step(model, opt, *_half_batch(data, rank, world, dtype))
    switch = {"weights": full_weights(model), "r": opt.r_full().clone()}
    losses = [_half_step(model, opt, *_half_batch(data, rank, world, dtype)) for _ in range(steps)]
    x, _ = _half_batch(data, rank, world, dtype)
    out = {"phase": opt.phase, "switch": switch, "r": opt.r_full().clone(), "weights": full_weights(model),
           "space": _gathered_space(opt), "losses": losses, "warnings": [str(w.message) for w in caught],
           "state_bytes": opt.state_bytes(), "n_local": opt.shards.n_local}
    out["seen"] = _seen_weights(model, x)  # (on one rank the units stay unsharded after it, until a backward)
    xb, yb = _half_batch(data, rank, world, dtype)

    def forward_backward():
        F.cross_entropy(model(xb).float(), yb).backward()

    out["host_sync"] = host_reads_in(forward_backward, 2)
    opt.zero_grad()
    before = full_weights(model)
    opt.export()
    out["exported"] = {"weights": full_weights(model), "before": before,
                       "shards": {n: p.to_local().clone() for n, p in zip(opt._emb_names, opt._emb_params)}}
    out["exported"]["seen"] = _seen_weights(model, x)
    return out


def _cloned(x):
    """A copy of a nested state dict whose tensors (DTensors too) no later step can change."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _cloned(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_cloned(v) for v in x)
    return x


def scenario_half_checkpoint(rank: int, world: int, out_dir: str, dtype_name: str = "bfloat16") -> dict:
    """A bf16 run saved with DCP in mode space and trained on; a fresh run resumed from the checkpoint and trained
    on alike (bit for bit?); the same state handed over without the frozen bases, as checkpoints written before
    they existed (the model's values then are the bases)."""
    from modeopt.cmd_optimizer import sharded_checkpoint

    dtype = getattr(torch, dtype_name)
    at, rest = HALF["warmup_steps"] + 8, 6

    def build(shift: float = 0.0):
        m = shard(make_model().to(dtype), world)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(shift)
        return m, modeopt.CMDOptimizer(m, torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), progress=False,
                                       **HALF)

    def run(m, o, data, n):
        for _ in range(n):
            _half_step(m, o, *_half_batch(data, rank, world, dtype))

    path = os.path.join(out_dir, f"ckpt-half-{dtype_name}")
    model, opt = build()
    data = batches(5)
    run(model, opt, data, at)
    sharded_checkpoint.save(path, model, opt)
    saved = full_weights(model)
    old = _cloned({"model": model.state_dict(), "optim": opt.state_dict()})  # in memory, as an old checkpoint holds it
    old["optim"]["cmd"]["space"].pop("base")
    old["optim"]["cmd"]["space"].pop("r_base")
    import json

    meta = json.loads(old["optim"]["cmd"]["meta"])
    meta.pop("half")
    old["optim"]["cmd"]["meta"] = json.dumps(meta)
    run(model, opt, data, rest)
    straight = full_weights(model)
    comm = opt._half_units[0]["comm"]  # an all-gather input of another layout than derived: refused, nothing written
    wrong = torch.full((3,), 7.0, dtype=dtype)
    layout_error = _attempt(lambda: opt._form_into(comm, wrong))
    layout_untouched = bool((wrong == 7.0).all())

    model2, opt2 = build(1.0)
    sharded_checkpoint.load(path, model2, opt2)
    loaded = full_weights(model2)
    data2 = batches(5)
    for _ in range(at):
        next(data2)
    run(model2, opt2, data2, rest)

    model3, opt3 = build(1.0)  # the old format: the optimizer's state without bases, then the model's values
    opt3.load_state_dict(old["optim"])
    model3.load_state_dict(old["model"])
    loaded_old = full_weights(model3)
    import torch.distributed.checkpoint as dcp

    dcp.save(old, checkpoint_id=path + "-old")  # the old format on disk, loaded by sharded_checkpoint.load
    model4, opt4 = build(1.0)
    sharded_checkpoint.load(path + "-old", model4, opt4)
    loaded_old_dcp = full_weights(model4)
    data3 = batches(5)
    for _ in range(at):
        next(data3)
    run(model3, opt3, data3, rest)
    return {"saved": saved, "loaded": loaded, "straight": straight, "resumed": full_weights(model2),
            "loaded_old": loaded_old, "resumed_old": full_weights(model3), "phase": opt2.phase,
            "loaded_old_dcp": loaded_old_dcp, "layout_error": layout_error, "layout_untouched": layout_untouched}


def scenario_half_resume_elsewhere(rank: int, world: int, src_dir: str, dtype_name: str = "bfloat16") -> dict:
    """scenario_half_checkpoint's checkpoint resumed on this world size: the loaded values, and a few steps on."""
    from modeopt.cmd_optimizer import sharded_checkpoint

    dtype = getattr(torch, dtype_name)
    model = shard(make_model().to(dtype), world)
    opt = modeopt.CMDOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), progress=False,
                               **HALF)
    sharded_checkpoint.load(os.path.join(src_dir, f"ckpt-half-{dtype_name}"), model, opt)
    loaded = full_weights(model)
    data = batches(5)
    for _ in range(HALF["warmup_steps"] + 8):
        next(data)
    x, _ = _half_batch(data, rank, world, dtype)
    seen = _seen_weights(model, x)
    data = batches(5)
    for _ in range(HALF["warmup_steps"] + 8):
        next(data)
    for _ in range(6):
        _half_step(model, opt, *_half_batch(data, rank, world, dtype))
    return {"loaded": loaded, "seen": seen, "resumed": full_weights(model), "phase": opt.phase}


def scenario_half_fallback(rank: int, world: int) -> dict:
    """A torch without FSDPModule.set_custom_all_gather (made so here): the bf16 shards are updated in place, as
    before the exact path existed, with the warning at the switch."""
    import warnings

    from modeopt.cmd_optimizer import sharded_half

    saved = sharded_half.forming_supported
    sharded_half.forming_supported = lambda: False
    try:
        model = shard(make_model().to(torch.bfloat16), world, False)
        opt = modeopt.CMDOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), progress=False,
                                   **HALF)
        data = batches(3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            losses = [_half_step(model, opt, *_half_batch(data, rank, world, torch.bfloat16))
                      for _ in range(HALF["warmup_steps"] + 3)]
        shards_now = [p.to_local().clone() for p in opt._emb_params]
        return {"warnings": [str(w.message) for w in caught], "losses": losses, "phase": opt.phase,
                "half": list(opt._half), "formed_equal_shards": all(
                    torch.equal(v.to_local(), s) for v, s in zip(model.state_dict().values(), shards_now))}
    finally:
        sharded_half.forming_supported = saved
