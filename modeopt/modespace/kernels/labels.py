"""Compact mode labels: their dtype, their reading as indices, and the checks before a kernel reads them.

A mode space of M modes stores one label per weight in ``[0, M)``, compact on every device and path:
uint8 for ``M <= 256``, int16 holding uint16 values for ``M <= 65536``, int32 beyond
(:func:`label_dtype`). :func:`as_index` reads any of them as int32/int64 indices.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["label_dtype", "as_index", "check_labels", "check_sizes"]


def label_dtype(n_modes: int) -> torch.dtype:
    """The label dtype of a mode space with ``n_modes`` modes, on every device and path:
    uint8 (``n_modes <= 256``), int16 holding uint16 values (``<= 65536``), else int32."""
    if n_modes <= 256:
        return torch.uint8
    if n_modes <= 65536:
        return torch.int16  # read as uint16 by the C code; torch ops see it through as_index
    return torch.int32


def as_index(labels: Tensor) -> Tensor:
    """Labels as an index tensor on their device: int32/int64 labels as they are, uint8 as int32,
    int16 as the uint16 values they hold (int32, ``& 0xFFFF``: modes up to 65535)."""
    if labels.dtype in (torch.int32, torch.int64):
        return labels
    if labels.dtype == torch.int16:
        return labels.to(torch.int32) & 0xFFFF
    return labels.to(torch.int32)


def check_sizes(what: str, *lists: Sequence[Tensor]) -> None:
    """Raise ``ValueError`` unless every list has one tensor per weight tensor and the tensors of one
    weight agree in their number of elements (``what`` names the pass in the message)."""
    if len({len(x) for x in lists}) != 1:
        raise ValueError(f"{what}: got {[len(x) for x in lists]} tensors per argument; they must agree")
    for j, ts in enumerate(zip(*lists)):
        sizes = [t.numel() for t in ts]
        if len(set(sizes)) != 1:
            raise ValueError(f"{what}: tensor {j} has arguments of {sizes} elements; they must agree")


#: id(label tensor) -> (weakref, version, data_ptr, numel, 1 + largest label): label tensors already
#: checked, so that a check costs a host sync once per tensor, not once per step.
_checked: dict[int, tuple] = {}


def _version(t: Tensor) -> int:
    # Tensor._version (the autograd in-place version counter) is the only way torch offers to tell
    # that a tensor was modified in place since it was checked; no public API exposes it. Without it
    # every check would re-read the labels: a pass over N and a host sync per step.
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return -1


def _known(lab: Tensor) -> tuple | None:
    entry = _checked.get(id(lab))
    if (entry is None or entry[0]() is not lab or entry[1] != _version(lab) or entry[2] != lab.data_ptr()
            or entry[3] != lab.numel()):
        return None
    return entry


def check_labels(labels: Sequence[Tensor], n_modes: int, what: str = "labels") -> None:
    """Raise ``ValueError`` unless every tensor of ``labels`` is an integer tensor whose values lie in
    ``[0, n_modes)`` (messages name ``what[j]``).

    The fused kernels index per-mode arrays by label without a bound check, so an out-of-range
    label would read or write outside them. A tensor is checked once (all new tensors together:
    one host sync); later calls with the same tensor, unmodified, cost a dictionary look-up.
    """
    fresh = [(j, lab) for j, lab in enumerate(labels) if _known(lab) is None]
    for j, lab in fresh:
        if lab.is_floating_point() or lab.is_complex() or lab.dtype == torch.bool:
            raise ValueError(f"{what}[{j}] must be an integer tensor, got {lab.dtype}")
    stats = [(idx.min(), idx.max()) if idx.numel() else (idx.new_zeros(()), idx.new_full((), -1))
             for idx in ((lab if lab.dtype == torch.uint8 else as_index(lab)) for _, lab in fresh)]  # no int32 copy
    if stats:
        dev = stats[0][0].device
        values = torch.stack([torch.stack([lo.to(torch.int64), hi.to(torch.int64)]).to(dev) for lo, hi in stats])
        for (j, lab), (low, top) in zip(fresh, values.tolist()):
            if low < 0:
                raise ValueError(f"{what}[{j}] holds a negative mode label ({low})")
            key = id(lab)
            _checked[key] = (weakref.ref(lab, lambda _, k=key: _checked.pop(k, None)), _version(lab),
                             lab.data_ptr(), lab.numel(), top + 1)
    for j, lab in enumerate(labels):
        top = _checked[id(lab)][4]
        if top > n_modes:
            raise ValueError(f"{what}[{j}] holds mode label {top - 1}, but there are only {n_modes} modes "
                             f"(labels must lie in [0, {n_modes}))")
