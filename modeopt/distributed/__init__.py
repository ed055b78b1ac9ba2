"""Parallel training shared by the trainers: DDP / torchrun / the HF Trainer on several processes
(:mod:`.ddp`: :func:`attach`, :func:`launch_local`, :class:`CommMeter`), DDP's reducer rebuild, which
wrappers are supported (:mod:`.wrappers`), and FSDP2 shards (:mod:`.sharding`, :mod:`.sharded_switch`).

Each trainer keeps its own FSDP2 twin beside it (``modeopt.cmd_optimizer.sharded``,
``modeopt.online.sharded``): they are parts of the trainer, built on this layer."""

from .ddp import CommMeter, DDPAttachment, PhasedOptimizer, attach, check_supported, launch_local, rebuild_reducer

__all__ = ["CommMeter", "DDPAttachment", "PhasedOptimizer", "attach", "check_supported", "launch_local", "rebuild_reducer"]
