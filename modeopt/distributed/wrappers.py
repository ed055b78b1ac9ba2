"""Which data-parallel set-ups :class:`~modeopt.CMDOptimizer` runs under: a
``DistributedDataParallel`` model is unwrapped (and attached by the optimizer); a model sharded by
FSDP2 (``fully_shard``) gets :class:`~modeopt.cmd_optimizer.sharded.ShardedCMDOptimizer`; models sharded
by FSDP1, tensor parallelism (DTensor parameters without ``fully_shard``) or DeepSpeed ZeRO-3 and a
``ZeroRedundancyOptimizer`` base are refused with a reason.

Used by the optimizer at construction and by :mod:`modeopt.distributed.ddp` at each switch (sharding
may be applied after the optimizer was built). Imports torch only.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .ddp_reducer import check_rebuildable

__all__ = ["check_supported", "sharding_wrapper", "uses_fsdp2"]

_UNSUPPORTED_DOC = "see docs/scaling-out.md"
FSDP2 = "fully_shard (FSDP2)"


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
            return FSDP2
    for p in model.parameters():
        if DTensor and isinstance(p, DTensor):
            return "DTensor parameters (FSDP2 / tensor parallelism)"
        if hasattr(p, "ds_id"):
            return "DeepSpeed ZeRO-3"
    return None


def uses_fsdp2(model: nn.Module) -> bool:
    """Whether ``model`` (or a submodule) was sharded by FSDP2's ``fully_shard``."""
    return sharding_wrapper(model) == FSDP2


def check_supported(model: nn.Module, base_optimizer: torch.optim.Optimizer | None = None, *,
                    fsdp2_ok: bool = False) -> tuple[nn.Module, DistributedDataParallel | None]:
    """Unwrap a ``DistributedDataParallel`` model and refuse what mode space cannot run on.

    Returns ``(module, ddp)``: the module to put into mode space and the DDP wrapper (or None).

    Raises ``TypeError`` for parameter-sharding wrappers (FSDP1, DTensor parameters without
    ``fully_shard``, DeepSpeed ZeRO-3; FSDP2 ``fully_shard`` unless ``fsdp2_ok``: it is served by
    ``ShardedCMDOptimizer``, which ``CMDOptimizer(...)`` returns for such a model, but not by a
    CMDOptimizer built before the model was sharded) and for ``ZeroRedundancyOptimizer`` as base
    optimizer: the DDP path of mode space keeps every embedded weight as a plain local tensor that
    it updates in place and swaps into its module during the forward, which a sharding wrapper owns,
    and ZeRO partitions the parameter set that the switch replaces.
    """
    ddp = None
    if isinstance(model, DistributedDataParallel):
        ddp, model = model, model.module
        check_rebuildable(ddp)
    found = sharding_wrapper(model)
    if found == FSDP2 and not fsdp2_ok:
        raise TypeError(
            "modeopt: the model was sharded by fully_shard (FSDP2) after this CMDOptimizer was built (or under "
            "DistributedDataParallel): build modeopt.CMDOptimizer on the fully_shard-ed model, which gives the "
            f"sharded optimizer ({_UNSUPPORTED_DOC})")
    if found is not None and found != FSDP2:
        raise TypeError(
            f"modeopt: the model is sharded by {found}, which CMDOptimizer does not support: mode space "
            "maintains every embedded weight in place as a plain local tensor and swaps it into its module "
            "in the forward, and a sharding wrapper owns and replaces exactly those tensors. Use "
            "fully_shard (FSDP2) or DistributedDataParallel (after the switch each rank holds 9 bytes per embedded "
            f"weight and all-reduces M numbers per step; {_UNSUPPORTED_DOC})")
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
