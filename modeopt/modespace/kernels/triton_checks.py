"""What the Triton passes (:mod:`modeopt.modespace.kernels.triton_kernels`) accept, and the checks of
their arguments before a launch: dtypes, sizes, contiguity, label widths, the 8-bit encoding's scales
and packed labels (:mod:`modeopt.modespace.kernels.encoding`), one device. Imports no Triton."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import Tensor

from .encoding import PACK_MAX_MODES, is_packed

__all__ = ["WHO", "WEIGHT_DTYPES", "A_DTYPES", "ASSIGN_A_DTYPES", "LABEL_DTYPES", "LABEL_MAX_MODES", "check",
           "check_labels", "check_rows", "check_scales", "same_len", "device_of", "launch_on", "is_packed"]

#: How errors name the module.
WHO = "modeopt.modespace.kernels.triton_kernels"
#: dtypes of weights and grads (computed in float32, stored back in the weight's dtype).
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: dtypes of the coefficients ``a`` (int8: codes of the 8-bit encoding; not in ``assign``).
A_DTYPES = (torch.float32, torch.bfloat16, torch.int8)
#: dtypes of ``a`` in ``assign``.
ASSIGN_A_DTYPES = (torch.float32, torch.bfloat16)
#: Label dtypes, and the most modes each holds (int16 holds uint16 values).
LABEL_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)
LABEL_MAX_MODES = {torch.uint8: 256, torch.int16: 65536, torch.int32: 2**31 - 1, torch.int64: 2**31 - 1}


def device_of(tensors: Sequence[Tensor], interpret: bool) -> torch.device:
    """The one device of ``tensors``: CUDA, or any under Triton's interpreter (``interpret``)."""
    devs = {t.device for t in tensors}
    if len(devs) != 1:
        raise ValueError(f"{WHO}: all tensors must be on one device, got {sorted(map(str, devs))}")
    dev = next(iter(devs))
    if dev.type != "cuda" and not interpret:
        raise RuntimeError(f"{WHO}: tensors on {dev} need CUDA, or TRITON_INTERPRET=1 set "
                           "before the kernels are first built (Triton's CPU interpreter)")
    return dev


def launch_on(dev: torch.device):
    """Launches happen on the tensors' CUDA device (Triton launches on the current one)."""
    return torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()


def check(name: str, t: Tensor, n: int, dtypes: tuple, what: str) -> None:
    """``t`` (``what name`` in messages) has one of ``dtypes``, ``n`` elements and is contiguous."""
    if t.dtype not in dtypes:
        raise TypeError(f"{WHO}: {what} {name} has dtype {t.dtype}; expected one of "
                        f"{[str(d) for d in dtypes]}")
    if t.numel() != n:
        raise ValueError(f"{WHO}: {what} {name} has {t.numel()} elements; expected {n}")
    if not t.is_contiguous():
        raise ValueError(f"{WHO}: {what} {name} must be contiguous (call .contiguous(); "
                         "in-place passes need the tensor itself contiguous)")


def check_labels(name: str, lab: Tensor, n: int, n_modes: int) -> None:
    """One label per weight, of a dtype that holds ``n_modes`` modes."""
    check(name, lab, n, LABEL_DTYPES, "labels")
    if n_modes > LABEL_MAX_MODES[lab.dtype]:
        raise ValueError(f"{WHO}: labels {name} of dtype {lab.dtype} cannot hold {n_modes} modes")


def same_len(**lists) -> int:
    """The common length of the per-tensor lists (``ValueError`` if they differ)."""
    lens = {k: len(v) for k, v in lists.items()}
    if len(set(lens.values())) > 1:
        raise ValueError(f"{WHO}: per-tensor lists differ in length: {lens}")
    return next(iter(lens.values()))


def check_scales(a: Sequence[Tensor], scales: Sequence[Tensor], n_modes: int) -> None:
    """int8 codes need one ``(n_modes,)`` scale per tensor; float ``a`` none."""
    if scales:
        if len(scales) != len(a) or any(s.numel() != n_modes for s in scales):
            raise ValueError(f"{WHO}: scales must hold one ({n_modes},) tensor per tensor")
    elif any(x.dtype == torch.int8 for x in a):
        raise ValueError(f"{WHO}: int8 coefficients are codes of the 8-bit encoding and need their scales")


def check_rows(rows: list[tuple[Tensor, ...]], specs: Sequence[tuple[str, tuple]], n_modes: int,
               packed_ok: bool = False) -> None:
    """Every row is one tensor's ``(weight, *others, labels)``; ``specs`` names and types all but the
    labels: each must have the weight's ``numel``, be contiguous and of a listed dtype. With
    ``packed_ok`` the labels may be packed 4 bits per weight (for at most 16 modes)."""
    for t, row in enumerate(rows):
        n = row[0].numel()
        for x, (what, dtypes) in zip(row, specs):
            check(f"[{t}]", x, n, dtypes, what)
        if packed_ok and is_packed(row[-1], n):
            check(f"[{t}]", row[-1], (n + 1) // 2, (torch.uint8,), "packed labels")
            if n_modes > PACK_MAX_MODES:
                raise ValueError(f"{WHO}: packed labels [{t}] hold at most {PACK_MAX_MODES} modes, got {n_modes}")
        else:
            check_labels(f"[{t}]", row[-1], n, n_modes)
