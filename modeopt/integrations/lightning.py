"""PyTorch Lightning support (imports ``lightning``: ``pip install 'modeopt[lightning]'``).

The optimizers need no integration to train under Lightning: ``CMDOptimizer``, ``BlockwiseCMD`` and
``OnlineCMDOptimizer`` are ``torch.optim.Optimizer`` subclasses, returned from
``configure_optimizers`` with any scheduler (docs/lightning.md). This module adds:

* :class:`OnlineCMDCallback` - an online-CMD shadow model (:class:`~modeopt.OnlineCMD`) of an ordinary
  Lightning training, in the manner of Lightning's ``StochasticWeightAveraging`` / ``WeightAveraging``:
  kept during training (also under ``strategy="ddp"``), swapped in for validation / test / predict,
  saved in and restored from the Lightning checkpoint, optionally written into the module at the end.
* :class:`CMDCallback` - under ``strategy="ddp"`` attaches each ``CMDOptimizer`` to the process group
  (:func:`modeopt.distributed.attach`), so the embedded phase all-reduces M mode scalars; it also
  keeps a record of the optimizers' phase changes.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(f"modeopt.integrations.lightning needs lightning: pip install 'modeopt[lightning]' ({e})") from e

from modeopt.blockwise.optimizer import BlockwiseCMD
from modeopt.cmd_optimizer.optimizer import CMDOptimizer
from modeopt.cmd_optimizer.sharded import ShardedCMDOptimizer
from modeopt.distributed.ddp import attach
from modeopt.online.optimizer import OnlineCMDOptimizer
from modeopt.online.shadow import OnlineCMD
from modeopt.online.shadow_checkpoint import check_online_settings

__all__ = ["OnlineCMDCallback", "CMDCallback", "unwrap_optimizer"]

logger = logging.getLogger("modeopt")

#: the stages whose loops can evaluate the shadow model (Lightning's ``TrainerFn`` values).
STAGES = ("validate", "test", "predict")
_CMD_FAMILY = (CMDOptimizer, ShardedCMDOptimizer, BlockwiseCMD, OnlineCMDOptimizer)


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer inside Lightning's ``LightningOptimizer`` (or another ``.optimizer`` wrapper)."""
    seen = 0
    while not isinstance(optimizer, torch.optim.Optimizer) and getattr(optimizer, "optimizer", None) is not None:
        optimizer, seen = optimizer.optimizer, seen + 1
        if seen > 8:
            break
    return optimizer


def _stages(swap_for: Any) -> frozenset[str]:
    if isinstance(swap_for, str):  # one stage named alone, not its letters
        swap_for = (swap_for,)
    try:
        chosen = frozenset(swap_for)
    except TypeError:
        raise ValueError(f"swap_for must be a collection of stages out of {STAGES}, got {swap_for!r}") from None
    unknown = sorted(str(s) for s in chosen - set(STAGES))
    if unknown:
        raise ValueError(f"swap_for: unknown stage(s) {unknown}; choose among {STAGES} (an empty tuple never swaps)")
    return chosen


class OnlineCMDCallback(Callback):
    """An online-CMD shadow model of the Lightning training (the follow-up CMD paper's EMA/SWA-like model).

    Args:
        fit_at, n_modes, snapshot_every, sample_every, n_samples, max_snapshots, record_dtype, names:
            as in :class:`~modeopt.OnlineCMD` (counts are optimizer steps: ``trainer.global_step``;
            with ``accumulate_grad_batches=k`` one step per k batches). ``names`` selects tensors of the
            ``LightningModule`` by its own names (``"net.0.weight"``); default every trainable float
            parameter and float buffer.
        seed: the decomposition's seed (default 0: every rank and every resume uses the same one).
            ``None`` draws one from torch's RNG; under DDP rank 0's draw is then used on every rank.
        swap_for: the stages whose loops evaluate the CMD weights instead of the raw ones
            (``"validate"`` also covers the validation inside ``fit``; ``()`` never swaps). Before
            the fit point there is no CMD model yet and the raw weights are evaluated.
        export_at_end: at the end of ``fit``, write the CMD weights into the module (the raw
            weights are lost, as ``StochasticWeightAveraging`` does); a warning if not fitted yet.

    The shadow model: ``callback.online`` (the :class:`~modeopt.OnlineCMD`, built when ``fit`` starts,
    on the device the module trains on); ``callback.cmd_state_dict()`` its weights, named as in
    ``pl_module.state_dict()``. It is updated once per optimizer step (when ``trainer.global_step``
    advanced), after the step. Its state (the recording window before the fit, 17 bytes per
    weight after it) is saved in every Lightning checkpoint and restored when ``fit``, ``validate``,
    ``test`` or ``predict`` is given ``ckpt_path``; the checkpoint's ``state_dict`` always holds the
    raw weights, even when saved while the CMD weights are swapped in.

    Under ``strategy="ddp"`` every rank keeps its own shadow of the (identical) weights; after the fit
    the ranks compare a fingerprint of it and take rank 0's if they differ (one warning). Sharded
    strategies (FSDP, DeepSpeed) are refused, and so are the optimizers that already hold a CMD model
    (``CMDOptimizer``, ``BlockwiseCMD``; ``OnlineCMDOptimizer`` keeps its own shadow: docs/lightning.md).
    """

    def __init__(self, *, fit_at: int, n_modes: int = 10, snapshot_every: int = 1, sample_every: int | None = None,
                 n_samples: int = 1000, seed: int | None = 0, max_snapshots: int | None = None,
                 record_dtype: torch.dtype = torch.float32,
                 names: Sequence[str] | Callable[[str, Tensor], bool] | None = None,
                 swap_for: Iterable[str] = STAGES, export_at_end: bool = False) -> None:
        check_online_settings(n_modes=n_modes, fit_at=fit_at, snapshot_every=snapshot_every, n_samples=n_samples,
                              sample_every=sample_every, max_snapshots=max_snapshots, seed=seed,
                              record_dtype=record_dtype)
        if not isinstance(export_at_end, bool):
            raise ValueError(f"export_at_end must be True or False, got {export_at_end!r}")
        if names is not None and not callable(names) and (isinstance(names, str) or not isinstance(names, Sequence)):
            raise ValueError(f"names must be a list of tensor names or a predicate (name, tensor) -> bool, got {names!r}")
        self.options = dict(n_modes=n_modes, fit_at=fit_at, snapshot_every=snapshot_every, sample_every=sample_every,
                            n_samples=n_samples, max_snapshots=max_snapshots, record_dtype=record_dtype, names=names)
        self.seed = seed
        self.swap_for = _stages(swap_for)
        self.export_at_end = export_at_end
        self.online: OnlineCMD | None = None
        self.exported = False
        self.repaired = 0  # fits after which the ranks disagreed and took rank 0's shadow
        self._last_step = 0  # trainer.global_step at the last update
        self._pending: dict[str, Any] | None = None  # a checkpoint's state, loaded when the OnlineCMD exists
        self._swap: contextlib.ExitStack | None = None
        self._raw: dict[str, Tensor] | None = None

    @property
    def state_key(self) -> str:
        """Key of this callback's state in the checkpoint (two instances differ by ``fit_at``/``n_modes``)."""
        return self._generate_state_key(fit_at=self.options["fit_at"], n_modes=self.options["n_modes"])

    # ---------------------------------------------------------------- building
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse the strategies whose model is sharded (each rank would model only its shard)."""
        if not isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise TypeError(f"OnlineCMDCallback supports one device and strategy='ddp', not "
                            f"{type(trainer.strategy).__name__}: under FSDP use modeopt.OnlineCMD directly on the "
                            "fully_shard-ed model (docs/scaling-out.md)")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the optimizers, build the shadow model on the module (now on its device), load a checkpoint's state."""
        for opt in trainer.optimizers:
            inner = unwrap_optimizer(opt)
            if isinstance(inner, OnlineCMDOptimizer):
                raise TypeError("OnlineCMDCallback: the optimizer is an OnlineCMDOptimizer, which keeps its own CMD "
                                "shadow model: drop the callback and call opt.eval() / opt.train() around evaluation "
                                "(docs/lightning.md), or use a plain optimizer with the callback")
            if isinstance(inner, _CMD_FAMILY):
                raise TypeError(f"OnlineCMDCallback models an ordinary training; {type(inner).__name__} already "
                                "trains in mode space (its weights are a CMD model): use a plain optimizer with the "
                                "callback, or the CMD optimizer without it")
        resuming = self._pending is not None
        self._build(trainer, pl_module)
        assert self.online is not None
        if not resuming:  # a new fit (or another fit of the same module): count this trainer's steps
            self._last_step = trainer.global_step
        if self.online.phase == "recording":
            try:
                total = trainer.estimated_stepping_batches  # max_steps, or epochs x batches / accumulation
            except Exception:  # noqa: BLE001 - only a warning depends on it; never stop the training
                return
            ahead = self.online.calls + total - (self._last_step if resuming else trainer.global_step)
            if ahead < self.online.fit_at:
                warnings.warn(f"OnlineCMDCallback: fit_at={self.online.fit_at} optimizer steps, but this fit reaches "
                              f"about {ahead:g}: the shadow model will not be fitted (evaluation keeps the raw "
                              "weights)", stacklevel=2)

    def _build(self, trainer: pl.Trainer | None, pl_module: pl.LightningModule) -> None:
        if self.online is None or self.online.model is not pl_module:
            seed = self.seed
            if seed is None:
                seed = int(torch.randint(0, 2**31 - 1, ()).item())
                if trainer is not None and trainer.world_size > 1:
                    seed = int(trainer.strategy.broadcast(seed, src=0))
            self.online = OnlineCMD(pl_module, seed=seed, **self.options)
            self._last_step = 0 if trainer is None else trainer.global_step
            self.exported = False
        if self._pending is not None:
            state, self._pending = self._pending, None
            self.online.load_state_dict(state["online"])
            self._last_step, self.exported = int(state["last_step"]), bool(state["exported"])

    # ---------------------------------------------------------------- training
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Update the shadow model after each optimizer step (not after an accumulation-only batch)."""
        if self.online is None or trainer.global_step <= self._last_step:
            return
        self._last_step = trainer.global_step
        was = self.online.phase
        self.online.update()
        if was == "recording" and self.online.phase == "fitted" and trainer.world_size > 1:
            self._agree(trainer)

    def _agree(self, trainer: pl.Trainer) -> None:
        """Under DDP: every rank fitted its own shadow of the same weights; check that they agree."""
        online = self.online
        assert online is not None
        mine = _fingerprint(online).to(trainer.strategy.root_device)
        every = trainer.strategy.all_gather(mine)
        if bool((every == mine).all()):
            return
        state = trainer.strategy.broadcast(online.state_dict() if trainer.global_rank == 0 else None, src=0)
        if trainer.global_rank != 0:
            online.load_state_dict(state)
        self.repaired += 1
        warnings.warn("OnlineCMDCallback: the ranks' CMD fits differ (non-deterministic decomposition or ranks "
                      "that drifted apart); every rank now uses rank 0's", RuntimeWarning, stacklevel=2)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """With ``export_at_end``: write the CMD weights into the module."""
        if not self.export_at_end or self.online is None:
            return
        if self.online.phase != "fitted":
            warnings.warn(f"OnlineCMDCallback(export_at_end=True): the fit point (step {self.online.fit_at}) was not "
                          f"reached ({self.online.calls} steps); the module keeps its raw weights", stacklevel=2)
            return
        self.online.load_into(pl_module)
        self.exported = True

    # ---------------------------------------------------------------- evaluation
    def cmd_state_dict(self) -> dict[str, Tensor]:
        """The CMD weights, named as in ``pl_module.state_dict()`` (the raw values before the fit point)."""
        if self.online is None:
            raise RuntimeError("OnlineCMDCallback: no shadow model yet (it is built when trainer.fit starts)")
        return self.online.cmd_state_dict()

    def _swap_in(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        fn = None if trainer.state.fn is None else str(trainer.state.fn.value)
        if ("validate" if fn == "fit" else fn) not in self.swap_for:  # validation inside fit counts as validate
            return
        if self.online is None and self._pending is not None:  # validate/test/predict(ckpt_path=...) alone
            self._build(None, pl_module)
        if self.online is None or self.online.model is not pl_module or self.online.phase != "fitted":
            return
        if self.exported or self._swap is not None:
            return
        self._raw = {n: t.detach().clone() for n, t in zip(self.online.names, self.online.tensors)}
        self._swap = contextlib.ExitStack()
        self._swap.enter_context(self.online.applied())

    def _swap_out(self) -> None:
        if self._swap is not None:
            swap, self._swap, self._raw = self._swap, None, None
            swap.close()  # the raw weights back, bit for bit

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Swap the CMD weights in (if asked for this stage)."""
        self._swap_in(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put the raw weights back."""
        self._swap_out()

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Swap the CMD weights in (if asked for this stage)."""
        self._swap_in(trainer, pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put the raw weights back."""
        self._swap_out()

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Swap the CMD weights in (if asked for this stage)."""
        self._swap_in(trainer, pl_module)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put the raw weights back."""
        self._swap_out()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """An interrupted evaluation still gives the raw weights back."""
        self._swap_out()

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The shadow model's state (tensors and plain values; ``weights_only`` loading reads it)."""
        if self.online is None:
            return {} if self._pending is None else dict(self._pending)
        return {"version": 1, "online": self.online.state_dict(), "last_step": self._last_step,
                "exported": self.exported}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep a checkpoint's state; it is loaded (and checked) into the shadow model when it is built."""
        if not state_dict:  # saved before any fit started: nothing to restore
            return
        if not isinstance(state_dict, dict) or "online" not in state_dict or "last_step" not in state_dict:
            raise ValueError("OnlineCMDCallback.load_state_dict: not a state of this callback (expected the keys "
                             f"'online', 'last_step', 'exported'; got {sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__})")
        self._pending = dict(state_dict)
        if self.online is not None:  # the shadow exists already (fit called again): load now, checked
            self._build(None, self.online.model)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """A checkpoint saved while the CMD weights are swapped in still holds the raw weights."""
        if self._raw is not None:
            sd = checkpoint.get("state_dict", {})
            for name, value in self._raw.items():
                if name in sd:
                    sd[name] = value.clone()


def _fingerprint(online: OnlineCMD) -> Tensor:
    """A few float64 numbers that differ when two ranks' fits differ (modes, references, moments)."""
    f64 = torch.float64
    dev = online.reference_device
    parts = [online.mode_mean.to(dev, f64).sum(), online.mode_m2.to(dev, f64).sum(),
             torch.tensor(float(sum(t * 1_000_003 + i for t, i in online.ref_index)), dtype=f64, device=dev)]
    for lab, mean in zip(online.labels, online.mean):
        w = torch.arange(1, lab.numel() + 1, device=lab.device, dtype=f64)
        parts.append((lab.to(f64) * w).sum().to(dev))
        parts.append(mean.to(f64).sum().to(dev))
    return torch.stack(parts)


class CMDCallback(Callback):
    """Makes ``CMDOptimizer`` correct under ``strategy="ddp"`` and records its phase changes.

    At the start of ``fit`` with more than one process, every ``CMDOptimizer`` among the trainer's
    optimizers is attached to the process group (:func:`modeopt.distributed.attach`): the ranks agree on
    the seed at the switch, verify the decomposition, and Lightning's DDP wrapper is rebuilt over the
    mode scalars, so the embedded phase all-reduces M numbers per step instead of N (docs/scaling-out.md).
    The optimizer's model must be the module whose ``forward`` the ``training_step`` calls (``self(x)``
    with ``CMDOptimizer(self, ...)``, or ``self.net(x)`` with ``CMDOptimizer(self.net, ...)``): the
    attachment rebuilds the DDP reducer from that module's forward.

    ``history``: one entry per phase change seen after an optimizer step,
    ``{"step", "phase", "cycle", "trainable_params"}``, also logged to the ``modeopt`` logger.
    """

    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []
        self._last: dict[int, tuple[str, int]] = {}

    def _cmd_optimizers(self, trainer: pl.Trainer) -> list[Any]:
        return [o for o in map(unwrap_optimizer, trainer.optimizers) if isinstance(o, (CMDOptimizer, BlockwiseCMD))]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Under DDP: attach every CMD optimizer (idempotent). Note the phases."""
        for opt in self._cmd_optimizers(trainer):
            if trainer.world_size > 1:
                if not isinstance(opt, CMDOptimizer):
                    raise TypeError(f"CMDCallback: {type(opt).__name__} trains in one process only; under "
                                    f"{trainer.world_size} processes use CMDOptimizer (docs/scaling-out.md)")
                attach(opt)
            self._last[id(opt)] = (opt.phase, getattr(opt, "cycle", 0))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Record a phase change."""
        for opt in self._cmd_optimizers(trainer):
            now = (opt.phase, getattr(opt, "cycle", 0))
            if self._last.get(id(opt)) != now:
                entry = {"step": trainer.global_step, "phase": now[0], "cycle": now[1],
                         "trainable_params": opt.trainable_parameters()}
                self.history.append(entry)
                logger.info("modeopt: %s", entry)
            self._last[id(opt)] = now
