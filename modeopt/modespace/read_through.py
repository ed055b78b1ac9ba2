"""The autograd function of a mode space's forward: the weights in, their gradients reduced onto the modes."""

from __future__ import annotations

import torch
from torch import Tensor

from modeopt.modespace import kernels

__all__ = ["ReadThrough"]


class ReadThrough(torch.autograd.Function):
    """Forward: the stored weights themselves. Backward: their gradients reduced onto the modes.

    One node serves a group of consecutive weights on one device (see ``ModeSpace.GROUP_ELEMENTS``):
    one fused reduction call per group rather than per tensor, while at most one group's weight
    gradients wait for their reduction at any time.

    Under ``torch.compile`` the inputs are tensors and ints only (``r, n_modes, None, kinds, *weights, *a,
    *labels[, *scales]``, ``kinds`` = 3, or 4 with the scales of the 8-bit encoding) and the backward is one call of the ``modeopt::mode_reduce`` operator, so Dynamo traces
    it (the operator is opaque to the compiler, with a fake implementation for shapes). In eager
    mode ``a`` and the labels come as one non-tensor argument (``stash``): fewer inputs, a cheaper
    ``apply``; the backward then calls :func:`modeopt.modespace.kernels.reduce` (the same implementations).
    """

    @staticmethod
    def forward(ctx, r: Tensor, n_modes: int, stash: tuple | None, kinds: int, *tensors: Tensor):  # noqa: D401
        """The weights as they are (views): the stored ones, or the formed half-precision ones."""
        if stash is None:  # traced by torch.compile: tensors = weights, a, labels[, scales] (n each)
            n = len(tensors) // kinds
            weights = tensors[:n]
            ctx.save_for_backward(*tensors[n:])
        else:
            # Eager: ``stash = (a, labels)`` of the group, long-lived tensors that are never modified,
            # so plain references do; fewer inputs keep apply() cheap. (Saved tensors would also go
            # through saved-tensor hooks: non-reentrant activation checkpointing re-runs a
            # submodule's swap in backward and would count them as extra saved tensors.)
            weights = tensors
        ctx.stash, ctx.n_inputs, ctx.kinds = stash, len(tensors), kinds
        ctx.n_modes, ctx.r_dtype, ctx.r_device = n_modes, r.dtype, r.device
        ctx.set_materialize_grads(False)  # a weight the forward did not use gets None, not zeros
        return tuple(w.view_as(w) for w in weights)

    @staticmethod
    def backward(ctx, *grads: Tensor | None):
        """``dL/dr``: the weights' gradients reduced onto the modes (nothing for the weights themselves)."""
        none = (None,) * ctx.n_inputs
        if ctx.stash is None:  # compiled: dense gradients (Dynamo refuses to read .layout here)
            saved = ctx.saved_tensors
            n = len(saved) // (ctx.kinds - 1)
            scales = list(saved[2 * n:]) if ctx.kinds == 4 else []
            g_r = torch.ops.modeopt.mode_reduce(list(grads), list(saved[:n]), list(saved[n:2 * n]), ctx.n_modes,
                                                scales)
            return (g_r.to(device=ctx.r_device, dtype=ctx.r_dtype), None, None, None) + none
        # A sparse gradient (nn.Embedding(sparse=True)) is densified: the reduction reads every row.
        grads = [g.to_dense() if g is not None and g.layout != torch.strided else g for g in grads]
        ctx.stash[2]._notice_copy_trained()
        g_r = kernels.reduce(grads, ctx.stash[0], ctx.stash[1], ctx.n_modes, ctx.stash[3])
        return (g_r.to(device=ctx.r_device, dtype=ctx.r_dtype), None, None, None) + none
