"""Which implementations the mode-space passes may use, and the warning when a fused one cannot.

The fused implementations (the C kernels on CPU, the Triton kernels on CUDA) are in use unless
:class:`use_fused` turns them off for a block or ``MODEOPT_KERNELS=torch`` is in the environment;
then every device runs the torch reference (:mod:`modeopt.modespace.kernels.reference`).
"""

from __future__ import annotations

import os

__all__ = ["KernelWarning", "use_fused", "enabled", "torch_only"]


class KernelWarning(RuntimeWarning):
    """A fused kernel could not be built, loaded or verified: the torch reference runs instead.

    Issued at most once per process for the CPU library and once per CUDA device for Triton."""


_enabled = True


def enabled() -> bool:
    """False inside a ``use_fused(False)`` block."""
    return _enabled


def torch_only() -> bool:
    """Whether every device must run the torch reference: ``use_fused(False)`` or ``MODEOPT_KERNELS=torch``."""
    return not _enabled or os.environ.get("MODEOPT_KERNELS", "auto") == "torch"


class use_fused:
    """Context manager: ``use_fused(False)`` turns the fused kernels off in a block (e.g. to time or
    test the torch reference beside them): the operators then run the torch reference on every
    device, the Triton kernels included. Labels stay compact either way. Not thread-local."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self):
        """Set the switch; the value before is restored on exit."""
        global _enabled
        self._before, _enabled = _enabled, self.enabled
        return self

    def __exit__(self, *exc):
        """Restore the switch as it was on entry."""
        global _enabled
        _enabled = self._before
