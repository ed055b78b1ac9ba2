"""The compact encoding of a mode space: 8-bit coefficients and 4-bit labels.

With ``coef_dtype=torch.int8`` a mode space stores, per embedded tensor ``t``:

* ``q``: ``(numel,)`` int8 codes in ``[-127, 127]``, one per weight;
* ``scale``: ``(M,)`` float32, one per mode: ``max |a_i|`` over the tensor's weights of that mode,
  divided by 127 (0 for a mode the tensor does not hold);
* labels packed two per byte when ``M <= 16`` (:func:`pack_labels`), else the usual compact labels.

The coefficient of weight ``i`` of mode ``m`` in tensor ``t`` is ``a_i = q_i * scale[t, m]``
(:func:`dequantize`). The kernels never form it: ``mode_update`` scales the change of ``r`` per
tensor first (``d_t = float32(scale_t * delta)``, ``M`` multiplications) and then adds
``float32(q_i * d_t[m])``; ``mode_reduce`` sums ``float32(q_i * g_i)`` per mode in float64 and
multiplies the tensor's sums by ``scale_t`` (float64). So per weight the kernels read 1 byte of
``q`` and half a byte of label: 1.5 bytes (plus ``4 M`` bytes of scales per tensor).

Packed labels are a uint8 tensor of ``ceil(n / 2)`` bytes: weight ``2j`` in the low nibble of byte
``j``, weight ``2j + 1`` in the high nibble (the last high nibble of an odd ``n`` is 0). The
kernels recognise them by their size (``ceil(n / 2)`` bytes for ``n`` weights); for ``n = 1`` both
layouts are the same byte.

Quantising at the switch changes only the direction in which each weight moves (``q * scale``
instead of ``a``), never the weights: they keep their values and later move by ``q * scale * dr``,
so the model is exactly ``w = q * scale * r + b`` with ``b = w_switch - q * scale * r_switch``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .labels import as_index

__all__ = ["CODE_MAX", "PACK_MAX_MODES", "packs_labels", "pack_labels", "unpack_labels", "is_packed",
           "quantize", "dequantize", "storage_bytes"]

#: Largest code magnitude (symmetric: -127..127, so ``-q`` is always a code).
CODE_MAX = 127
#: Label packing (4 bits per weight) applies up to this many modes.
PACK_MAX_MODES = 16
#: values :func:`quantize` works on at once
QUANTIZE_CHUNK = 1 << 18


def packs_labels(coef_dtype: torch.dtype, n_modes: int) -> bool:
    """Whether a mode space of ``n_modes`` modes with ``coef_dtype`` packs its labels 4 bits per weight."""
    return coef_dtype == torch.int8 and n_modes <= PACK_MAX_MODES


def is_packed(labels: Tensor, n: int) -> bool:
    """Whether ``labels`` are packed labels of ``n`` weights (uint8 of ``ceil(n / 2)`` bytes, ``n >= 2``)."""
    return n >= 2 and labels.dtype == torch.uint8 and labels.numel() == (n + 1) // 2


def pack_labels(index: Tensor) -> Tensor:
    """``(ceil(n/2),)`` uint8: labels in ``[0, 16)`` (any integer dtype, flat) two per byte, on their device."""
    x = index.reshape(-1).to(torch.uint8)
    if x.numel() % 2:
        x = torch.cat([x, x.new_zeros(1)])
    return (x[0::2] | (x[1::2] << 4)).contiguous()


def unpack_labels(packed: Tensor, n: int) -> Tensor:
    """``(n,)`` uint8 labels from :func:`pack_labels` output (``packed`` of ``ceil(n/2)`` bytes)."""
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"packed labels of {n} weights take {(n + 1) // 2} bytes, got {packed.numel()}")
    return torch.stack([packed & 15, packed >> 4], dim=1).reshape(-1)[:n].contiguous()


@torch.no_grad()
def quantize(a: Tensor, index: Tensor, n_modes: int) -> tuple[Tensor, Tensor]:
    """8-bit codes of one tensor's coefficients with a scale per mode: ``(q, scale)``.

    Args:
        a: ``(n,)`` float coefficients; index: ``(n,)`` their modes in ``[0, n_modes)``: an index tensor or
            compact labels (:func:`~modeopt.modespace.kernels.labels.as_index` reads them, a chunk at a time).
    Returns:
        ``q``: ``(n,)`` int8, ``round(a / scale[m])`` (half to even) clamped to ``[-127, 127]``;
        ``scale``: ``(n_modes,)`` float32, ``max |a|`` of each mode / 127 (0 where a mode has no
        weight here or only zeros, whose codes are then 0). Deterministic (a max does not depend on
        the order it is taken in). Temporaries are :data:`QUANTIZE_CHUNK` values at a time (a switch
        quantises an embedding matrix while the rest of the model's codes are held).
    """
    a = a.reshape(-1)
    index = index.reshape(-1)
    n = a.numel()
    amax = torch.zeros(n_modes, dtype=torch.float32, device=a.device)
    for i0 in range(0, n, QUANTIZE_CHUNK):
        idx = as_index(index[i0 : i0 + QUANTIZE_CHUNK]).to(device=a.device, dtype=torch.int64)
        amax.scatter_reduce_(0, idx, a[i0 : i0 + QUANTIZE_CHUNK].to(torch.float32).abs(), reduce="amax",
                             include_self=True)
    scale = amax / CODE_MAX
    q = torch.empty(n, dtype=torch.int8, device=a.device)
    for i0 in range(0, n, QUANTIZE_CHUNK):
        x = a[i0 : i0 + QUANTIZE_CHUNK].to(torch.float32)
        per = scale[as_index(index[i0 : i0 + QUANTIZE_CHUNK]).to(device=a.device, dtype=torch.int64)]
        safe = torch.where(per > 0, per, torch.ones_like(per))
        q[i0 : i0 + QUANTIZE_CHUNK] = torch.where(per > 0, torch.round(x / safe), torch.zeros_like(x)).clamp_(
            -CODE_MAX, CODE_MAX)
    return q, scale


def dequantize(q: Tensor, scale: Tensor, index: Tensor) -> Tensor:
    """``(n,)`` float32 ``q * scale[m]`` (rounded once to float32): the coefficients the codes stand for."""
    return q.to(torch.float32) * scale.to(torch.float32)[index.reshape(-1).to(torch.int64)]


def storage_bytes(a: Sequence[Tensor], labels: Sequence[Tensor], scales: Sequence[Tensor] | None = None) -> dict:
    """Bytes of a mode space's per-weight storage, read from the tensors themselves.

    Returns ``{"weights", "a", "labels", "scales", "total", "a_per_weight", "labels_per_weight",
    "total_per_weight"}`` (``total`` = a + labels + scales; per-weight figures divide by the number
    of embedded weights, the ``numel`` of ``a``)."""
    n = sum(x.numel() for x in a)
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    out = {"weights": n, "a": nbytes(a), "labels": nbytes(labels), "scales": nbytes(scales or [])}
    out["total"] = out["a"] + out["labels"] + out["scales"]
    for k in ("a", "labels", "total"):
        out[f"{k}_per_weight"] = out[k if k != "total" else "total"] / max(1, n)
    out["scales_per_weight"] = out["scales"] / max(1, n)
    return out
