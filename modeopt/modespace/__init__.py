"""Layer 3 - the mode-space mechanism: every embedded weight is ``a_i * r[m(i)] + b_i``
(:class:`ModeSpace`), built from a decomposition at the switch (:mod:`.switch`), with the step's passes
as ``torch.library`` operators (:mod:`.kernels`: C on CPU, Triton on CUDA, a torch reference)."""

from .space import ModeSpace, drop_r_entries, r_never_missing

__all__ = ["ModeSpace"]

# A model pickled whole (``torch.save(model)``) in mode space before the package moved into folders
# names its state-dict hooks ``modeopt.modespace._drop_r`` / ``_r_not_missing``: they stay findable.
_drop_r = drop_r_entries
_r_not_missing = r_never_missing
