"""The memory-bound passes of a mode-space step, each one ``torch.library`` operator with a fused
implementation per device and a torch reference everywhere.

* :func:`reduce` - ``dL/dr_m = sum_{i: label_i = m} a_i g_i`` over many tensors, float64, deterministic;
* :func:`update` - ``w_i += a_i * delta[label_i]`` in place;

(:func:`reduce` and :func:`update` also read the compact 8-bit encoding of a mode space - int8 ``a``
with a scale per tensor and mode, labels packed 4 bits per weight: :mod:`~modeopt.modespace.kernels.encoding`.)
* :func:`welford` - one Welford/Chan sample of float64 per-weight moments in place;
* :func:`assign` - ``w_i = a_i * r[label_i] + b_i`` in place;
* :func:`form` - ``w_i + a_i * delta[label_i]`` out of place, rounded once (half-precision forward).

Every pass calls its operator (``torch.ops.modeopt.*``, registered by :mod:`modeopt.modespace.kernels.ops`
when this package is imported); the dispatcher picks the implementation for the tensors' device:
on CPU the fused C kernels (:mod:`~modeopt.modespace.kernels.cpu`, built by :mod:`~modeopt.modespace.kernels.c_library`),
on CUDA the Triton kernels (:mod:`~modeopt.modespace.kernels.cuda`), each where it covers the case, else the
torch reference (:mod:`~modeopt.modespace.kernels.reference`). :class:`use_fused` and ``MODEOPT_KERNELS=torch``
select the reference on every device. Labels are compact on every path (:func:`label_dtype`).

Importing this package neither imports Triton (only the first CUDA call does) nor compiles C (the
first CPU call does; a failure there is one :class:`KernelWarning`, never an error).

Module layout: :mod:`~modeopt.modespace.kernels.labels` (label dtype, index view, checks),
:mod:`~modeopt.modespace.kernels.switch` (:class:`use_fused`, :class:`KernelWarning`),
:mod:`~modeopt.modespace.kernels.reference`, :mod:`~modeopt.modespace.kernels.c_library` (with ``fused_cpu.c``),
:mod:`~modeopt.modespace.kernels.cpu`, :mod:`~modeopt.modespace.kernels.triton_kernels`, :mod:`~modeopt.modespace.kernels.cuda`,
:mod:`~modeopt.modespace.kernels.ops`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import cpu, ops  # noqa: F401 - ops registers torch.ops.modeopt.*
from .cpu import fused_available
from .encoding import dequantize, is_packed, pack_labels, packs_labels, quantize, unpack_labels
from .labels import as_index, check_labels, check_sizes, label_dtype
from .switch import KernelWarning, use_fused

__all__ = ["reduce", "update", "welford", "assign", "form", "fused_available", "use_fused", "label_dtype", "as_index",
           "check_labels", "KernelWarning", "CPU_DIRECT", "quantize", "dequantize", "pack_labels", "unpack_labels",
           "packs_labels", "is_packed"]

#: Eager calls on CPU tensors run the operator's CPU implementation directly, skipping the
#: dispatcher's per-call cost (docs/performance.md, "Dispatch cost on CPU"). Under torch.compile,
#: and on every other device, the operator is called. False: always through the operator (tests).
CPU_DIRECT = True


def _direct(t: Tensor) -> bool:
    return CPU_DIRECT and t.device.type == "cpu" and not torch.compiler.is_compiling()


def reduce(grads: Sequence[Tensor | None], a: Sequence[Tensor], labels: Sequence[Tensor], n_modes: int,
           scales: Sequence[Tensor] | None = None) -> Tensor:
    """``(n_modes,)`` float64: ``sum_i a_i * g_i`` per mode over all tensors (``None`` grads skipped).

    The result lives on the tensors' device (on ``a[0]``'s when every grad is None). Each product is
    rounded once to float32; sums are float64 and deterministic (independent of threads and timing).

    Args:
        grads: per tensor, the gradient of the loss w.r.t. the weight (any shape, ``numel`` elements),
            or None.
        a, labels: per tensor, flat coefficients and compact mode labels in ``[0, n_modes)`` of the
            same ``numel``.
        n_modes: M.
        scales: for the 8-bit encoding (:mod:`~modeopt.modespace.kernels.encoding`), per tensor the
            ``(M,)`` float32 scales of its int8 codes ``a`` (its labels may be packed); None otherwise.
    """
    grads, a, labels, scales = list(grads), list(a), list(labels), list(scales or ())
    if not any(g is not None for g in grads):
        return torch.zeros(n_modes, dtype=torch.float64, device=a[0].device if a else "cpu")
    if _direct(a[0]):
        return cpu.reduce(grads, a, labels, int(n_modes), scales)
    return torch.ops.modeopt.mode_reduce(grads, a, labels, int(n_modes), scales)


@torch.no_grad()
def update(weights: Sequence[Tensor], a: Sequence[Tensor], labels: Sequence[Tensor], delta: Tensor,
           scratch: Tensor | None = None, scales: Sequence[Tensor] | None = None) -> None:
    """``w += a * delta[label]`` for every tensor, in place.

    Args:
        weights: the tensors to update (any shape and layout; contiguous ones take the fused kernels).
        a, labels: per tensor, flat coefficients and compact labels in ``[0, M)``.
        delta: ``(M,)`` change of the mode scalars, on the weights' device.
        scratch: unused (kept for compatibility): the torch path keeps its own reusable buffers.
        scales: for the 8-bit encoding, per tensor the ``(M,)`` float32 scales of its int8 codes ``a``
            (the tensor moves by ``float32(q * float32(scale * delta)[label])``); None otherwise.
    """
    if not len(weights):
        return
    scales = list(scales or ())
    if _direct(delta):
        cpu.update(list(weights), list(a), list(labels), delta, scales)
    else:
        torch.ops.modeopt.mode_update(list(weights), list(a), list(labels), delta, scales)


@torch.no_grad()
def welford(weights: Sequence[Tensor], mean: Sequence[Tensor], comoment: Sequence[Tensor],
            labels: Sequence[Tensor], dr: Tensor, n: int) -> None:
    """One Welford/Chan sample for every tensor, in place, in float64: ``mean += (w - mean) / n`` and
    ``comoment += (w - mean_before) * dr[label]``.

    Args:
        weights: float tensors (any shape), read only; mean, comoment: flat float64 of the same sizes;
        labels: flat compact mode labels; dr: ``(M,)`` float64, the references minus their updated
        means; n: the sample count including this one (``>= 1``).

    Raises ``ValueError`` if sizes disagree or a label lies outside ``[0, M)``.
    """
    flat = [w.detach().reshape(-1) for w in weights]
    check_sizes("welford", flat, mean, comoment, labels)
    check_labels(labels, dr.numel())
    if not flat:
        return
    if _direct(dr):
        cpu.welford(flat, list(mean), list(comoment), list(labels), dr, int(n))
    else:
        torch.ops.modeopt.welford_sample(flat, list(mean), list(comoment), list(labels), dr, int(n))


@torch.no_grad()
def assign(weights: Sequence[Tensor], a: Sequence[Tensor], b: Sequence[Tensor], labels: Sequence[Tensor],
           r: Tensor) -> None:
    """``w = a * r[label] + b`` for every tensor, in place (``a``, ``b`` flat float32; ``r`` ``(M,)``).

    Raises ``ValueError`` if sizes disagree or a label lies outside ``[0, M)``."""
    check_sizes("assign", weights, a, b, labels)
    check_labels(labels, r.numel())
    if not len(weights):
        return
    if _direct(r):
        cpu.assign(list(weights), list(a), list(b), list(labels), r)
    else:
        torch.ops.modeopt.mode_assign(list(weights), list(a), list(b), list(labels), r)


@torch.no_grad()
def form(weights: Sequence[Tensor], a: Sequence[Tensor], labels: Sequence[Tensor], delta: Tensor,
         scales: Sequence[Tensor] | None = None) -> list[Tensor]:
    """Per tensor a new ``(float32(w) + float32(a) * float32(delta)[label]).to(w.dtype)``: the sum in
    float32 (a rounded product, then the add), rounded once to the weight's dtype (to nearest even,
    as torch's ``.to()``), contiguous, of ``w``'s shape. The same bits on every implementation.

    Args:
        weights: the stored (frozen) weights, any shape and float dtype; read only.
        a, labels: per tensor, flat coefficients and compact labels in ``[0, M)``.
        delta: ``(M,)`` change of the mode scalars since the weights' value, on their device.
        scales: the 8-bit encoding, as in :func:`update` (tensor ``t`` reads ``float32(scales[t] * delta)``).
    """
    if not len(weights):
        return []
    scales = list(scales or ())
    if _direct(delta):
        return cpu.form(list(weights), list(a), list(labels), delta, scales)
    return torch.ops.modeopt.mode_form(list(weights), list(a), list(labels), delta, scales)
