"""Triton GPU kernels for the four memory-bound passes of a mode-space step.

Same semantics as :mod:`modeopt.modespace.kernels.reference` (the torch reference) and the C kernels:

* :func:`reduce`  - ``out[m] = sum_{i: label_i = m} a_i * g_i`` over many tensors, float64, deterministic;
* :func:`update`  - ``w += a * delta[label]`` in place;
* :func:`welford` - one Welford/Chan sample of float64 moments in place;
* :func:`assign`  - ``w = a * r[label] + b`` in place;
* :func:`form`    - ``out = w + a * delta[label]`` out of place (half-precision weights, one rounding).

Every tensor argument is a contiguous tensor on one device (weights and grads may have any shape;
they are read in their logical row-major order, like the labels). Supported dtypes:

* weights / grads: float32, bfloat16, float16 (computed in float32, stored back in the weight's dtype);
* ``a``: float32 or bfloat16; ``b`` (assign): float32; for :func:`reduce` and :func:`update` also int8
  codes of the 8-bit encoding with their per-tensor ``scales`` (:mod:`modeopt.modespace.kernels.encoding`);
* labels: uint8 (``n_modes <= 256``), int16 holding uint16 values (``n_modes <= 65536``: read as
  ``int32 & 0xFFFF``, like :func:`modeopt.modespace.kernels.as_index`), int32, int64 (values below 2**31);
  for :func:`reduce` and :func:`update` also 4-bit labels packed two per byte (uint8 of ``ceil(n/2)``
  bytes, recognised by that size).

:func:`reduce` handles ``n_modes <= MAX_REDUCE_MODES`` (4096; see :func:`supports`): its cost grows
linearly with the number of modes (a one-hot tile per block), so above that it raises
``NotImplementedError`` and the caller falls back to a sort-based torch reduction.

Importing this module never fails: Triton is imported, and the kernels are built, on first use.
:func:`available` says whether Triton can be imported. Kernels run on CUDA tensors, or on CPU tensors
when ``TRITON_INTERPRET=1`` was in the environment when the kernels were built (the first call into
this module; set it before importing to be safe) - Triton's interpreter, used by the tests.

Labels must lie in ``[0, n_modes)``. Out-of-range labels are not checked (that would cost a pass);
they are masked so that they never read out of bounds: they contribute to no mode in :func:`reduce`
and read ``delta``/``dr``/``r`` as 0 in the other passes.

Behind ``torch.library.custom_op``: the functions launch on the tensors' device and current stream,
never synchronise with the host and allocate only with torch (the partials of :func:`reduce`, a
one-element ``1/n`` of :func:`welford`), so they can be a CUDA impl as they are. Fake impls:
:func:`reduce` returns ``torch.empty(n_modes, dtype=float64, device=...)``; the others return None
and mutate their weights (welford: ``mean`` and ``comoment``).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
from torch import Tensor

from .triton_checks import (A_DTYPES, ASSIGN_A_DTYPES, LABEL_DTYPES, LABEL_MAX_MODES, WEIGHT_DTYPES, WHO as _WHO,
                            check_rows, check_scales, device_of, is_packed, launch_on, same_len)

__all__ = ["available", "supports", "compiled", "reduce_tiles", "reduce", "update", "welford", "assign", "form",
           "MAX_REDUCE_MODES", "REDUCE_CHUNK", "ELEMENTWISE_BLOCK", "WEIGHT_DTYPES", "A_DTYPES", "ASSIGN_A_DTYPES",
           "LABEL_DTYPES",
           "LABEL_MAX_MODES"]

#: Largest ``n_modes`` :func:`reduce` accepts (cost per element ~ 3 * n_modes simple ops).
MAX_REDUCE_MODES = 4096
#: The one-hot tile of :func:`reduce` holds at most this many elements (``BLOCK * MODE_TILE``):
#: sized so that no tile spills registers (docs/performance.md, "The operators and the CUDA path").
_TILE_ELEMS = 16384
#: Elements each :func:`reduce` program reduces into its own row of partials (rounded to a multiple
#: of its BLOCK). Large enough that the partials (``n / CHUNK`` rows of ``n_modes`` float64) stay
#: small beside the inputs, small enough for thousands of programs on a big tensor.
REDUCE_CHUNK = 16384
#: Elements per program of the element-wise passes.
ELEMENTWISE_BLOCK = 1024


triton = tl = _load_labels = _narrow = _block_by_label = None  # set by compiled() on first use
_k = None  # the built kernels (a namespace), or None before the first use
_interpret = False
_lock = threading.Lock()


def available() -> bool:
    """Whether Triton can be imported (says nothing about a GPU: see the module docstring)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install failing in its own way
        return False
    return True


def supports(n_modes: int) -> bool:
    """Whether :func:`reduce` handles ``n_modes`` modes (``1 <= n_modes <= MAX_REDUCE_MODES``)."""
    return 1 <= n_modes <= MAX_REDUCE_MODES


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def reduce_tiles(n_modes: int) -> tuple[int, int]:
    """(BLOCK, MODE_TILE) of :func:`reduce` for ``n_modes`` modes: MODE_TILE in [16, 128] (a power of
    two), BLOCK = _TILE_ELEMS / MODE_TILE in [128, 512]. Results depend on these (the order of the
    float32 sums in a block), so they are a function of ``n_modes`` only, never of the device."""
    mode_tile = min(128, max(16, _next_pow2(n_modes)))
    block = min(512, max(128, _TILE_ELEMS // mode_tile))
    return block, mode_tile


def compiled():
    """Import Triton and define the kernels (once, thread-safe): a namespace with the ``@triton.jit``
    kernels ``reduce``, ``update``, ``welford``, ``assign`` and ``cdiv``. Raises ImportError without Triton."""
    # The kernels and what they reference are module globals, not closure variables, so that
    # Triton versions that resolve names only through a kernel's __globals__ compile them too.
    global _k, _interpret, triton, tl, _load_labels, _narrow, _block_by_label
    if _k is not None:
        return _k
    with _lock:
        if _k is not None:
            return _k
        import triton
        import triton.language as tl

        @triton.jit
        def _load_labels(lab_ptr, offs, mask, LABEL_U16: tl.constexpr, LABEL_U4: tl.constexpr = False):
            # Labels of any width as int32. int16 storage holds uint16 values: sign-extend, then
            # keep the low 16 bits. uint8 zero-extends. int64 labels are narrowed (values < 2**31).
            # Packed 4-bit labels: element i in the low (i even) or high (i odd) nibble of byte i // 2.
            if LABEL_U4:
                byte = tl.load(lab_ptr + offs // 2, mask=mask, other=0).to(tl.int32)
                lab = (byte >> ((offs & 1) * 4).to(tl.int32)) & 15
            else:
                lab = tl.load(lab_ptr + offs, mask=mask, other=0).to(tl.int32)
                if LABEL_U16:
                    lab = lab & 0xFFFF
            return lab

        @triton.jit
        def _narrow(x, dst_ptr):
            # float32 -> the element type of dst_ptr, rounded to nearest even like torch's .to().
            # bfloat16 is rounded with integer ops: bitwise the same on every backend (Triton's CPU
            # interpreter truncates in its own float32 -> bfloat16 cast). NaN -> 0x7FC0 as in c10.
            if dst_ptr.dtype.element_ty == tl.bfloat16:
                u = x.to(tl.uint32, bitcast=True)
                # Only the low 16 bits of the shifted sum are kept, so wrap-around and the kind
                # of shift (logical or arithmetic) do not matter.
                r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
                r = tl.where(x != x, 0x7FC0, r)
                return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
            else:
                return x.to(dst_ptr.dtype.element_ty)

        @triton.jit
        def _reduce_kernel(g_ptr, a_ptr, lab_ptr, part_ptr, n, row0, n_tiles, M_PAD,
                           LABEL_U16: tl.constexpr, BLOCK: tl.constexpr, MODE_TILE: tl.constexpr,
                           ITERS: tl.constexpr, LABEL_U4: tl.constexpr):
            # 1-D grid (chunk-major, mode tile minor): the programs reading one chunk for different
            # mode tiles are neighbours in launch order, so all but the first hit L2. (A 2-D grid
            # would cap the chunk axis at 65535 on CUDA.)
            pid = tl.program_id(0)
            chunk = pid // n_tiles
            tile = pid % n_tiles
            modes = tile * MODE_TILE + tl.arange(0, MODE_TILE)
            start = chunk.to(tl.int64) * (BLOCK * ITERS)  # int64: tensors may exceed 2**31 elements
            # The last chunk of a tensor (and the only one of a small tensor) stops at n: skipping the
            # empty blocks drops only exact zeros, so the sum does not change.
            stop = tl.minimum(start + BLOCK * ITERS, n)
            acc = tl.zeros([MODE_TILE], dtype=tl.float64)
            for b0 in range(start, stop, BLOCK):
                offs = b0 + tl.arange(0, BLOCK)
                mask = offs < n
                g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                lab = _load_labels(lab_ptr, offs, mask, LABEL_U16, LABEL_U4)
                v = a * g  # rounded once to float32, as in the C kernels; masked lanes are 0
                # One-hot segment sum of this block for this tile of modes, in float32 (BLOCK
                # terms), then accumulated across the chunk in float64. No atomics anywhere: every
                # program owns its row of partials, so the result does not depend on scheduling.
                hit = lab[:, None] == modes[None, :]
                acc += tl.sum(tl.where(hit, v[:, None], 0.0), axis=0).to(tl.float64)
            row = (row0 + chunk).to(tl.int64)
            tl.store(part_ptr + row * M_PAD + modes, acc)

        @triton.jit
        def _block_by_label(lab_ptr, table_ptr, n, n_modes, LABEL_U16: tl.constexpr, BLOCK: tl.constexpr,
                            LABEL_U4: tl.constexpr = False):
            # This program's offsets, their mask, and table[label] per element: 0 for masked lanes
            # and out-of-range labels, which never read out of bounds.
            offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            mask = offs < n
            lab = _load_labels(lab_ptr, offs, mask, LABEL_U16, LABEL_U4)
            value = tl.load(table_ptr + lab, mask=mask & (lab >= 0) & (lab < n_modes), other=0.0)
            return offs, mask, value

        @triton.jit
        def _update_kernel(w_ptr, a_ptr, lab_ptr, d_ptr, n, n_modes,
                           LABEL_U16: tl.constexpr, BLOCK: tl.constexpr, LABEL_U4: tl.constexpr):
            offs, mask, d = _block_by_label(lab_ptr, d_ptr, n, n_modes, LABEL_U16, BLOCK, LABEL_U4)
            w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            out = w + a * d  # launched with enable_fp_fusion=False: a rounded product, then the add
            tl.store(w_ptr + offs, _narrow(out, w_ptr), mask=mask)

        @triton.jit
        def _welford_kernel(w_ptr, mean_ptr, com_ptr, lab_ptr, dr_ptr, inv_n_ptr, n, n_modes,
                            LABEL_U16: tl.constexpr, BLOCK: tl.constexpr):
            offs, mask, dr = _block_by_label(lab_ptr, dr_ptr, n, n_modes, LABEL_U16, BLOCK, False)
            w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float64)
            mu = tl.load(mean_ptr + offs, mask=mask, other=0.0)
            com = tl.load(com_ptr + offs, mask=mask, other=0.0)
            # 1/n comes in a float64 tensor: Triton passes a Python float argument as float32.
            inv_n = tl.load(inv_n_ptr)
            dw = w - mu
            tl.store(mean_ptr + offs, mu + dw * inv_n, mask=mask)
            tl.store(com_ptr + offs, com + dw * dr, mask=mask)

        @triton.jit
        def _assign_kernel(w_ptr, a_ptr, b_ptr, lab_ptr, r_ptr, n, n_modes,
                           LABEL_U16: tl.constexpr, BLOCK: tl.constexpr):
            offs, mask, r = _block_by_label(lab_ptr, r_ptr, n, n_modes, LABEL_U16, BLOCK, False)
            a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            out = a * r + b  # no FMA (enable_fp_fusion=False): same roundings as the torch reference
            tl.store(w_ptr + offs, _narrow(out, w_ptr), mask=mask)

        @triton.jit
        def _form_kernel(w_ptr, a_ptr, lab_ptr, out_ptr, d_ptr, n, n_modes,
                         LABEL_U16: tl.constexpr, BLOCK: tl.constexpr, LABEL_U4: tl.constexpr):
            offs, mask, d = _block_by_label(lab_ptr, d_ptr, n, n_modes, LABEL_U16, BLOCK, LABEL_U4)
            w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            out = w + a * d  # no FMA (enable_fp_fusion=False): a rounded product, then the add
            tl.store(out_ptr + offs, _narrow(out, out_ptr), mask=mask)

        class _K:
            cdiv = staticmethod(triton.cdiv)
            form = _form_kernel
            reduce = _reduce_kernel
            update = _update_kernel
            welford = _welford_kernel
            assign = _assign_kernel

        # Triton itself decided, from TRITON_INTERPRET, at decoration time just above.
        _interpret = type(_update_kernel).__name__ == "InterpretedFunction"
        _k = _K
        return _k


# --------------------------------------------------------------------------------------------
# the passes


def reduce(grads: Sequence[Tensor | None], a: Sequence[Tensor], labels: Sequence[Tensor], n_modes: int,
           scales: Sequence[Tensor] | None = None, *, chunk: int | None = None) -> Tensor:
    """``(n_modes,)`` float64 on the tensors' device: ``out[m] = sum_{i: label_i = m} a_i * g_i`` over
    all tensors (``None`` grads are skipped, with their ``a`` and ``labels``).

    Each product ``a_i * g_i`` is rounded once to float32 (as in the C kernels); each block of
    BLOCK elements is summed per mode in float32, blocks are accumulated in float64 into one row of
    partials per chunk of ``chunk`` elements, and the rows are folded by one fixed-shape torch sum.
    The result depends only on the data, ``n_modes`` and ``chunk`` - bitwise the same every run.

    Args:
        grads: per tensor, float32/bfloat16/float16 gradients (contiguous, any shape) or None.
        a: per tensor, float32/bfloat16 coefficients, ``numel`` as the grad.
        labels: per tensor, uint8/int16(uint16)/int32/int64 mode labels in ``[0, n_modes)``.
        n_modes: M, ``1 <= M <= MAX_REDUCE_MODES``; above, ``NotImplementedError`` (see :func:`supports`).
        chunk: elements per row of partials (default ``REDUCE_CHUNK``; rounded up to a multiple of
            the block). Part of the summation order: keep it fixed for reproducible results.
        scales: the 8-bit encoding: per tensor an ``(n_modes,)`` float32 scale of its int8 codes ``a``
            (each tensor's rows of partials are multiplied by it in float64 before the fold); labels
            may then be packed two per byte. None (or empty) for float ``a``.
    """
    if not supports(n_modes):
        raise NotImplementedError(f"{_WHO}.reduce handles 1..{MAX_REDUCE_MODES} modes, "
                                  f"got {n_modes}: use a sort-based reduction")
    same_len(grads=grads, a=a, labels=labels)
    scales = list(scales or ())
    check_scales(a, scales, n_modes)
    keep = [j for j, g in enumerate(grads) if g is not None]
    items = [(grads[j], a[j], labels[j]) for j in keep]
    if not items:
        dev = a[0].device if len(a) else torch.device("cpu")
        return torch.zeros(n_modes, dtype=torch.float64, device=dev)
    k = compiled()
    dev = device_of([t for item in items for t in item], _interpret)
    check_rows(items, [("grad", WEIGHT_DTYPES), ("a", A_DTYPES)], n_modes, packed_ok=True)
    block, mode_tile = reduce_tiles(n_modes)
    iters = max(1, -(-(chunk or REDUCE_CHUNK) // block))
    span = block * iters
    n_tiles = -(-n_modes // mode_tile)
    m_pad = n_tiles * mode_tile
    rows = [-(-g.numel() // span) for g, _, _ in items]
    # One buffer for every tensor of the call (tensor t owns rows row0_t ..), so the fold is one op.
    # Every (row, column) is written by exactly one program: no zeroing needed.
    partials = torch.empty(sum(rows), m_pad, dtype=torch.float64, device=dev)
    row0 = 0
    with launch_on(dev):
        for j, ((g, x, lab), nr) in enumerate(zip(items, rows)):
            if nr:
                k.reduce[(nr * n_tiles,)](g, x, lab, partials, g.numel(), row0, n_tiles, m_pad,
                                          LABEL_U16=lab.dtype == torch.int16, BLOCK=block,
                                          MODE_TILE=mode_tile, ITERS=iters, LABEL_U4=is_packed(lab, g.numel()),
                                          num_warps=4)
                if scales:  # the 8-bit encoding: this tensor's sums times its scales, in float64
                    partials[row0:row0 + nr, :n_modes] *= scales[keep[j]].to(device=dev, dtype=torch.float64)
            row0 += nr
    if row0 == 0:
        return torch.zeros(n_modes, dtype=torch.float64, device=dev)
    # A torch reduction over a fixed shape uses a fixed order (no atomics): deterministic.
    return partials.sum(0)[:n_modes].contiguous()


def _launch_elementwise(kernel, dev: torch.device, rows: list[tuple[Tensor, ...]], shared: tuple,
                        n_modes: int) -> None:
    """``kernel(*row, *shared, numel, n_modes)`` over every element of each non-empty row, in blocks
    of ``ELEMENTWISE_BLOCK`` (the row ends with its labels)."""
    k = compiled()
    with launch_on(dev):
        for row in rows:
            size = row[0].numel()
            if size:
                kernel[(k.cdiv(size, ELEMENTWISE_BLOCK),)](*row, *shared, size, n_modes,
                                                           LABEL_U16=row[-1].dtype == torch.int16,
                                                           BLOCK=ELEMENTWISE_BLOCK, num_warps=4,
                                                           enable_fp_fusion=False)


@torch.no_grad()
def update(weights: Sequence[Tensor], a: Sequence[Tensor], labels: Sequence[Tensor], delta: Tensor,
           scales: Sequence[Tensor] | None = None) -> None:
    """In place, for every tensor: ``w = (float32(w) + float32(a) * float32(delta)[label]).to(w.dtype)``.

    Args:
        weights: float32/bfloat16/float16 contiguous tensors (any shape), updated in place.
        a: per tensor, float32/bfloat16 coefficients, flat, ``w.numel()`` elements (int8 codes with ``scales``).
        labels: per tensor, uint8/int16(uint16)/int32/int64 labels in ``[0, M)`` (packed 4-bit with ``scales``).
        delta: ``(M,)`` change of the mode scalars (any float dtype; rounded to float32 first).
        scales: the 8-bit encoding: per tensor ``(M,)`` float32; tensor ``t`` reads
            ``float32(scales[t] * delta)`` in place of ``delta``. None (or empty) for float ``a``.
    """
    same_len(weights=weights, a=a, labels=labels)
    if not weights:
        return
    scales = list(scales or ())
    check_scales(a, scales, delta.numel())
    k = compiled()
    dev = device_of([*weights, *a, *labels, delta], _interpret)
    rows = list(zip(weights, a, labels))
    check_rows(rows, [("weight", WEIGHT_DTYPES), ("a", A_DTYPES)], delta.numel(), packed_ok=True)
    d = delta.to(torch.float32).contiguous()
    with launch_on(dev):
        for j, (w, x, lab) in enumerate(rows):
            size = w.numel()
            if size:
                dj = d if not scales else (scales[j].to(device=dev, dtype=torch.float32) * d).contiguous()
                k.update[(k.cdiv(size, ELEMENTWISE_BLOCK),)](w, x, lab, dj, size, delta.numel(),
                                                             LABEL_U16=lab.dtype == torch.int16,
                                                             BLOCK=ELEMENTWISE_BLOCK, LABEL_U4=is_packed(lab, size),
                                                             num_warps=4, enable_fp_fusion=False)


@torch.no_grad()
def welford(weights: Sequence[Tensor], mean: Sequence[Tensor], comoment: Sequence[Tensor],
            labels: Sequence[Tensor], dr: Tensor, n: int) -> None:
    """One Welford/Chan sample for every tensor, in place, in float64:
    ``dw = float64(w) - mean; mean += dw * (1/n); comoment += dw * dr[label]``.

    (Multiplying by ``1/n`` matches the C kernel and the torch reference of :mod:`modeopt.modespace.kernels`.)

    Args:
        weights: float32/bfloat16/float16 contiguous tensors (any shape); read only.
        mean, comoment: per tensor, flat float64 of ``w.numel()`` elements, updated in place.
        labels: per tensor, uint8/int16(uint16)/int32/int64 labels in ``[0, M)``.
        dr: ``(M,)`` float64 (other float dtypes are converted): the references minus their updated means.
        n: the sample count including this sample (``n >= 1``).
    """
    same_len(weights=weights, mean=mean, comoment=comoment, labels=labels)
    if not weights:
        return
    if n < 1:
        raise ValueError(f"{_WHO}.welford: n must be >= 1, got {n}")
    k = compiled()
    dev = device_of([*weights, *mean, *comoment, *labels, dr], _interpret)
    rows = list(zip(weights, mean, comoment, labels))
    check_rows(rows, [("weight", WEIGHT_DTYPES), ("mean", (torch.float64,)), ("comoment", (torch.float64,))],
                dr.numel())
    inv_n = torch.full((1,), 1.0 / n, dtype=torch.float64, device=dev)
    _launch_elementwise(k.welford, dev, rows, (dr.to(torch.float64).contiguous(), inv_n), dr.numel())


@torch.no_grad()
def assign(weights: Sequence[Tensor], a: Sequence[Tensor], b: Sequence[Tensor], labels: Sequence[Tensor],
           r: Tensor) -> None:
    """In place, for every tensor: ``w = (float32(a) * float32(r)[label] + float32(b)).to(w.dtype)``.

    Args:
        weights: float32/bfloat16/float16 contiguous tensors (any shape), overwritten.
        a: per tensor, float32/bfloat16 flat coefficients; b: per tensor, float32 flat offsets.
        labels: per tensor, uint8/int16(uint16)/int32/int64 labels in ``[0, M)``.
        r: ``(M,)`` mode scalars (any float dtype; rounded to float32 first).
    """
    same_len(weights=weights, a=a, b=b, labels=labels)
    if not weights:
        return
    k = compiled()
    dev = device_of([*weights, *a, *b, *labels, r], _interpret)
    rows = list(zip(weights, a, b, labels))
    check_rows(rows, [("weight", WEIGHT_DTYPES), ("a", ASSIGN_A_DTYPES), ("b", (torch.float32,))], r.numel())
    _launch_elementwise(k.assign, dev, rows, (r.to(torch.float32).contiguous(),), r.numel())


@torch.no_grad()
def form(weights: Sequence[Tensor], a: Sequence[Tensor], labels: Sequence[Tensor], delta: Tensor,
         scales: Sequence[Tensor] | None = None) -> list[Tensor]:
    """Out of place, for every tensor: ``(float32(w) + float32(a) * float32(delta)[label]).to(w.dtype)``,
    a new contiguous tensor of ``w``'s shape (rounded once, to nearest even, like torch's ``.to()``).

    Args:
        weights: float32/bfloat16/float16 contiguous tensors (any shape), read only.
        a: per tensor, float32/bfloat16 coefficients, flat, ``w.numel()`` elements (int8 codes with ``scales``).
        labels: per tensor, uint8/int16(uint16)/int32/int64 labels in ``[0, M)`` (packed 4-bit with ``scales``).
        delta: ``(M,)`` (any float dtype; rounded to float32 first).
        scales: the 8-bit encoding, as in :func:`update`: tensor ``t`` reads ``float32(scales[t] * delta)``.
    """
    same_len(weights=weights, a=a, labels=labels)
    if not weights:
        return []
    scales = list(scales or ())
    check_scales(a, scales, delta.numel())
    k = compiled()
    dev = device_of([*weights, *a, *labels, delta], _interpret)
    check_rows(list(zip(weights, a, labels)), [("weight", WEIGHT_DTYPES), ("a", A_DTYPES)], delta.numel(),
                packed_ok=True)
    out = [torch.empty_like(w, memory_format=torch.contiguous_format) for w in weights]
    d = delta.to(torch.float32).contiguous()
    # the kernel takes (w, a, labels, out, delta): the row's labels are not last, so launch directly
    with launch_on(dev):
        for j, (w, x, lab, o) in enumerate(zip(weights, a, labels, out)):
            size = w.numel()
            if size:
                dj = d if not scales else (scales[j].to(device=dev, dtype=torch.float32) * d).contiguous()
                k.form[(k.cdiv(size, ELEMENTWISE_BLOCK),)](w, x, lab, o, dj, size, delta.numel(),
                                                         LABEL_U16=lab.dtype == torch.int16,
                                                         BLOCK=ELEMENTWISE_BLOCK, LABEL_U4=is_packed(lab, size),
                                                         num_warps=4, enable_fp_fusion=False)
    return out
