"""What :class:`~modeopt.BlockwiseCMD` does with NaN/inf in a step (docs/finetuning.md, "NaN/inf,
checkpoints and arguments"): a non-finite gradient skips the whole step as ``GradScaler`` does, NaN/inf
in the weights is an error naming the tensor, an overflowing ``r`` is put back.

:class:`BlockwiseNonFinite` is a mixin of ``BlockwiseCMD``: it reads its ``model``, ``base``,
``spaces``, ``_step`` and the counters ``skipped_steps`` / ``r_restores``.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from modeopt.optim.nonfinite import NonFiniteWarning, SkipsNonFiniteSteps, finite

__all__ = ["BlockwiseNonFinite"]


class BlockwiseNonFinite(SkipsNonFiniteSteps):
    """The step's NaN/inf policy: checks, the skip, the put-back of an overflowing ``r``."""

    _warned_restore: bool = False

    def _sync_finite(self) -> None:
        for space in self.spaces:  # the weights follow r before every evaluation (e.g. LBFGS's line search)
            space.sync(finite_only=True)

    def _names(self) -> dict[int, str]:
        return {id(p): n for n, p in self.model.named_parameters()}

    @torch.no_grad()
    def _check_new_values(self, trained: list[Tensor]) -> None:
        """After the base step (finite gradients): a finished block's ``r`` that overflowed is put back
        to the value its weights hold; a trained weight that did is an error naming it."""
        if finite(trained):  # one host sync per device, the usual case
            return
        step = self._step + 1
        restored = []
        for b, space in enumerate(self.spaces):
            if finite(space.r_params):
                continue
            restored.append(b)
            for value, p in zip(space.group_values(space.r_in_weights), space.r_params):
                p.copy_(value.to(device=p.device, dtype=p.dtype))
                st = self.base.state.get(p)
                if st and not finite([v for v in st.values() if isinstance(v, Tensor) and v.is_floating_point()]):
                    self.base.state.pop(p)  # a fresh state: Adam's moments of an inf step are inf/NaN
        r_ids = {id(p) for space in self.spaces for p in space.r_params}
        names = self._names()
        for p in trained:
            if id(p) not in r_ids and not finite([p]):
                raise ValueError(
                    f"modeopt: step {step}: parameter {names.get(id(p), '?')!r} is NaN/inf after the step, from a "
                    "finite gradient: the step overflowed (lower the learning rate, clip gradients), a later "
                    "evaluation of the closure returned NaN/inf (LBFGS's line search: check the loss), or the weight "
                    "held NaN/inf before it (check the weights you loaded). The weights now hold it: resume from "
                    "a checkpoint")
        if restored:
            self.r_restores += 1
            if not self._warned_restore:
                self._warned_restore = True
                warnings.warn(
                    f"modeopt: step {step}: block {restored[0]}'s mode scalars r overflowed to NaN/inf from a finite "
                    "gradient: put back to the value its weights hold (its non-finite optimizer state dropped), so "
                    "the block did not move this step; the rest of the step was applied and counted. Lower the "
                    "learning rate. Later ones are counted in opt.r_restores without a warning",
                    NonFiniteWarning, stacklevel=4)
