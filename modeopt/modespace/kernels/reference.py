"""The torch reference of the four mode-space passes: device-generic torch operations.

Every fused implementation (C on CPU, Triton on CUDA) is tested against these, and they run
wherever no fused one applies. Arguments are per-tensor lists of one device; labels are compact
(:func:`modeopt.modespace.kernels.labels.label_dtype`) and lie in ``[0, M)``; nothing synchronises with the
host. On CPU, index and value temporaries live in reused buffers (large allocations page-fault on
every step otherwise; on accelerators the caching allocator reuses memory anyway).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .encoding import is_packed, unpack_labels
from .labels import as_index

__all__ = ["reduce", "update", "welford", "assign", "form", "segment_sum", "unpacked"]

#: (kind, dtype) -> a reusable CPU buffer.
_scratch: dict[tuple, Tensor] = {}


def _buffer(kind: str, like: Tensor, dtype: torch.dtype, n: int) -> Tensor | None:
    """``n`` elements of a reused CPU buffer of ``dtype`` (None unless ``like`` is on CPU)."""
    if like.device.type != "cpu":
        return None
    key = (kind, dtype)
    buf = _scratch.get(key)
    if buf is None or buf.numel() < n:
        buf = _scratch[key] = torch.empty(n, dtype=dtype)
    return buf[:n]


def _index(lab: Tensor) -> Tensor:
    """int32/int64 indices of compact labels, in a reusable buffer on CPU (one conversion pass)."""
    if lab.dtype in (torch.int32, torch.int64):
        return lab
    buf = _buffer("index", lab, torch.int32, lab.numel())
    if buf is None:
        return as_index(lab)
    buf.copy_(lab)
    if lab.dtype == torch.int16:
        buf.bitwise_and_(0xFFFF)
    return buf


def unpacked(lab: Tensor, n: int) -> Tensor:
    """``lab`` as one label per weight: packed 4-bit labels of ``n`` weights unpacked, others as they are."""
    return unpack_labels(lab, n) if is_packed(lab, n) else lab


def segment_sum(values: Tensor, labels: Tensor, n: int) -> Tensor:
    """``(n,)`` float64 ``out[m] = sum(values[labels == m])`` on ``values``' device, deterministic
    (a sequential ``bincount`` on CPU, a stable sort + ``segment_reduce`` elsewhere)."""
    if values.device.type == "cpu":
        # A sequential loop on CPU: deterministic; float64 weights make it accumulate in float64.
        # bincount reads uint8/int32/int64 labels as they are; int16 (holding uint16) is converted.
        labels = _index(labels) if labels.dtype == torch.int16 else labels
        return torch.bincount(labels, weights=values.to(torch.float64), minlength=n)
    # Scatter-add is atomic (order-dependent) on accelerators; a stable sort fixes the order.
    labels = as_index(labels).to(torch.int64)
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels, minlength=n)
    return torch.segment_reduce(values.to(torch.float64)[order], "sum", lengths=counts)


def reduce(grads: Sequence[Tensor | None], a: Sequence[Tensor], labels: Sequence[Tensor], n_modes: int,
           scales: Sequence[Tensor] | None = None) -> Tensor:
    """``(n_modes,)`` float64 ``sum_{i: label_i = m} a_i g_i`` over the tensors (``None`` grads skipped,
    with their ``a`` and labels); each ``a_i g_i`` is rounded once to float32, as in the fused kernels.
    Grads of any shape and float dtype; ``a`` flat, of the grad's ``numel``.

    With ``scales`` (the 8-bit encoding, :mod:`~modeopt.modespace.kernels.encoding`): ``a`` are int8
    codes, labels may be packed, and tensor ``t`` adds ``scales[t][m] * sum float32(q_i g_i)`` (float64)."""
    rows = range(len(grads))
    items = [j for j in rows if grads[j] is not None]
    if not items:
        return torch.zeros(n_modes, dtype=torch.float64, device=a[0].device)
    out = torch.zeros(n_modes, dtype=torch.float64, device=grads[items[0]].device)
    for j in items:
        g, x = grads[j].reshape(-1), a[j]
        lab = unpacked(labels[j], g.numel())
        part = segment_sum(g.to(torch.float32) * x.to(torch.float32), lab, n_modes)
        out += part if scales is None else part * scales[j].to(torch.float64)
    return out


def update(weights: Sequence[Tensor], a: Sequence[Tensor], labels: Sequence[Tensor], delta: Tensor,
           scales: Sequence[Tensor] | None = None) -> None:
    """In place: ``w += a * delta[label]`` for every tensor, in float32 (bf16/fp16 weights rounded
    once at the end, as the Triton kernels do). Weights of any shape and layout: labels follow the
    logical (row-major) order; ``delta`` is ``(M,)``.

    With ``scales`` (8-bit encoding): ``a`` are int8 codes and tensor ``t`` moves by
    ``float32(q * d_t[label])`` with ``d_t = float32(scales[t] * delta)``; labels may be packed."""
    d32 = delta.to(torch.float32)
    for j, (w, x, lab) in enumerate(zip(weights, a, labels)):
        idx = _index(unpacked(lab, w.numel()))
        d = d32 if scales is None else scales[j].to(torch.float32) * d32
        if w.dtype == torch.float32:
            buf = _buffer("values", w, torch.float32, w.numel())
            buf = torch.index_select(d, 0, idx) if buf is None else torch.index_select(d, 0, idx, out=buf)
            if w.is_contiguous():
                w.view(-1).addcmul_(buf, x.to(torch.float32))
            else:  # e.g. channels_last: labels follow the logical (row-major) order
                w.add_((buf * x.to(torch.float32)).view(w.shape))
        else:
            new = w.reshape(-1).to(torch.float32) + x.to(torch.float32) * d[idx]
            w.copy_(new.view(w.shape))


def welford(flat: Sequence[Tensor], mean: Sequence[Tensor], comoment: Sequence[Tensor], labels: Sequence[Tensor],
            dr: Tensor, n: int) -> None:
    """One Welford/Chan sample in place, in float64: ``dw = w - mean; mean += dw / n;
    comoment += dw * dr[label]`` (``mean``, ``comoment`` flat float64; ``dr`` ``(M,)`` float64)."""
    for w, mu, com, lab in zip(flat, mean, comoment, labels):
        dw = w.reshape(-1).to(torch.float64) - mu
        mu.add_(dw, alpha=1.0 / n)
        com.addcmul_(dw, dr[as_index(lab)])


def assign(weights: Sequence[Tensor], a: Sequence[Tensor], b: Sequence[Tensor], labels: Sequence[Tensor],
           r: Tensor) -> None:
    """In place: ``w = a * r[label] + b`` for every tensor, computed in float32 (``a``, ``b`` flat;
    ``r`` ``(M,)``)."""
    rr = r.to(torch.float32)
    for w, x, y, lab in zip(weights, a, b, labels):
        new = torch.addcmul(y.to(torch.float32), x.to(torch.float32), rr[as_index(lab)])
        w.copy_(new.view(w.shape))


def form(weights: Sequence[Tensor], a: Sequence[Tensor], labels: Sequence[Tensor], delta: Tensor,
         scales: Sequence[Tensor] | None = None) -> list[Tensor]:
    """Out of place: ``(float32(w) + float32(a) * float32(delta)[label]).to(w.dtype)`` per tensor, a new
    contiguous tensor of ``w``'s shape and dtype: the sum is formed in float32 (the product rounded,
    then the add) and rounded once. Weights of any shape and layout (labels follow the logical,
    row-major order); ``delta`` is ``(M,)``. With ``scales`` (8-bit encoding), as :func:`update`:
    ``a`` are int8 codes and tensor ``t`` reads ``d_t = float32(scales[t] * delta)``; labels may be packed."""
    d32 = delta.to(torch.float32)
    out = []
    for j, (w, x, lab) in enumerate(zip(weights, a, labels)):
        d = d32 if scales is None else scales[j].to(torch.float32) * d32
        prod = x.to(torch.float32) * d[as_index(unpacked(lab, w.numel())).to(torch.int64)]
        out.append((w.reshape(-1).to(torch.float32) + prod).to(w.dtype).view(w.shape))
    return out
