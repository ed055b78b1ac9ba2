"""Layer 3 - the mode-space mechanism: every embedded weight is ``a_i * r[m(i)] + b_i``
(:class:`ModeSpace`), built from a decomposition at the switch (:mod:`.switch`), with the step's passes
as ``torch.library`` operators (:mod:`.kernels`: C on CPU, Triton on CUDA, a torch reference)."""

from .space import ModeSpace

__all__ = ["ModeSpace"]
