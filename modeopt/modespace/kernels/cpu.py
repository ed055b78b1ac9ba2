"""The CPU implementations of the four passes: the fused C kernels where they apply, else the torch reference.

The C kernels (:mod:`modeopt.modespace.kernels.c_library`) apply to float32 weights/grads, float32 or bfloat16
``a`` (float32 ``b``; float64 moments for ``welford``), uint8/int16(uint16)/int32 labels, all
contiguous CPU tensors, while :func:`fused_available`; ``reduce`` also to bfloat16/float16 grads (each
tensor its own dtype; bit for bit as their float32 values), ``form`` to bfloat16/float16 weights;
``reduce``, ``update`` and ``form`` also to the 8-bit
encoding (int8 codes with per-tensor scales, labels packed 4 bits per weight or not; see
:mod:`modeopt.modespace.kernels.encoding`). Anything else runs
:mod:`modeopt.modespace.kernels.reference`. Arguments are per-tensor lists; labels lie in ``[0, M)``
(checked by the callers: the kernels index per-mode arrays without a bound check).

Work is cut into pieces of ``PIECE`` elements in a fixed order, and every piece of ``reduce``
accumulates into its own float64 row, folded in piece order: results do not depend on the number
of threads (``THREADS``) or on timing. ``ctypes`` releases the GIL, so threads run pieces in parallel.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from . import reference
from .c_library import A_NAMES, G_NAMES, L_NAMES, PACKED, UNROLL, W_NAMES, library, reduce_entry
from .encoding import is_packed
from .switch import enabled

__all__ = ["fused_available", "reduce", "update", "welford", "assign", "form", "PIECE", "THREADS"]

#: Elements per piece of work (and per accumulator row of ``reduce``).
PIECE = 1 << 18
#: Threads the fused kernels use (``MODEOPT_KERNEL_THREADS``, default 1; docs/performance.md says why).
THREADS = int(os.environ.get("MODEOPT_KERNEL_THREADS", "1"))

_pool: ThreadPoolExecutor | None = None
_F32 = (torch.float32,)
_F64 = (torch.float64,)
_A = tuple(A_NAMES)  # coefficient dtypes the C code reads
_HALF = tuple(W_NAMES)  # weight dtypes form_* reads and writes
_G = tuple(G_NAMES)  # gradient dtypes reduce_* reads: float32, bfloat16, float16


def fused_available() -> bool:
    """Whether the compiled CPU kernels are in use: built and loaded, and not turned off by
    ``use_fused(False)`` or ``MODEOPT_KERNELS=torch``. The first call builds them."""
    return enabled() and library() is not None


def _fusable(*groups: tuple[Sequence[Tensor], tuple], labels: Sequence[Tensor]) -> bool:
    """Whether the C kernels apply: every tensor of each ``(tensors, dtypes)`` group is a contiguous
    CPU tensor of one of ``dtypes``, and every label tensor contiguous of a dtype the C code reads."""
    if not fused_available():
        return False
    # plain loops, not generators: this runs once per tensor on every eager CPU pass (docs/performance.md)
    for tensors, dtypes in groups:
        for t in tensors:
            if not (t.is_cpu and t.dtype in dtypes and t.is_contiguous()):
                return False
    for lab in labels:
        if not (lab.dtype in L_NAMES and lab.is_contiguous()):
            return False
    return True


def _pieces(sizes: Sequence[int]) -> list[tuple[int, int, int]]:
    """(tensor, start, stop) pieces of at most PIECE elements, in a fixed order."""
    out = []
    for t, n in enumerate(sizes):
        for s in range(0, n, PIECE):
            out.append((t, s, min(s + PIECE, n)))
    return out


def _workers() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=max(1, THREADS - 1), thread_name_prefix="modeopt")
    return _pool


def _run_split(fn: Callable, pieces: list) -> None:
    """Run ``fn(piece)`` for every piece, spread over ``THREADS`` threads in contiguous runs."""
    k = max(1, min(THREADS, len(pieces)))
    if k == 1:
        for p in pieces:
            fn(p)
        return
    bounds = [len(pieces) * j // k for j in range(k + 1)]

    def _run(lo: int, hi: int) -> None:
        for p in pieces[lo:hi]:
            fn(p)

    futures = [_workers().submit(_run, bounds[j], bounds[j + 1]) for j in range(1, k)]
    _run(bounds[0], bounds[1])
    for f in futures:
        f.result()


def _run_elementwise(fns: Sequence[Callable], per_tensor: Sequence[Sequence[Tensor]], shared: tuple) -> None:
    """``fns[t](<pointer into each per_tensor[k][t] at the piece>, *shared, <piece length>)`` over
    every piece of every tensor ``t`` (``per_tensor[0]`` gives the sizes)."""
    rows = list(zip(*per_tensor))
    ptrs = [tuple(map(Tensor.data_ptr, row)) for row in rows]

    def _one(piece):
        t, s, e = piece
        if s:
            fns[t](*[p + x.element_size() * s for p, x in zip(ptrs[t], rows[t])], *shared, e - s)
        else:  # the first (for most tensors the only) piece
            fns[t](*ptrs[t], *shared, e)

    _run_split(_one, _pieces(list(map(Tensor.numel, per_tensor[0]))))


def _label_name(lab: Tensor, n: int) -> str:
    """The entry-point name of ``lab``'s layout for a tensor of ``n`` weights (packed: ``u4``)."""
    return PACKED if is_packed(lab, n) else L_NAMES[lab.dtype]


def _check_scaled(what: str, a: Sequence[Tensor], scales: Sequence[Tensor], n_modes: int) -> None:
    """int8 codes need one ``(M,)`` scale tensor per tensor, and float ``a`` none."""
    if scales:
        if len(scales) != len(a) or any(s.numel() != n_modes for s in scales):
            raise ValueError(f"{what}: scales must hold one ({n_modes},) tensor per tensor, got "
                             f"{[tuple(s.shape) for s in scales]} for {len(a)} tensors")
    elif any(x.dtype == torch.int8 for x in a):
        raise ValueError(f"{what}: int8 coefficients are codes of the 8-bit encoding and need their scales")


def _sizes_ok(what: str, ws: Sequence[Tensor], xs: Sequence[Tensor], ls: Sequence[Tensor]) -> None:
    for j, (w, x, lab) in enumerate(zip(ws, xs, ls)):
        n = w.numel()
        if x.numel() != n or not (lab.numel() == n or is_packed(lab, n)):
            raise ValueError(f"{what}: tensor {j} has {n} elements, {x.numel()} coefficients and {lab.numel()} "
                             f"labels; they must agree (packed labels: {(n + 1) // 2} bytes)")


def reduce(grads: Sequence[Tensor | None], a: Sequence[Tensor], labels: Sequence[Tensor], n_modes: int,
           scales: Sequence[Tensor] = ()) -> Tensor:
    """``(n_modes,)`` float64 ``sum_{i: label_i = m} a_i g_i`` (``None`` grads skipped); see
    :func:`modeopt.modespace.kernels.reference.reduce` (``scales``: the 8-bit encoding)."""
    scales = list(scales or ())
    _check_scaled("reduce", a, scales, n_modes)
    rows = [j for j, g in enumerate(grads) if g is not None]
    if rows:
        gs = [grads[j].reshape(-1) for j in rows]
        xs, ls = [a[j] for j in rows], [labels[j] for j in rows]
        if _fusable((gs, _G), (xs, _A), labels=ls):
            return _reduce_fused(gs, xs, ls, n_modes, [scales[j] for j in rows] if scales else None)
    return reference.reduce(grads, a, labels, n_modes, scales or None)


def _reduce_fused(gs, xs, ls, n_modes: int, scales) -> Tensor:
    _sizes_ok("reduce", gs, xs, ls)
    lib = library()
    gs = [g.contiguous() for g in gs]
    pieces = _pieces([g.numel() for g in gs])
    acc = torch.zeros(len(pieces), UNROLL * n_modes, dtype=torch.float64)
    names = [_label_name(lab, g.numel()) for g, lab in zip(gs, ls)]
    # per tensor the entry point of its grad, coefficient and label dtypes (one piece never spans two)
    fns = [getattr(lib, reduce_entry(g.dtype, x.dtype, ln)) for g, x, ln in zip(gs, xs, names)]

    def _one(j_piece):
        j, (t, s, e) = j_piece
        g, x, lab = gs[t], xs[t], ls[t]
        # pieces start at multiples of PIECE (even): a packed label offset is s // 2 bytes
        off = s // 2 if names[t] == PACKED else lab.element_size() * s
        fns[t](g.data_ptr() + g.element_size() * s, x.data_ptr() + x.element_size() * s, lab.data_ptr() + off,
               e - s, acc[j].data_ptr(), n_modes)

    _run_split(_one, list(enumerate(pieces)))
    out = torch.zeros(n_modes, dtype=torch.float64)
    s64 = None if scales is None else [s.to(device="cpu", dtype=torch.float64).contiguous() for s in scales]
    for j, (t, _, _) in enumerate(pieces):  # fixed order: deterministic
        if s64 is None:
            lib.fold_banks(acc[j].data_ptr(), n_modes, out.data_ptr())
        else:
            lib.fold_banks_scaled(acc[j].data_ptr(), n_modes, s64[t].data_ptr(), out.data_ptr())
    return out


def _tensor_deltas(delta: Tensor, scales: Sequence[Tensor], n: int) -> list[Tensor]:
    """Per tensor its own float32 ``(M,)`` delta: ``delta`` itself, or the 8-bit encoding's ``scale * delta``."""
    d = delta.to(torch.float32).contiguous()
    return [d] * n if not scales else [(s.to(torch.float32) * d).contiguous() for s in scales]


def update(weights: Sequence[Tensor], a: Sequence[Tensor], labels: Sequence[Tensor], delta: Tensor,
           scales: Sequence[Tensor] = ()) -> None:
    """In place: ``w += a * delta[label]``; see :func:`modeopt.modespace.kernels.reference.update`
    (``scales``: the 8-bit encoding, each tensor moves by ``q * float32(scale * delta)[label]``)."""
    scales = list(scales or ())
    _check_scaled("update", a, scales, delta.numel())
    if not _fusable((weights, _F32), (a, _A), labels=labels):
        return reference.update(weights, a, labels, delta, scales or None)
    _sizes_ok("update", weights, a, labels)
    lib = library()
    ds = _tensor_deltas(delta, scales, len(weights))
    names = [_label_name(lab, w.numel()) for w, lab in zip(weights, labels)]
    fns = [getattr(lib, f"update_{A_NAMES[x.dtype]}_{ln}") for x, ln in zip(a, names)]
    ptrs = [(w.data_ptr(), x.data_ptr(), x.element_size(), lab.data_ptr(), lab.element_size(), dt.data_ptr())
            for w, x, lab, dt in zip(weights, a, labels, ds)]

    def _one(piece):
        t, s, e = piece
        w, x, xs, lab, ls, dp = ptrs[t]
        off = s // 2 if names[t] == PACKED else ls * s
        fns[t](w + 4 * s, x + xs * s, lab + off, dp, e - s)

    _run_split(_one, _pieces([w.numel() for w in weights]))


def welford(flat: Sequence[Tensor], mean: Sequence[Tensor], comoment: Sequence[Tensor], labels: Sequence[Tensor],
            dr: Tensor, n: int) -> None:
    """One Welford/Chan sample in place, float64; see :func:`modeopt.modespace.kernels.reference.welford`."""
    if not _fusable((flat, _F32), (mean, _F64), (comoment, _F64), labels=labels):
        return reference.welford(flat, mean, comoment, labels, dr, n)
    lib = library()
    d = dr.to(torch.float64).contiguous()
    fns = [getattr(lib, f"welford_{L_NAMES[lab.dtype]}") for lab in labels]
    _run_elementwise(fns, (flat, mean, comoment, labels), (d.data_ptr(), 1.0 / n))


def assign(weights: Sequence[Tensor], a: Sequence[Tensor], b: Sequence[Tensor], labels: Sequence[Tensor],
           r: Tensor) -> None:
    """In place: ``w = a * r[label] + b``; see :func:`modeopt.modespace.kernels.reference.assign`."""
    if not _fusable((weights, _F32), (a, _F32), (b, _F32), labels=labels):
        return reference.assign(weights, a, b, labels, r)
    lib = library()
    rr = r.to(torch.float32).contiguous()
    fns = [getattr(lib, f"assign_{L_NAMES[lab.dtype]}") for lab in labels]
    _run_elementwise(fns, (weights, a, b, labels), (rr.data_ptr(),))


def form(weights: Sequence[Tensor], a: Sequence[Tensor], labels: Sequence[Tensor], delta: Tensor,
         scales: Sequence[Tensor] = ()) -> list[Tensor]:
    """Out of place: ``w(float(w) + a * delta[label])`` per tensor; see
    :func:`modeopt.modespace.kernels.reference.form` (bit for bit the same; ``scales``: the 8-bit encoding)."""
    scales = list(scales or ())
    _check_scaled("form", a, scales, delta.numel())
    if not _fusable((weights, _HALF), (a, _A), labels=labels):
        return reference.form(weights, a, labels, delta, scales or None)
    _sizes_ok("form", weights, a, labels)
    lib = library()
    ds = _tensor_deltas(delta, scales, len(weights))
    out = [torch.empty_like(w, memory_format=torch.contiguous_format) for w in weights]
    names = [_label_name(lab, w.numel()) for w, lab in zip(weights, labels)]
    fns = [getattr(lib, f"form_{W_NAMES[w.dtype]}_{A_NAMES[x.dtype]}_{ln}") for w, x, ln in zip(weights, a, names)]
    ptrs = [(w.data_ptr(), x.data_ptr(), x.element_size(), lab.data_ptr(), lab.element_size(), o.data_ptr(),
             dt.data_ptr()) for w, x, lab, o, dt in zip(weights, a, labels, out, ds)]

    def _one(piece):
        t, s, e = piece
        w, x, xs, lab, ls, o, dp = ptrs[t]
        off = s // 2 if names[t] == PACKED else ls * s
        fns[t](w + 2 * s, x + xs * s, lab + off, o + 2 * s, dp, e - s)

    _run_split(_one, _pieces([w.numel() for w in weights]))
    return out
