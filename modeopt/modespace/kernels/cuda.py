"""The CUDA implementations of the four passes: the Triton kernels where they cover the case, else the torch reference.

Triton (:mod:`modeopt.modespace.kernels.triton_kernels`, imported only here, on first CUDA use) covers
contiguous float32/bfloat16/float16 weights and grads, float32/bfloat16 ``a`` (float32 ``b``,
float64 moments), labels of any compact dtype, and ``reduce`` up to ``MAX_REDUCE_MODES`` modes;
``reduce`` and ``update`` also the 8-bit encoding (int8 codes, per-tensor scales, packed labels).
``update`` splits its tensors: the covered ones run in Triton, the rest (e.g. channels_last weights)
in :mod:`modeopt.modespace.kernels.reference`; the other passes run all-Triton or all-reference. Nothing
synchronises with the host except the one-off self-test below.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from . import reference, triton_kernels
from .switch import KernelWarning, torch_only

__all__ = ["triton_usable", "triton_self_test", "reduce", "update", "welford", "assign", "form"]

_F32 = (torch.float32,)
_F64 = (torch.float64,)

#: Whether Triton imports (None before the first question).
_triton_imports: bool | None = None
#: CUDA device index -> whether the Triton kernels passed their self-test there.
_device_ok: dict = {}


def triton_usable(device: torch.device | None = None) -> bool:
    """Whether the CUDA implementations may use the Triton kernels (on ``device``).

    The first use on a CUDA device runs :func:`triton_self_test` there (one host sync, once per
    device and process; skipped, and trusted, while a CUDA graph is being captured). False under
    ``use_fused(False)`` or ``MODEOPT_KERNELS=torch``.
    """
    global _triton_imports
    if torch_only():
        return False
    if _triton_imports is None:
        _triton_imports = triton_kernels.available()
    if not _triton_imports or device is None or device.type != "cuda":
        return _triton_imports
    ok = _device_ok.get(device.index)
    if ok is None:
        if torch.cuda.is_current_stream_capturing():
            return True
        ok = _device_ok[device.index] = triton_self_test(device)
    return ok


def _close(x: Tensor, y: Tensor, tol: float) -> bool:
    return torch.allclose(x, y, rtol=tol, atol=tol)


def triton_self_test(device: torch.device) -> bool:
    """Every Triton kernel once on a small input on ``device`` against the torch reference.

    Returns False, with one :class:`KernelWarning`, if a kernel fails to compile, raises or disagrees."""
    tk = triton_kernels
    try:
        g = torch.Generator().manual_seed(0)
        n, m = 37, 5
        w, x, b = (torch.randn(n, generator=g).to(device) for _ in range(3))
        lab = torch.randint(0, m, (n,), generator=g).to(torch.uint8).to(device)
        d = torch.randn(m, generator=g).to(device)
        if not torch.allclose(tk.reduce([w], [x], [lab], m), reference.reduce([w], [x], [lab], m), rtol=1e-5,
                              atol=1e-6):
            raise RuntimeError("reduce disagrees with the torch reference")
        y1, y2 = w.clone(), w.clone()
        tk.update([y1], [x], [lab], d)
        reference.update([y2], [x], [lab], d)
        if not _close(y1, y2, 1e-6):
            raise RuntimeError("update disagrees with the torch reference")
        mu = [torch.randn(n, generator=g, dtype=torch.float64).to(device)] * 2
        com = [torch.randn(n, generator=g, dtype=torch.float64).to(device)] * 2
        mu, com = [t.clone() for t in mu], [t.clone() for t in com]
        dr = d.double()
        tk.welford([w], mu[:1], com[:1], [lab], dr, 3)
        reference.welford([w], mu[1:], com[1:], [lab], dr, 3)
        if not (_close(mu[0], mu[1], 1e-12) and _close(com[0], com[1], 1e-12)):
            raise RuntimeError("welford disagrees with the torch reference")
        # the 8-bit encoding: int8 codes, a scale per mode, labels packed two per byte
        from .encoding import pack_labels, quantize

        q, sc = quantize(x, lab, m)
        packed = pack_labels(lab)
        if not torch.allclose(tk.reduce([w], [q], [packed], m, [sc]), reference.reduce([w], [q], [packed], m, [sc]),
                              rtol=1e-5, atol=1e-6):
            raise RuntimeError("reduce of the 8-bit encoding disagrees with the torch reference")
        y1, y2 = w.clone(), w.clone()
        tk.update([y1], [q], [packed], d, [sc])
        reference.update([y2], [q], [packed], d, [sc])
        if not _close(y1, y2, 1e-6):
            raise RuntimeError("update of the 8-bit encoding disagrees with the torch reference")
        y1, y2 = torch.empty_like(w), torch.empty_like(w)
        tk.assign([y1], [x], [b], [lab], d)
        reference.assign([y2], [x], [b], [lab], d)
        if not _close(y1, y2, 1e-6):
            raise RuntimeError("assign disagrees with the torch reference")
        for half in (torch.bfloat16, torch.float16):
            if not torch.equal(tk.form([w.to(half)], [x], [lab], d)[0], reference.form([w.to(half)], [x], [lab], d)[0]):
                raise RuntimeError(f"form ({half}) disagrees with the torch reference")
    except Exception as e:  # noqa: BLE001 - a Triton that cannot compile here: the torch path works
        warnings.warn(f"modeopt: the Triton kernels failed their self-test on {device} ({e!r}); mode-space "
                      "passes there use the (slower) torch path. MODEOPT_KERNELS=torch silences this",
                      KernelWarning, stacklevel=2)
        return False
    return True


def _covered(*groups: tuple[Sequence[Tensor], tuple], labels: Sequence[Tensor], n_modes: int) -> bool:
    """Whether every tensor of each ``(tensors, dtypes)`` group is contiguous of one of ``dtypes``
    and every label tensor contiguous, of a dtype that holds ``n_modes`` modes."""
    limits = triton_kernels.LABEL_MAX_MODES
    return (all(t.dtype in dtypes and t.is_contiguous() for tensors, dtypes in groups for t in tensors)
            and all(lab.is_contiguous() and n_modes <= limits.get(lab.dtype, 0) for lab in labels))


def reduce(grads: Sequence[Tensor | None], a: Sequence[Tensor], labels: Sequence[Tensor], n_modes: int,
           scales: Sequence[Tensor] = ()) -> Tensor:
    """``(n_modes,)`` float64 on the device; see :func:`modeopt.modespace.kernels.reference.reduce`
    (``scales``: the 8-bit encoding)."""
    tk = triton_kernels
    scales = list(scales or ())
    if triton_usable(a[0].device) and tk.supports(n_modes):
        items = [(g, x, lab) for g, x, lab in zip(grads, a, labels) if g is not None]
        # grads of a covered dtype in any layout (made contiguous below)
        if (all(g.dtype in tk.WEIGHT_DTYPES for g, _, _ in items)
                and _covered(([x for _, x, _ in items], tk.A_DTYPES), labels=[lab for _, _, lab in items],
                             n_modes=n_modes)):
            return tk.reduce([g if g is None else g.contiguous() for g in grads], a, labels, n_modes, scales)
    return reference.reduce(grads, a, labels, n_modes, scales or None)


def update(weights: Sequence[Tensor], a: Sequence[Tensor], labels: Sequence[Tensor], delta: Tensor,
           scales: Sequence[Tensor] = ()) -> None:
    """In place: ``w += a * delta[label]``, Triton for each covered tensor, the reference for the rest;
    see :func:`modeopt.modespace.kernels.reference.update` (``scales``: the 8-bit encoding)."""
    tk = triton_kernels
    scales = list(scales or ())
    pick = lambda xs, js: [xs[j] for j in js] if xs else None  # noqa: E731
    rest = list(range(len(weights)))
    if triton_usable(delta.device):
        m = delta.numel()
        fast = [j for j in rest if _covered(([weights[j]], tk.WEIGHT_DTYPES), ([a[j]], tk.A_DTYPES),
                                            labels=[labels[j]], n_modes=m)]
        if fast:
            tk.update(pick(weights, fast), pick(a, fast), pick(labels, fast), delta, pick(scales, fast))
            done = set(fast)
            rest = [j for j in rest if j not in done]
    if rest:
        reference.update(pick(weights, rest), pick(a, rest), pick(labels, rest), delta, pick(scales, rest))


def welford(flat: Sequence[Tensor], mean: Sequence[Tensor], comoment: Sequence[Tensor], labels: Sequence[Tensor],
            dr: Tensor, n: int) -> None:
    """One Welford/Chan sample in place, float64; see :func:`modeopt.modespace.kernels.reference.welford`."""
    tk = triton_kernels
    if (triton_usable(dr.device) and n >= 1
            and _covered((flat, tk.WEIGHT_DTYPES), (mean, _F64), (comoment, _F64), labels=labels,
                         n_modes=dr.numel())):
        return tk.welford(flat, mean, comoment, labels, dr, n)
    return reference.welford(flat, mean, comoment, labels, dr, n)


def assign(weights: Sequence[Tensor], a: Sequence[Tensor], b: Sequence[Tensor], labels: Sequence[Tensor],
           r: Tensor) -> None:
    """In place: ``w = a * r[label] + b``; see :func:`modeopt.modespace.kernels.reference.assign`."""
    tk = triton_kernels
    if (triton_usable(r.device)
            and _covered((weights, tk.WEIGHT_DTYPES), (a, tk.ASSIGN_A_DTYPES), (b, _F32), labels=labels,
                         n_modes=r.numel())):
        return tk.assign(weights, a, b, labels, r)
    return reference.assign(weights, a, b, labels, r)


def form(weights: Sequence[Tensor], a: Sequence[Tensor], labels: Sequence[Tensor], delta: Tensor,
         scales: Sequence[Tensor] = ()) -> list[Tensor]:
    """Out of place: ``w + a * delta[label]`` rounded once to ``w``'s dtype, Triton where every tensor
    is covered, else the torch reference; see :func:`modeopt.modespace.kernels.reference.form`
    (``scales``: the 8-bit encoding)."""
    tk = triton_kernels
    scales = list(scales or ())
    if (triton_usable(delta.device)
            and _covered((weights, tk.WEIGHT_DTYPES), (a, tk.A_DTYPES), labels=labels, n_modes=delta.numel())):
        return tk.form(weights, a, labels, delta, scales)
    return reference.form(weights, a, labels, delta, scales or None)
