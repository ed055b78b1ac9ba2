"""Which data-parallel set-ups :class:`~modeopt.CMDOptimizer` runs under: a
``DistributedDataParallel`` model is unwrapped (and attached by the optimizer); models sharded by
FSDP, DTensor or DeepSpeed ZeRO-3 and a ``ZeroRedundancyOptimizer`` base are refused with a reason.

Used by the optimizer at construction and by :mod:`modeopt.distributed` at each switch (sharding
may be applied after the optimizer was built). Imports torch only.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .ddp_reducer import check_rebuildable

__all__ = ["check_supported", "sharding_wrapper"]

_UNSUPPORTED_DOC = "see docs/scaling-out.md"


def sharding_wrapper(model: nn.Module) -> str | None:
    """The name of a parameter-sharding wrapper found in ``model``, if any."""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        DTensor = ()  # noqa: N806
    for mod in model.modules():
        if isinstance(mod, FullyShardedDataParallel):
            return "FullyShardedDataParallel (FSDP1)"
        if isinstance(mod, FSDPModule):
            return "fully_shard (FSDP2)"
    for p in model.parameters():
        if DTensor and isinstance(p, DTensor):
            return "DTensor parameters (FSDP2 / tensor parallelism)"
        if hasattr(p, "ds_id"):
            return "DeepSpeed ZeRO-3"
    return None


def check_supported(model: nn.Module, base_optimizer: torch.optim.Optimizer | None = None
                    ) -> tuple[nn.Module, DistributedDataParallel | None]:
    """Unwrap a ``DistributedDataParallel`` model and refuse what mode space cannot run on.

    Returns ``(module, ddp)``: the module to put into mode space and the DDP wrapper (or None).

    Raises ``TypeError`` for parameter-sharding wrappers (FSDP1, FSDP2 ``fully_shard``, DTensor
    parameters, DeepSpeed ZeRO-3) and for ``ZeroRedundancyOptimizer`` as base optimizer: mode space
    keeps every embedded weight as a plain local tensor that it updates in place, and swaps it into
    its module during the forward - a sharding wrapper owns exactly those tensors (it replaces them
    with shards and gathers them in its own hooks), and ZeRO partitions the parameter set that the
    switch replaces.
    """
    ddp = None
    if isinstance(model, DistributedDataParallel):
        ddp, model = model, model.module
        check_rebuildable(ddp)
    found = sharding_wrapper(model)
    if found is not None:
        raise TypeError(
            f"modeopt: the model is sharded by {found}, which CMDOptimizer does not support: mode space "
            "maintains every embedded weight in place as a plain local tensor and swaps it into its module "
            "in the forward, and a sharding wrapper owns and replaces exactly those tensors. Use "
            "DistributedDataParallel (after the switch each rank holds 9 bytes per embedded weight and "
            f"all-reduces M numbers per step, so there is little left to shard; {_UNSUPPORTED_DOC})")
    if base_optimizer is not None:
        try:
            from torch.distributed.optim import ZeroRedundancyOptimizer
        except ImportError:  # pragma: no cover
            ZeroRedundancyOptimizer = ()  # noqa: N806
        if ZeroRedundancyOptimizer and isinstance(base_optimizer, ZeroRedundancyOptimizer):
            raise TypeError(
                "modeopt: ZeroRedundancyOptimizer is not supported as base optimizer: it partitions the "
                "parameter set across ranks once, and the switch to mode space replaces that set. Use the "
                "plain optimizer: after the switch its state is that of M scalars, nothing left to shard "
                f"({_UNSUPPORTED_DOC})")
    return model, ddp
