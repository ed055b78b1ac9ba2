"""Moving tensors between devices without a host synchronisation where that is safe."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["to_device"]


def to_device(x: Tensor, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """``x`` on ``device`` (and in ``dtype``). A copy to an accelerator is ``non_blocking`` (ordered on
    its current stream); a copy to the CPU blocks, since a CPU op would otherwise read it before it landed."""
    return x.to(device=device, dtype=dtype, non_blocking=device.type != "cpu")
