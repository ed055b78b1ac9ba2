"""Data-parallel training with :class:`~modeopt.CMDOptimizer`: ``DistributedDataParallel``,
``torchrun``, Hugging Face ``Trainer`` / Accelerate.

What has to happen (details and measurements: ``docs/scaling-out.md``):

* **Warm-up** - nothing special: DDP all-reduces the N weight gradients, every rank applies the
  same update, so every rank records the same snapshots.
* **The switch** - every rank decomposes its own (identical) recording; :func:`attach` makes the
  seed agree (rank 0's is broadcast) and afterwards compares an 8-byte fingerprint of the modes,
  ``a``, ``r`` and the weights across ranks. Should the ranks ever disagree (a non-deterministic
  BLAS, ranks that were not in sync), rank 0's mode space and weights are broadcast and the others
  re-enter it - loudly, with a warning.
* **Mode space** - the trainable parameters are now the M mode scalars ``r`` (+ parameters kept
  out of the embedding). DDP captured the old set when it was built: its reducer holds autograd
  hooks on the N weights, which no longer receive gradients (they do not require grad; the
  gradient reaches ``r`` through the mode space's autograd function). Left alone, DDP then
  all-reduces nothing and the ranks drift apart silently (``find_unused_parameters=False``, all
  weights embedded), raises "Expected to have finished reduction" (excluded parameters share a
  bucket with embedded ones), or all-reduces N zeros per step while ``r`` drifts
  (``find_unused_parameters=True``). :func:`attach` rebuilds the DDP reducer *in place* over the
  new trainable set before the next training forward - the same steps DDP itself runs when it is
  unpickled - so the same DDP object (the one the ``Trainer`` / Accelerate hold) goes on working,
  and its all-reduce carries exactly the M values of ``dL/dr`` (+ the excluded parameters).

Usage::

    ddp = DistributedDataParallel(model)
    opt = modeopt.CMDOptimizer(ddp, base, n_modes=10, ...)   # a DDP model is attached for you

    # or, when something else wraps the model (HF Trainer, Accelerate):
    opt = modeopt.CMDOptimizer(model, base, ...)
    modeopt.distributed.attach(opt)         # finds the DDP wrapper at its first forward
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import time
import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .ddp_reducer import (active_ddp, built_signature, check_rebuildable, prepare_rebuilt_inside_forward,
                          rebuild_reducer, trainable_signature)
from .wrappers import check_supported

__all__ = ["attach", "DDPAttachment", "PhasedOptimizer", "CommMeter", "check_supported", "rebuild_reducer",
           "launch_local"]

logger = logging.getLogger("modeopt")


@runtime_checkable
class PhasedOptimizer(Protocol):
    """What :func:`attach` needs of the optimizer (:class:`~modeopt.CMDOptimizer` provides it).

    ``model`` (the unwrapped module), ``seed`` (read, and set by a ``"pre_embed"`` hook), ``space``
    (the :class:`~modeopt.modespace.space.ModeSpace`, None outside mode space), ``history`` (one dict per
    switch), the read-only ``step_count``, phase events, and the mode space saved and re-entered.
    """

    model: nn.Module
    seed: int
    space: Any
    history: list

    @property
    def step_count(self) -> int:
        """Steps taken so far, over all phases."""

    def register_phase_hook(self, fn: Callable[[Any, str], None]) -> Callable[[], None]:
        """Call ``fn(optimizer, event)`` at each phase event; returns a function that removes it."""

    def mode_space_state(self) -> dict[str, Any] | None:
        """The current mode space (copies), or None outside it."""

    def load_mode_space(self, state: Mapping[str, Any]) -> None:
        """Enter a mode space saved by :meth:`mode_space_state` (validated first)."""


# ---------------------------------------------------------------- agreement
def _digest(tensors) -> bytes:
    h = hashlib.blake2b(digest_size=8)
    for t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.digest()


def _fingerprint(opt) -> Tensor:
    """Two 64-bit hashes: of the mode space (modes, a, r) and of every parameter's value."""
    s = opt.space
    modes = _digest([*s.labels, *s.a, *(s.a_scale or []), s.r_groups, s.r_full(), s.r_in_weights])
    weights = _digest(list(opt.model.parameters()))
    return torch.tensor([int.from_bytes(modes, "little", signed=True),
                         int.from_bytes(weights, "little", signed=True)], dtype=torch.int64)


# ---------------------------------------------------------------- attach
class DDPAttachment:
    """What :func:`attach` installed on one CMDOptimizer; ``detach()`` removes it.

    Attributes:
        switches: one entry per switch: ``{"step", "seed", "agreed", "repaired"}``.
        rebuilds: how many times a DDP reducer was rebuilt (once per change of the trainable set).
    """

    def __init__(self, opt, ddp: DistributedDataParallel | None, process_group, verify: bool):
        self._opt = weakref.ref(opt)
        self._ddps: dict[int, tuple[weakref.ref, int]] = {}  # id(ddp) -> (ref, version it was built at)
        self._explicit_pg = process_group
        self.verify = verify
        self.version = 0  # bumped whenever the set of trainable parameters changed
        self.switches: list[dict[str, Any]] = []
        self.rebuilds = 0
        self._remove_phase_hook = opt.register_phase_hook(self._on_phase)
        self._forward_handle = opt.model.register_forward_pre_hook(self._on_forward, prepend=True)
        _ATTACHED[opt] = self
        if ddp is not None:
            self.adopt(ddp)

    def detach(self) -> None:
        """Remove what :func:`attach` installed (phase hook, forward pre-hook); DDP reducers stay as built."""
        self._remove_phase_hook()
        self._forward_handle.remove()
        opt = self._opt()
        if opt is not None and _ATTACHED.get(opt) is self:
            del _ATTACHED[opt]

    # -- which DDP, which group
    def _ddp_list(self) -> list[DistributedDataParallel]:
        return [d for d in (ref() for ref, _ in self._ddps.values()) if d is not None]

    def process_group(self):
        """The group the ranks agree in: the one given to :func:`attach`, else the first DDP's, else
        the world (None without an initialised ``torch.distributed``)."""
        if self._explicit_pg is not None:
            return self._explicit_pg
        ddps = self._ddp_list()
        if ddps:
            return ddps[0].process_group
        return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None

    def adopt(self, ddp: DistributedDataParallel) -> None:
        """Track this DDP wrapper of the optimizer's model: its reducer is rebuilt at its next forward
        if it does not hold the current trainable set (``ValueError`` if it wraps another model)."""
        check_rebuildable(ddp)
        opt = self._opt()
        if not any(m is opt.model for m in ddp.module.modules()):
            raise ValueError("modeopt.distributed.attach: this DistributedDataParallel does not wrap the "
                             "CMDOptimizer's model")
        # A DDP built in warm-up holds the original parameters: same count and bytes = same set.
        # In mode space the r tensors are recreated by load_state_dict, so rebuild to be sure.
        stale = opt.space is not None or built_signature(ddp) != trainable_signature(ddp)
        self._ddps[id(ddp)] = (weakref.ref(ddp), -1 if stale else self.version)

    # -- hooks
    def _on_phase(self, opt, event: str) -> None:
        if event == "pre_embed":
            check_supported(opt.model)  # e.g. fully_shard() applied after the optimizer was built
            self._agree_on_seed(opt)
            return
        self.version += 1
        if event == "embedded":
            self._verify(opt)

    def _on_forward(self, module, args) -> None:
        if not torch.is_grad_enabled():
            return
        # Only a forward through DDP syncs gradients, so only then is a stale reducer rebuilt (a
        # collective): a rank that calls the bare model alone (evaluation with grad on) must not.
        active = active_ddp()
        if active is None:
            return
        if id(active) not in self._ddps:
            self.adopt(active)
        for key, (ref, built) in list(self._ddps.items()):
            ddp = ref()
            if ddp is None:
                del self._ddps[key]
            elif ddp is active and built != self.version:
                self._rebuild(ddp, inside_forward=True)
                self._ddps[key] = (ref, self.version)

    def _rebuild(self, ddp: DistributedDataParallel, inside_forward: bool) -> None:
        before = built_signature(ddp)
        rebuild_reducer(ddp)
        self.rebuilds += 1
        if inside_forward:  # DDP's _post_forward then calls prepare_for_backward on the new reducer
            prepare_rebuilt_inside_forward(ddp)
        after = built_signature(ddp)
        logger.info("modeopt: DDP reducer rebuilt over the trainable parameters: %d tensors, %s bytes per "
                    "all-reduce (was %d tensors, %s bytes)", after[0], f"{after[1]:,}", before[0], f"{before[1]:,}")

    def _agree_on_seed(self, opt) -> None:
        pg = self.process_group()
        if pg is None or dist.get_world_size(pg) == 1:
            return
        seed = torch.tensor([opt.seed], dtype=torch.int64)
        dist.broadcast(seed, src=dist.get_global_rank(pg, 0), group=pg)
        opt.seed = int(seed)

    def _verify(self, opt) -> None:
        pg = self.process_group()
        entry = {"step": opt.step_count, "seed": opt.seed, "agreed": True, "repaired": False}
        self.switches.append(entry)
        if pg is None or dist.get_world_size(pg) == 1 or not self.verify:
            return
        mine = _fingerprint(opt)
        every = [torch.empty_like(mine) for _ in range(dist.get_world_size(pg))]
        dist.all_gather(every, mine, group=pg)
        if all(torch.equal(x, every[0]) for x in every):
            return
        entry["agreed"] = False
        what = [n for i, n in enumerate(["modes", "weights"]) if any(x[i] != every[0][i] for x in every)]
        warnings.warn(f"modeopt: the ranks reached different {' and '.join(what)} at the switch (step "
                      f"{opt.step_count}); rank 0's mode space and weights are broadcast to all ranks", stacklevel=2)
        self._repair(opt, pg)
        entry["repaired"] = True

    @torch.no_grad()
    def _repair(self, opt, pg) -> None:
        src = dist.get_global_rank(pg, 0)
        box = [None]
        if dist.get_rank() == src:
            box[0] = {"space": opt.mode_space_state(), "history": opt.history[-1], "seed": opt.seed}
        dist.broadcast_object_list(box, src=src, group=pg)
        saved = box[0]
        opt.seed = self.switches[-1]["seed"] = saved["seed"]
        if dist.get_rank() != src:
            opt.load_mode_space(saved["space"])
            opt.history[-1] = saved["history"]
        for p in opt.model.parameters():
            dist.broadcast(p.data, src=src, group=pg)
        self.version += 1


#: The attachment of each attached optimizer (weak: it goes with the optimizer).
_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def attach(opt, ddp: DistributedDataParallel | None = None, *, process_group=None, verify: bool = True
           ) -> DDPAttachment:
    """Make a :class:`~modeopt.CMDOptimizer` correct under data parallelism. Call it on every rank.

    Args:
        opt: the CMDOptimizer (not a wrapper such as Accelerate's ``AcceleratedOptimizer``: pass
            its ``.optimizer``).
        ddp: the ``DistributedDataParallel`` that wraps ``opt.model``; None to find it at its
            first forward (how it works under the HF ``Trainer`` and Accelerate, which wrap the
            model themselves). A CMDOptimizer built on a DDP model is attached to it already.
        process_group: the group the ranks agree in (default: the DDP's, else the world).
        verify: compare a fingerprint of the mode space and weights across ranks at each switch
            (one all-gather of 16 bytes per rank) and repair from rank 0 if they differ.

    What it does: at each switch, rank 0's seed is broadcast before the decomposition and the
    result is verified (see ``verify``); whenever the set of trainable parameters changes (switch,
    re-clustering, ``export()``, ``load_state_dict``, ``load_mode_space``), every DDP wrapper of the model gets its
    reducer rebuilt over the new set at its next forward (through that DDP, with grad enabled)
    (:func:`rebuild_reducer`), so the embedded phase all-reduces the M mode-scalar gradients (+ the
    parameters kept out of the embedding) instead of N weight gradients.
    """
    if not isinstance(opt, PhasedOptimizer):
        inner = getattr(opt, "optimizer", None)
        hint = " (it wraps one: pass its .optimizer)" if isinstance(inner, PhasedOptimizer) else ""
        raise TypeError(f"attach() needs the CMDOptimizer, got {type(opt).__name__}{hint}")
    owner = _ATTACHED.get(opt)
    if owner is not None:
        if ddp is not None:
            owner.adopt(ddp)
        return owner
    if ddp is not None:
        check_supported(ddp)
    else:
        check_supported(opt.model)
    return DDPAttachment(opt, ddp, process_group, verify)


# ---------------------------------------------------------------- measuring
class CommMeter:
    """A DDP communication hook that all-reduces exactly as DDP's default and counts the bytes.

    ``meter = CommMeter.register(ddp)``; ``meter.take()`` returns the bytes handed to all-reduce
    (the payload per rank; a ring all-reduce moves ~2 (k-1)/k times that per rank) and the number
    of all-reduce calls since the last ``take()``. Survives :func:`rebuild_reducer`.
    """

    def __init__(self, process_group=None):
        self.process_group = process_group
        self.bytes = 0
        self.calls = 0
        self.sizes: list[int] = []  # elements per call since the last take()

    @classmethod
    def register(cls, ddp: DistributedDataParallel) -> CommMeter:
        """A new meter registered as ``ddp``'s communication hook (in its process group)."""
        meter = cls(ddp.process_group)
        ddp.register_comm_hook(meter, cls.hook)
        return meter

    @staticmethod
    def hook(state, bucket):  # unannotated: DDP checks annotations, and this module's are strings
        """``(CommMeter, dist.GradBucket) -> Future[Tensor]``: count, then DDP's allreduce_hook."""
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        buf = bucket.buffer()
        state.bytes += buf.numel() * buf.element_size()
        state.calls += 1
        state.sizes.append(buf.numel())
        return allreduce_hook(state.process_group, bucket)

    def take(self) -> tuple[int, int]:
        """``(bytes, calls)`` handed to all-reduce since the last ``take()``; resets the counts."""
        out = (self.bytes, self.calls)
        self.bytes, self.calls = 0, 0
        self.sizes = []
        return out


# ---------------------------------------------------------------- trying it on one machine
def launch_local(fn: Callable[..., None], args: tuple = (), nprocs: int = 2, *, timeout: float = 300.0,
                 threads: int = 1) -> float:
    """Run ``fn(rank, world_size, *args)`` in ``nprocs`` fresh CPU processes joined in a gloo group.

    For tests, benchmarks and trying DDP on a laptop. The ranks meet over 127.0.0.1 through a
    rendezvous store that this process opens on a free port (no port is guessed, so parallel
    launches do not collide); ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``
    are set as ``torchrun`` would (the HF ``Trainer`` and Accelerate read them), each rank uses
    ``threads`` torch threads, and the process group is destroyed when ``fn`` returns or raises.
    ``fn`` must be importable by name (a module-level function); its exceptions are re-raised here
    with the rank's traceback. Ranks still running after ``timeout`` seconds are terminated and
    ``TimeoutError`` is raised. Returns the wall time in seconds.
    """
    import torch.multiprocessing as mp

    store = dist.TCPStore("127.0.0.1", 0, None, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=min(timeout, 60)))
    t0 = time.perf_counter()
    ctx = mp.start_processes(_local_rank, args=(nprocs, store.port, fn, args, threads, timeout), nprocs=nprocs,
                             join=False, start_method="spawn")
    try:
        while not ctx.join(timeout=max(1.0, timeout - (time.perf_counter() - t0))):
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"the {nprocs} local ranks did not finish within {timeout:.0f} s")
    finally:
        for p in ctx.processes:  # the children started here, and only those
            if p.is_alive():
                p.terminate()
                p.join(5)
    return time.perf_counter() - t0


def _local_rank(rank: int, world: int, port: int, fn, args: tuple, threads: int, timeout: float) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads))
    if os.path.isdir("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # stay on the loopback interface
    torch.set_num_threads(threads)
    wait = datetime.timedelta(seconds=min(timeout, 60))
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=wait)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=wait)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()
