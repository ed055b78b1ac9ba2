"""The processes of tests/test_distributed.py: each runs every scenario on its rank, in order.

Launched by ``modeopt.distributed.ddp.launch_local`` (2 CPU processes, gloo over 127.0.0.1). Each
scenario returns a dict of plain values and tensors; a rank writes all of them to
``<out>/rank<r>.pt``. A scenario that raises stores its traceback instead (the others still run).
"""

from __future__ import annotations

import copy
import os
import time
import traceback
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import modeopt
from modeopt.distributed.ddp import CommMeter, attach
from workloads import SmallCNN

GLOBAL_BATCH = 64

# Scenario "sgd": the one compared with a single process (tests/test_distributed.py runs that).
SGD = dict(n_modes=8, warmup_steps=30, snapshot_every=3, n_samples=300, steps=50, resume_at=40, lr=0.05)


# ----------------------------------------------------------------------------- the ranks' entry
def run_scenarios(rank: int, world: int, out_dir: str, scenarios: list[str], data: tuple) -> None:
    """Entry of each rank (``modeopt.distributed.ddp.launch_local``): every scenario, then one result file."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    DATA[:] = data
    results: dict[str, dict] = {}
    try:
        for name in scenarios:
            t0 = time.perf_counter()
            try:
                results[name] = SCENARIOS[name](rank, world)
            except Exception:  # noqa: BLE001 - reported by the test that reads this scenario
                results[name] = {"error": traceback.format_exc()}
            results[name]["seconds"] = time.perf_counter() - t0
            dist.barrier()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


# ----------------------------------------------------------------------------- helpers
DATA: list = []  # (x, y): set by run_scenarios in a rank, by single_process_sgd otherwise


def global_batches(seed: int = 0):
    """The same global batches on every rank (and in the single-process reference)."""
    x, y = DATA
    g = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(0, len(x), (GLOBAL_BATCH,), generator=g)
        yield x[idx], y[idx]


def shard(batch, rank: int, world: int):
    n = GLOBAL_BATCH // world
    return tuple(t[rank * n : (rank + 1) * n] for t in batch)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- scenarios
def scenario_sgd(rank: int, world: int) -> dict:
    """CMDOptimizer(DDP(model)): SGD+momentum, everything embedded; resume mid mode space."""
    c = SGD

    def build():
        torch.manual_seed(0)
        model = SmallCNN()
        ddp = DDP(model)
        meter = CommMeter.register(ddp)
        torch.manual_seed(rank)  # a different seed=None draw on every rank: attach() makes them agree
        base = torch.optim.SGD(model.parameters(), lr=c["lr"], momentum=0.9)
        opt = modeopt.CMDOptimizer(ddp, base, n_modes=c["n_modes"], warmup_steps=c["warmup_steps"],
                                   snapshot_every=c["snapshot_every"], n_samples=c["n_samples"], progress=False)
        return model, ddp, meter, opt

    def step(ddp, opt, batch):
        xb, yb = shard(batch, rank, world)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(ddp(xb), yb).backward()
        opt.step()

    model, ddp, meter, opt = build()
    seed_before = opt.seed
    data = global_batches()
    batches = [next(data) for _ in range(c["steps"])]
    log, saved = [], None
    for i, batch in enumerate(batches):
        if i == c["resume_at"]:
            saved = (weights(model), copy.deepcopy(opt.state_dict()))  # as torch.save would freeze it
        phase = opt.phase
        step(ddp, opt, batch)
        nbytes, calls = meter.take()
        log.append({"phase": phase, "bytes": nbytes, "calls": calls, "trainable": trainable(model)})
    att = attach(opt)
    out = {"log": log, "weights": weights(model), "seed_before": seed_before, "seed": opt.seed,
           "labels": torch.cat(opt.space.mode_index()), "n_modes": opt.space.n_modes,
           "switches": att.switches, "rebuilds": att.rebuilds, "n_weights": sum(p.numel() for p in model.parameters()
                                                                                 if not p.requires_grad)}
    # Resume: a fresh model, DDP and optimizer load both state dicts and finish the run.
    model2, ddp2, meter2, opt2 = build()
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    for batch in batches[c["resume_at"]:]:
        step(ddp2, opt2, batch)
    out["resumed"] = weights(model2)
    out["resumed_bytes"] = meter2.take()[0]
    return out


def scenario_adamw(rank: int, world: int) -> dict:
    """attach(opt) finds the DDP itself; find_unused_parameters=True (the HF Trainer's default),
    biases kept out of the embedding, gradient accumulation under no_sync(), clipping, AdamW,
    re-clustering (embedded -> full -> embedded), then export() and plain steps."""
    torch.manual_seed(0)
    model = SmallCNN()
    base = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    opt = modeopt.CMDOptimizer(model, base, n_modes=6, warmup_steps=15, snapshot_every=3, n_samples=200,
                               seed=0, exclude=lambda n, p: p.ndim < 2, recluster_every=12, recluster_steps=9,
                               progress=False)
    att = attach(opt)
    ddp = DDP(model, find_unused_parameters=True)
    meter = CommMeter.register(ddp)
    data = global_batches(seed=1)
    log = []
    for i in range(15 + 12 + 9 + 12 + 4):
        if i == 15 + 12 + 9 + 12:
            opt.export()
        phase = opt.phase
        xb, yb = shard(next(data), rank, world)
        opt.zero_grad(set_to_none=True)
        with ddp.no_sync():
            F.cross_entropy(ddp(xb[:16]), yb[:16]).backward()
        F.cross_entropy(ddp(xb[16:]), yb[16:]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        nbytes, calls = meter.take()
        log.append({"phase": phase, "bytes": nbytes, "calls": calls, "trainable": trainable(model)})
    return {"log": log, "weights": weights(model), "switches": att.switches, "rebuilds": att.rebuilds,
            "cycles": opt.cycle, "n_bias": sum(p.numel() for p in model.parameters() if p.ndim < 2)}


def scenario_static(rank: int, world: int) -> dict:
    """static_graph=True and gradient_as_bucket_view=True survive the rebuild; a forward of the bare
    model on one rank only (evaluation with grad enabled) leaves the reducer alone."""
    torch.manual_seed(0)
    model = SmallCNN()
    ddp = DDP(model, static_graph=True, gradient_as_bucket_view=True)
    meter = CommMeter.register(ddp)
    base = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt = modeopt.CMDOptimizer(ddp, base, n_modes=5, warmup_steps=12, snapshot_every=3, n_samples=200, seed=3,
                               exclude=["fc2.*"], progress=False)
    data = global_batches(seed=2)
    log = []
    for i in range(24):
        phase = opt.phase
        xb, yb = shard(next(data), rank, world)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(ddp(xb), yb).backward()
        opt.step()
        log.append({"phase": phase, "bytes": meter.take()[0], "trainable": trainable(model)})
        if rank == 0 and i in (11, 12):
            # Only rank 0 calls the bare model with grad on, right after the switch: the reducer is
            # rebuilt (a collective) in the next forward through DDP, at the same point on every rank.
            model(xb).sum()
    return {"log": log, "weights": weights(model), "n_fc2": model.fc2.weight.numel() + model.fc2.bias.numel(),
            "n_modes": opt.space.n_modes}


def scenario_repair(rank: int, world: int) -> dict:
    """Rank 1 decomposes with another seed: the fingerprint catches it and rank 0's modes win."""
    torch.manual_seed(0)
    model = SmallCNN()
    ddp = DDP(model)
    base = torch.optim.SGD(model.parameters(), lr=0.05)
    opt = modeopt.CMDOptimizer(ddp, base, n_modes=4, warmup_steps=9, snapshot_every=3, n_samples=200, seed=0,
                               init="fit", progress=False)
    if rank == 1:  # runs after attach's hook has agreed on the seed
        opt.register_phase_hook(lambda o, event: setattr(o, "seed", o.seed + 7) if event == "pre_embed" else None)
    data = global_batches(seed=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(14):
            xb, yb = shard(next(data), rank, world)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(ddp(xb), yb).backward()
            opt.step()
    return {"weights": weights(model), "labels": torch.cat(opt.space.mode_index()),
            "switches": attach(opt).switches, "warnings": [str(w.message) for w in caught]}


def scenario_unattached(rank: int, world: int) -> dict:
    """What happens without attach(): a warning at the switch, and the ranks drift apart."""
    torch.manual_seed(0)
    model = SmallCNN()
    ddp = DDP(model)
    base = torch.optim.SGD(model.parameters(), lr=0.05)
    opt = modeopt.CMDOptimizer(model, base, n_modes=4, warmup_steps=9, snapshot_every=3, n_samples=200, seed=0,
                               progress=False)
    meter = CommMeter.register(ddp)
    data = global_batches(seed=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(11):
            xb, yb = shard(next(data), rank, world)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(ddp(xb), yb).backward()
            last_bytes = meter.take()[0]
            opt.step()
    return {"warnings": [str(w.message) for w in caught], "r_grad": opt.space.r_params[0].grad.clone(),
            "last_bytes": last_bytes}


def scenario_unsupported(rank: int, world: int) -> dict:
    """ZeRO is refused with a reason, FSDP2 gets the sharded optimizer, on 2 real ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.optim import ZeroRedundancyOptimizer

    errors = {}
    model = SmallCNN()
    zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.SGD, lr=0.1)
    try:
        modeopt.CMDOptimizer(model, zero, n_modes=2, warmup_steps=9, snapshot_every=3)
    except TypeError as e:
        errors["zero"] = str(e)
    model = SmallCNN()
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    # FSDP2 is supported since issue #19: CMDOptimizer returns the sharded optimizer (tests/test_fsdp.py)
    sharded = modeopt.CMDOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), n_modes=2, warmup_steps=9,
                                   snapshot_every=3)
    return {"errors": errors, "fsdp2": type(sharded).__name__}


def scenario_trainer(rank: int, world: int) -> dict:
    """The HF Trainer (Accelerate wraps the model in DDP itself, find_unused_parameters=True)."""
    import tempfile

    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

    from modeopt.integrations.hf import CMDCallback

    vocab, seq = 500, 12

    class Task(torch.utils.data.Dataset):
        def __init__(self, n=256):
            g = torch.Generator().manual_seed(0)
            self.y = torch.randint(0, 2, (n,), generator=g)
            half = (vocab - 5) // 2
            self.x = 5 + self.y[:, None] * half + torch.randint(0, half, (n, seq), generator=g)

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return {"input_ids": self.x[i], "attention_mask": torch.ones_like(self.x[i]), "labels": self.y[i]}

    class Meter(TrainerCallback):
        """Counts the bytes all-reduced per optimizer step (the Trainer's own DDP wrapper)."""

        def __init__(self):
            self.trainer, self.meter, self.log, self.phase = None, None, [], None

        def on_step_begin(self, args, state, control, optimizer=None, **kw):
            if self.meter is None:  # before the first backward
                self.meter = CommMeter.register(self.trainer.model_wrapped)
            self.phase = optimizer.optimizer.phase

        def on_step_end(self, args, state, control, optimizer=None, **kw):
            self.log.append({"phase": self.phase, "bytes": self.meter.take()[0]})

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=2))
    base = torch.optim.AdamW(model.parameters(), lr=3e-3)
    opt = modeopt.CMDOptimizer(model, base, n_modes=6, warmup_steps=12, snapshot_every=2, n_samples=200,
                               exclude=["classifier.*"], progress=False)
    meter = Meter()
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=8, max_steps=24, use_cpu=True,
                                 report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
                                 dataloader_num_workers=0, seed=0)
        # CMDCallback attaches modeopt.distributed.ddp when the Trainer runs on more than one process.
        trainer = Trainer(model=model, args=args, train_dataset=Task(), optimizers=(opt, None),
                          callbacks=[meter, CMDCallback()])
        meter.trainer = trainer
        out = trainer.train()
        wrapped = type(trainer.model_wrapped).__name__
    att = attach(opt)  # the attachment the callback made (attach is idempotent)
    return {"weights": weights(model), "log": meter.log, "phase": opt.phase, "loss": out.training_loss,
            "switches": att.switches, "rebuilds": att.rebuilds, "wrapper": wrapped, "n_modes": opt.space.n_modes,
            "n_classifier": sum(p.numel() for n, p in model.classifier.named_parameters() if "modeopt_r" not in n), "world": trainer.args.world_size}


SCENARIOS = {
    "trainer": scenario_trainer,
    "sgd": scenario_sgd,
    "adamw": scenario_adamw,
    "static": scenario_static,
    "repair": scenario_repair,
    "unattached": scenario_unattached,
    "unsupported": scenario_unsupported,
}


def single_process_sgd(data: tuple) -> dict:
    """Scenario "sgd" in one process on the whole global batch (the reference)."""
    DATA[:] = data
    c = SGD
    torch.manual_seed(0)
    model = SmallCNN()
    torch.manual_seed(0)  # rank 0's draw: the seed every rank agrees on
    base = torch.optim.SGD(model.parameters(), lr=c["lr"], momentum=0.9)
    opt = modeopt.CMDOptimizer(model, base, n_modes=c["n_modes"], warmup_steps=c["warmup_steps"],
                               snapshot_every=c["snapshot_every"], n_samples=c["n_samples"], progress=False)
    data = global_batches()
    for _ in range(c["steps"]):
        xb, yb = next(data)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    return {"weights": weights(model), "labels": torch.cat(opt.space.mode_index()), "seed": opt.seed}
