"""The four passes of a mode-space step as ``torch.library`` operators: one dispatch point each.

=========================================  ==============================================================
operator                                   meaning
=========================================  ==============================================================
``modeopt::mode_reduce(grads, a, labels,   ``(n_modes,)`` float64 ``sum_{i: label_i = m} a_i g_i`` over the
n_modes, scales) -> Tensor``               tensors (``None`` grads skipped); deterministic
``modeopt::mode_update(weights!, a,        ``w += a * delta[label]`` in place
labels, delta, scales)``
``modeopt::welford_sample(weights, mean!,  one Welford/Chan sample of float64 moments in place
comoment!, labels, dr, n)``
``modeopt::mode_assign(weights!, a, b,     ``w = a * r[label] + b`` in place
labels, r)``
``modeopt::mode_form(weights, a, labels,   per tensor a new ``(w + a * delta[label]).to(w.dtype)``,
delta, scales) -> Tensor[]``               summed in float32 and rounded once (half-precision forward)
=========================================  ==============================================================

``scales`` is empty for float32/bfloat16 ``a``. For the 8-bit encoding
(:mod:`modeopt.modespace.kernels.encoding`) it holds one ``(M,)`` float32 scale per tensor, ``a`` holds
int8 codes (``a_i = q_i * scales[t][m]``) and labels may be packed two per byte (recognised by their
size, ``ceil(numel / 2)`` bytes).

Implementations, chosen by the dispatcher from the tensors' device:

* **CPU** - :mod:`modeopt.modespace.kernels.cpu`: the fused C kernels when usable (float32 weights;
  float32/bf16/fp16 grads for ``mode_reduce``, bf16/fp16 weights for ``mode_form``; contiguous,
  compact labels), else the torch reference;
* **CUDA** - :mod:`modeopt.modespace.kernels.cuda`: the Triton kernels when Triton imports and the case is
  covered (fp32/bf16/fp16 weights, fp32/bf16 ``a``, contiguous, ``mode_reduce`` up to
  ``MAX_REDUCE_MODES`` modes), else the torch reference (a non-contiguous weight, e.g.
  channels_last, takes the reference alone);
* **any other device** - :mod:`modeopt.modespace.kernels.reference` (device-generic torch operations).

``kernels.use_fused(False)`` and ``MODEOPT_KERNELS=torch`` select the torch reference on every
device. No implementation synchronises with the host. Each operator has a fake implementation
(``register_fake``), so ``torch.compile`` traces through them without running them: an embedded
model's backward calls ``mode_reduce`` as one opaque node. Every tensor of one call lives on one
device (a model spread over devices gets one call per device).

The operators are registered when :mod:`modeopt.modespace.kernels` is imported (``import modeopt`` does).
Call them through ``modeopt.modespace.kernels.reduce/update/welford/assign`` (which add the size and label
range checks of ``welford``/``assign``) or as ``torch.ops.modeopt.*``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import cpu, cuda, reference

__all__ = ["mode_reduce", "mode_update", "welford_sample", "mode_assign", "mode_form"]


# ------------------------------------------------------------------------------------ mode_reduce
@torch.library.custom_op("modeopt::mode_reduce", mutates_args=())
def mode_reduce(grads: list[Optional[Tensor]], a: list[Tensor], labels: list[Tensor], n_modes: int,
                scales: list[Tensor]) -> Tensor:
    """``(n_modes,)`` float64 on the tensors' device: ``sum_i a_i * g_i`` per mode (None grads skipped)."""
    return reference.reduce(grads, a, labels, n_modes, scales or None)


mode_reduce.register_kernel("cpu")(cpu.reduce)
mode_reduce.register_kernel("cuda")(cuda.reduce)


@mode_reduce.register_fake
def _(grads, a, labels, n_modes, scales):
    like = next((g for g in grads if g is not None), None)
    like = a[0] if like is None else like
    return like.new_empty(n_modes, dtype=torch.float64)


# ------------------------------------------------------------------------------------ mode_update
@torch.library.custom_op("modeopt::mode_update", mutates_args=("weights",))
def mode_update(weights: list[Tensor], a: list[Tensor], labels: list[Tensor], delta: Tensor,
                scales: list[Tensor]) -> None:
    """In place: ``w += a * delta[label]`` for every tensor."""
    reference.update(weights, a, labels, delta, scales or None)


mode_update.register_kernel("cpu")(cpu.update)
mode_update.register_kernel("cuda")(cuda.update)


@mode_update.register_fake
def _(weights, a, labels, delta, scales):
    return None


# --------------------------------------------------------------------------------- welford_sample
@torch.library.custom_op("modeopt::welford_sample", mutates_args=("mean", "comoment"))
def welford_sample(weights: list[Tensor], mean: list[Tensor], comoment: list[Tensor], labels: list[Tensor],
                   dr: Tensor, n: int) -> None:
    """In place, float64: ``dw = w - mean; mean += dw / n; comoment += dw * dr[label]``."""
    reference.welford(weights, mean, comoment, labels, dr, n)


welford_sample.register_kernel("cpu")(cpu.welford)
welford_sample.register_kernel("cuda")(cuda.welford)


@welford_sample.register_fake
def _(weights, mean, comoment, labels, dr, n):
    return None


# ------------------------------------------------------------------------------------ mode_assign
@torch.library.custom_op("modeopt::mode_assign", mutates_args=("weights",))
def mode_assign(weights: list[Tensor], a: list[Tensor], b: list[Tensor], labels: list[Tensor], r: Tensor) -> None:
    """In place: ``w = a * r[label] + b`` for every tensor."""
    reference.assign(weights, a, b, labels, r)


mode_assign.register_kernel("cpu")(cpu.assign)
mode_assign.register_kernel("cuda")(cuda.assign)


@mode_assign.register_fake
def _(weights, a, b, labels, r):
    return None


# -------------------------------------------------------------------------------------- mode_form
@torch.library.custom_op("modeopt::mode_form", mutates_args=())
def mode_form(weights: list[Tensor], a: list[Tensor], labels: list[Tensor], delta: Tensor,
              scales: list[Tensor]) -> list[Tensor]:
    """Out of place: per tensor ``(float32(w) + float32(a) * delta[label]).to(w.dtype)``, contiguous
    (``scales``: the 8-bit encoding's per-tensor ``(M,)`` scales, empty otherwise)."""
    return reference.form(weights, a, labels, delta, scales or None)


mode_form.register_kernel("cpu")(cpu.form)
mode_form.register_kernel("cuda")(cuda.form)


@mode_form.register_fake
def _(weights, a, labels, delta, scales):
    return [torch.empty_like(w, memory_format=torch.contiguous_format) for w in weights]
