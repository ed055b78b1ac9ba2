"""What tests/test_lightning.py runs: a tiny LightningModule on synthetic data, its optimizers, and the
2-process DDP scenarios (one launch by ``modeopt.distributed.ddp.launch_local``; each rank writes
``<out>/rank<r>.pt``)."""

from __future__ import annotations

import os
import time
import traceback
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import lightning.pytorch as pl

import modeopt
from modeopt.integrations.lightning import CMDCallback, OnlineCMDCallback

N_DATA, BATCH, IN, HIDDEN, OUT = 256, 32, 8, 32, 3
STEPS_PER_EPOCH = N_DATA // BATCH  # 8
LR, GAMMA = 1e-2, 0.95
QUIET = dict(accelerator="cpu", enable_progress_bar=False, logger=False, enable_model_summary=False)

for _pattern in (".*does not have many workers.*", ".*shuffling enabled.*", ".*LeafSpec.*", ".*litlogger.*",
                 ".*Checkpoint directory.*exists and is not empty.*", ".*The number of training batches.*",
                 ".*lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`.*"):
    warnings.filterwarnings("ignore", _pattern)


def data(seed: int = 0) -> TensorDataset:
    """A 3-class problem a small MLP learns in a few dozen steps: ``(N_DATA, IN)`` inputs, labels in 0..2."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_DATA, IN, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] + 0.5 * x[:, 2] > 0).long()
    return TensorDataset(x, y)


def loader(ds: TensorDataset, *, shuffle: bool = True, seed: int = 1) -> DataLoader:
    """Shuffled by epoch (``set_epoch``, which Lightning calls): epoch e's order is the same in a resumed run."""
    sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=shuffle, seed=seed)
    return DataLoader(ds, batch_size=BATCH, sampler=sampler)


def schedule(opt: torch.optim.Optimizer, interval: str | None) -> dict:
    """``configure_optimizers``' return value: the optimizer and a StepLR (gamma 0.95) stepped per ``interval``."""
    if interval is None:
        return {"optimizer": opt}
    return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, GAMMA),
                                               "interval": interval}}


def make_optimizer(kind: str, module: nn.Module) -> torch.optim.Optimizer:
    """One optimizer of each kind, on the module (its switch / fit within 2 epochs of 8 steps)."""
    base = torch.optim.AdamW(module.parameters(), lr=LR)
    if kind == "adamw":
        return base
    if kind == "cmd":
        return modeopt.CMDOptimizer(module, base, n_modes=3, warmup_steps=12, snapshot_every=2, n_samples=60, seed=0)
    if kind == "blockwise":
        return modeopt.BlockwiseCMD(module, base, ["net.2.", "net.0."], steps_per_block=6, n_modes=3,
                                    snapshot_every=2, n_samples=60)
    if kind == "online":
        return modeopt.OnlineCMDOptimizer(module, base, n_modes=3, fit_at=12, snapshot_every=2, n_samples=60, seed=0)
    raise ValueError(kind)


class Net(pl.LightningModule):
    """A 2-layer MLP; ``kind``/``interval`` choose ``configure_optimizers``; ``seen`` fingerprints each batch."""

    def __init__(self, kind: str = "adamw", interval: str | None = "step", seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT))
        self.kind, self.interval = kind, interval
        self.seen: list[float] = []
        self.losses: list[float] = []
        self.val: list[float] = []
        self.out_dtype: torch.dtype | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append(float(x[:, 0].sum()))
        logits = self(x)
        self.out_dtype = logits.dtype  # bfloat16 under precision="bf16-mixed"
        loss = F.cross_entropy(logits, y)
        self.losses.append(loss.item())
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.val.append(loss.item())
        self.log("val_loss", loss)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x), y))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        return schedule(make_optimizer(self.kind, self), self.interval)


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state as plain cloned tensors."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------- DDP (2 processes)
def _ddp_trainer(callbacks: list, max_epochs: int = 2, **kw) -> pl.Trainer:
    return pl.Trainer(max_epochs=max_epochs, devices=2, num_nodes=1, strategy="ddp", callbacks=callbacks,
                      enable_checkpointing=False, **QUIET, **kw)


def _ddp_loader(ds: TensorDataset) -> DataLoader:
    # Lightning puts a DistributedSampler (shuffle=True, seed 0) in: each rank its half of each epoch
    return DataLoader(ds, batch_size=BATCH // 2, shuffle=True)


def scenario_cmd(rank: int, world: int) -> dict:
    """CMDOptimizer through its switch under strategy='ddp': the all-reduce payload per step, by phase."""
    from modeopt.distributed.ddp import CommMeter

    module = Net("cmd", "step")
    log: list[dict] = []

    class Meter(pl.Callback):  # Lightning registers DDPStrategy(ddp_comm_hook=...) on CUDA only
        def on_fit_start(self, trainer, pl_module):
            self.meter = CommMeter.register(trainer.strategy.model)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.phase = trainer.optimizers[0].phase  # the phase this batch's backward runs in

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            nbytes = self.meter.take()[0]
            log.append({"step": trainer.global_step, "phase": self.phase, "bytes": nbytes})

    cb = CMDCallback()
    trainer = _ddp_trainer([cb, Meter()], max_epochs=2)
    trainer.fit(module, _ddp_loader(data()))
    opt = trainer.optimizers[0]
    return {"log": log, "phase": opt.phase, "n_modes": opt.space.n_modes if opt.space is not None else None,
            "history": cb.history, "weights": weights(module), "switches": opt.history,
            "lr": opt.param_groups[0]["lr"], "global_step": trainer.global_step}


def scenario_online(rank: int, world: int) -> dict:
    """OnlineCMDCallback under strategy='ddp': the shadows on the two ranks, and the validation it swaps in."""
    module = Net("adamw", None)
    cb = OnlineCMDCallback(n_modes=3, fit_at=8, snapshot_every=2, n_samples=60, seed=None)
    trainer = _ddp_trainer([cb], max_epochs=2)
    ds = data()
    trainer.fit(module, _ddp_loader(ds), DataLoader(ds, batch_size=64))
    raw = weights(module)
    res = trainer.validate(module, DataLoader(ds, batch_size=64), verbose=False)
    return {"phase": cb.online.phase, "seed": cb.online.seed, "repaired": cb.repaired, "raw": raw,
            "after_validate": weights(module), "shadow": {k: v.clone() for k, v in cb.cmd_state_dict().items()},
            "val_loss": res[0]["val_loss"], "calls": cb.online.calls}


SCENARIOS = {"cmd": scenario_cmd, "online": scenario_online}


def run_scenarios(rank: int, world: int, out_dir: str, names: list[str]) -> None:
    """Entry of each rank: every scenario, then one result file (a failing scenario stores its traceback)."""
    os.environ.setdefault("GROUP_RANK", "0")
    results: dict[str, dict] = {}
    try:
        for name in names:
            t0 = time.perf_counter()
            try:
                results[name] = SCENARIOS[name](rank, world)
            except Exception:  # noqa: BLE001 - reported by the test that reads this scenario
                results[name] = {"error": traceback.format_exc()}
            results[name]["seconds"] = time.perf_counter() - t0
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
