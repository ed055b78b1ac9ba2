"""The four passes of a mode-space step as ``torch.library`` operators: one dispatch point each.

=========================================  ==============================================================
operator                                   meaning
=========================================  ==============================================================
``modeopt::mode_reduce(grads, a, labels,   ``(n_modes,)`` float64 ``sum_{i: label_i = m} a_i g_i`` over the
n_modes) -> Tensor``                       tensors (``None`` grads skipped); deterministic
``modeopt::mode_update(weights!, a,        ``w += a * delta[label]`` in place
labels, delta)``
``modeopt::welford_sample(weights, mean!,  one Welford/Chan sample of float64 moments in place
comoment!, labels, dr, n)``
``modeopt::mode_assign(weights!, a, b,     ``w = a * r[label] + b`` in place
labels, r)``
=========================================  ==============================================================

Implementations, chosen by the dispatcher from the tensors' device:

* **CPU** - the fused C kernels of :mod:`modeopt.kernels` when usable (float32 weights, contiguous,
  compact labels), else the torch reference;
* **CUDA** - the Triton kernels of :mod:`modeopt.triton_kernels` when Triton imports and the case is
  covered (fp32/bf16/fp16 weights, fp32/bf16 ``a``, contiguous, ``mode_reduce`` up to
  ``MAX_REDUCE_MODES`` modes), else the torch reference (a non-contiguous weight, e.g.
  channels_last, takes the reference alone);
* **any other device** - the torch reference (device-generic torch operations).

``kernels.use_fused(False)`` and ``MODEOPT_KERNELS=torch`` select the torch reference on every
device. No implementation synchronises with the host. Each operator has a fake implementation
(``register_fake``), so ``torch.compile`` traces through them without running them: an embedded
model's backward calls ``mode_reduce`` as one opaque node. Every tensor of one call lives on one
device (a model spread over devices gets one call per device).

The operators are registered when :mod:`modeopt.kernels` is imported (``import modeopt`` does).
Call them through ``modeopt.kernels.reduce/update/welford/assign`` (the same signatures as before,
with the label range check of ``welford``/``assign``) or as ``torch.ops.modeopt.*``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import kernels as _k

__all__ = ["mode_reduce", "mode_update", "welford_sample", "mode_assign"]


# ------------------------------------------------------------------------------------ mode_reduce
@torch.library.custom_op("modeopt::mode_reduce", mutates_args=())
def mode_reduce(grads: list[Optional[Tensor]], a: list[Tensor], labels: list[Tensor], n_modes: int) -> Tensor:
    """``(n_modes,)`` float64 on the tensors' device: ``sum_i a_i * g_i`` per mode (None grads skipped)."""
    return _k._reduce_torch(grads, a, labels, n_modes)


mode_reduce.register_kernel("cpu")(_k._reduce_cpu)
mode_reduce.register_kernel("cuda")(_k._reduce_cuda)


@mode_reduce.register_fake
def _(grads, a, labels, n_modes):
    like = next((g for g in grads if g is not None), None)
    like = a[0] if like is None else like
    return like.new_empty(n_modes, dtype=torch.float64)


# ------------------------------------------------------------------------------------ mode_update
@torch.library.custom_op("modeopt::mode_update", mutates_args=("weights",))
def mode_update(weights: list[Tensor], a: list[Tensor], labels: list[Tensor], delta: Tensor) -> None:
    """In place: ``w += a * delta[label]`` for every tensor."""
    _k._update_torch(weights, a, labels, delta)


mode_update.register_kernel("cpu")(_k._update_cpu)
mode_update.register_kernel("cuda")(_k._update_cuda)


@mode_update.register_fake
def _(weights, a, labels, delta):
    return None


# --------------------------------------------------------------------------------- welford_sample
@torch.library.custom_op("modeopt::welford_sample", mutates_args=("mean", "comoment"))
def welford_sample(weights: list[Tensor], mean: list[Tensor], comoment: list[Tensor], labels: list[Tensor],
                   dr: Tensor, n: int) -> None:
    """In place, float64: ``dw = w - mean; mean += dw / n; comoment += dw * dr[label]``."""
    _k._welford_torch(weights, mean, comoment, labels, dr, n)


welford_sample.register_kernel("cpu")(_k._welford_cpu)
welford_sample.register_kernel("cuda")(_k._welford_cuda)


@welford_sample.register_fake
def _(weights, mean, comoment, labels, dr, n):
    return None


# ------------------------------------------------------------------------------------ mode_assign
@torch.library.custom_op("modeopt::mode_assign", mutates_args=("weights",))
def mode_assign(weights: list[Tensor], a: list[Tensor], b: list[Tensor], labels: list[Tensor], r: Tensor) -> None:
    """In place: ``w = a * r[label] + b`` for every tensor."""
    _k._assign_torch(weights, a, b, labels, r)


mode_assign.register_kernel("cpu")(_k._assign_cpu)
mode_assign.register_kernel("cuda")(_k._assign_cuda)


@mode_assign.register_fake
def _(weights, a, b, labels, r):
    return None
