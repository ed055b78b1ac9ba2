"""Checks of ``modeopt.modespace.kernels.triton_kernels`` against torch references, shared by the interpreter run and
the CUDA run of ``tests/test_triton_kernels.py``.

``python tests/_triton_check.py [device]`` (run with ``TRITON_INTERPRET=1`` on CPU) prints one JSON
object: ``{pass name: [{"case": str, "ok": bool, "detail": str}, ...]}``. The test imports
:func:`run_all` directly for CUDA tensors.

References are written in the op order the kernels promise:
update ``(w.float() + a.float() * delta.float()[lab]).to(w.dtype)`` and assign
``(a.float() * r.float()[lab] + b).to(w.dtype)`` bitwise; reduce against a float64 ``bincount``
within 1e-6 of ``sum |a g|`` per mode, and bitwise equal across two runs; welford within 1e-12.
"""

from __future__ import annotations

import json
import sys
import time
import traceback

import torch

from modeopt.modespace.kernels import triton_kernels as tk

SIZES = (1, 7, 1023, 5001)


def _index(lab: torch.Tensor) -> torch.Tensor:
    idx = lab.to(torch.int64)
    return idx & 0xFFFF if lab.dtype == torch.int16 else idx


def _labels(n: int, m: int, dtype: torch.dtype, gen: torch.Generator, device: str, high: bool = False) -> torch.Tensor:
    lab = torch.randint(0, m, (n,), generator=gen)
    k = min(n, 8, m)
    if high and k:  # make sure the top of the range (e.g. uint16 values > 32767 in int16) is used
        lab[:k] = torch.arange(m - k, m)
    return lab.to(dtype).to(device)  # int16: values >= 32768 wrap to negative (uint16 storage)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that NaN payloads and -0.0 compare too."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _mismatches(ws, refs) -> list[int]:
    return [int((_bits(w) != _bits(ref)).sum()) for w, ref in zip(ws, refs)]


def _rand(n: int, dtype: torch.dtype, gen: torch.Generator, device: str) -> torch.Tensor:
    return torch.randn(n, generator=gen).to(dtype).to(device)


class _Results:
    def __init__(self):
        self.rows: list[dict] = []

    def case(self, name: str, fn) -> None:
        t0 = time.perf_counter()
        try:
            ok, detail = fn()
        except Exception:  # a crash is a failed case, with its traceback
            ok, detail = False, traceback.format_exc()[-2000:]
        self.rows.append({"case": name, "ok": bool(ok), "detail": str(detail),
                          "seconds": round(time.perf_counter() - t0, 3)})


# ------------------------------------------------------------------------------------------ reduce


def _reduce_ref(grads, a, labels, m):
    out = torch.zeros(m, dtype=torch.float64)
    scale = torch.zeros(m, dtype=torch.float64)
    for g, x, lab in zip(grads, a, labels):
        if g is None:
            continue
        v = g.cpu().double() * x.cpu().double()
        idx = _index(lab.cpu())
        out += torch.bincount(idx, weights=v, minlength=m)
        scale += torch.bincount(idx, weights=v.abs(), minlength=m)
    return out, scale


def _reduce_case(sizes, m, g_dtype, a_dtype, l_dtype, device, seed, none_at=(), chunk=None):
    def run():
        gen = torch.Generator().manual_seed(seed)
        grads, a, labels = [], [], []
        for t, n in enumerate(sizes):
            g = _rand(n, g_dtype, gen, device)
            grads.append(None if t in none_at else g)
            a.append(_rand(n, a_dtype, gen, device))
            labels.append(_labels(n, m, l_dtype, gen, device, high=True))
        out1 = tk.reduce(grads, a, labels, m, chunk=chunk)
        out2 = tk.reduce(grads, a, labels, m, chunk=chunk)
        ref, scale = _reduce_ref(grads, a, labels, m)
        if out1.dtype != torch.float64 or out1.shape != (m,) or out1.device.type != torch.device(device).type:
            return False, f"bad result {out1.dtype} {tuple(out1.shape)} {out1.device}"
        err = (out1.cpu() - ref).abs()
        worst = float((err / scale.clamp_min(1e-300)).max()) if m else 0.0
        det = torch.equal(out1, out2)
        ok = bool((err <= 1e-6 * scale).all()) and det
        return ok, f"max rel err {worst:.2e}, deterministic {det}"

    return run


def check_reduce(device: str) -> list[dict]:
    r = _Results()
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    u8, i16, i32, i64 = torch.uint8, torch.int16, torch.int32, torch.int64
    r.case("M=1 u8 f32, sizes 1/7", _reduce_case((1, 7), 1, f32, f32, u8, device, 1))
    r.case("M=3 u8, odd sizes, a None grad", _reduce_case(SIZES, 3, f32, f32, u8, device, 2, none_at=(1,)))
    r.case("M=3 bf16 grads, bf16 a", _reduce_case(SIZES, 3, bf16, bf16, u8, device, 3))
    r.case("M=256 u8 fp16 grads", _reduce_case((1023, 5001), 256, f16, f32, u8, device, 4))
    r.case("M=257 int16 labels", _reduce_case((7, 5001), 257, f32, bf16, i16, device, 5))
    r.case("M=1000 int32 labels (8 mode tiles)", _reduce_case((1023, 1501), 1000, f32, f32, i32, device, 6))
    r.case("M=4096 int16 (max, 32 mode tiles)", _reduce_case((1, 600), 4096, bf16, f32, i16, device, 7))
    r.case("M=5 int64 labels", _reduce_case((5001,), 5, f32, f32, i64, device, 8))
    r.case("M=300 chunk=64: many rows, 4 tensors",
           _reduce_case((1, 7, 1023, 1500), 300, f32, f32, i16, device, 9, none_at=(0,), chunk=64))
    r.case("M=3 40000 elements: several default chunks", _reduce_case((40000,), 3, f32, f32, u8, device, 10))
    r.case("empty tensor among others", _reduce_case((0, 7, 0), 3, f32, f32, u8, device, 11))

    def all_none():
        a = [torch.ones(3, device=device)]
        lab = [torch.zeros(3, dtype=torch.uint8, device=device)]
        out = tk.reduce([None], a, lab, 4)
        return torch.equal(out.cpu(), torch.zeros(4, dtype=torch.float64)) and out.device == a[0].device, str(out)

    r.case("all grads None", all_none)
    return r.rows


# ------------------------------------------------------------------------------------------ update


def _elementwise_case(op, sizes, m, w_dtype, a_dtype, l_dtype, device, seed):
    """``tk.update`` (``w + a * t[label]``) or ``tk.assign`` (``a * t[label] + b``) against the torch
    expression in float32, rounded once to the weight's dtype: bitwise equal."""

    def run():
        gen = torch.Generator().manual_seed(seed)
        ws = [_rand(n, w_dtype, gen, device) for n in sizes]
        a = [_rand(n, a_dtype, gen, device) for n in sizes]
        b = [_rand(n, torch.float32, gen, device) for n in sizes] if op == "assign" else None
        labels = [_labels(n, m, l_dtype, gen, device, high=True) for n in sizes]
        table = torch.randn(m, generator=gen, dtype=torch.float64).to(device)  # rounded to float32 inside
        t32 = table.float()
        if op == "assign":
            refs = [(x.float() * t32[_index(lab)] + y).to(w.dtype) for w, x, y, lab in zip(ws, a, b, labels)]
            tk.assign(ws, a, b, labels, table)
        else:
            refs = [(w.float() + x.float() * t32[_index(lab)]).to(w.dtype) for w, x, lab in zip(ws, a, labels)]
            tk.update(ws, a, labels, table)
        bad = _mismatches(ws, refs)
        return sum(bad) == 0, f"mismatches per tensor {bad}"

    return run


def check_update(device: str) -> list[dict]:
    r = _Results()
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    u8, i16, i32, i64 = torch.uint8, torch.int16, torch.int32, torch.int64
    r.case("f32 w, f32 a, u8 M=3", _elementwise_case("update", SIZES, 3, f32, f32, u8, device, 1))
    r.case("bf16 w, bf16 a, u8 M=256", _elementwise_case("update", SIZES, 256, bf16, bf16, u8, device, 2))
    r.case("fp16 w, f32 a, int16 M=257", _elementwise_case("update", SIZES, 257, f16, f32, i16, device, 3))
    r.case("f32 w, int16 M=40000 (labels > 32767)",
           _elementwise_case("update", SIZES, 40000, f32, bf16, i16, device, 4))
    r.case("bf16 w, int32 M=70000", _elementwise_case("update", SIZES, 70000, bf16, f32, i32, device, 5))
    r.case("f32 w, int64 M=1", _elementwise_case("update", (1, 7, 0), 1, f32, f32, i64, device, 6))

    def shaped():  # weights of any (contiguous) shape, flat a/labels in row-major order
        gen = torch.Generator().manual_seed(7)
        w = torch.randn(5, 3, 7, generator=gen).to(device)
        a = torch.randn(105, generator=gen).to(device)
        lab = _labels(105, 3, torch.uint8, gen, device)
        delta = torch.randn(3, generator=gen).to(device)
        ref = (w.reshape(-1) + a * delta[_index(lab)]).view(w.shape)
        tk.update([w], [a], [lab], delta)
        return _mismatches([w], [ref]) == [0], ""

    r.case("3-D weight", shaped)
    return r.rows


# ------------------------------------------------------------------------------------------ welford


def _welford_case(sizes, m, w_dtype, l_dtype, n_sample, device, seed):
    def run():
        gen = torch.Generator().manual_seed(seed)
        ws = [_rand(n, w_dtype, gen, device) for n in sizes]
        mean = [torch.randn(n, generator=gen, dtype=torch.float64).to(device) for n in sizes]
        com = [torch.randn(n, generator=gen, dtype=torch.float64).to(device) for n in sizes]
        labels = [_labels(n, m, l_dtype, gen, device, high=True) for n in sizes]
        dr = torch.randn(m, generator=gen, dtype=torch.float64).to(device)
        ref_mean, ref_com = [], []
        for w, mu, c, lab in zip(ws, mean, com, labels):
            dw = w.double() - mu
            ref_mean.append(mu + dw * (1.0 / n_sample))
            ref_com.append(c + dw * dr[_index(lab)])
        w_before = [w.clone() for w in ws]
        tk.welford(ws, mean, com, labels, dr, n_sample)
        err = max([0.0] + [float((x - y).abs().max()) for x, y in zip(mean + com, ref_mean + ref_com) if x.numel()])
        untouched = all(torch.equal(w, w0) for w, w0 in zip(ws, w_before))
        return err <= 1e-12 and untouched, f"max abs err {err:.2e}, weights untouched {untouched}"

    return run


def check_welford(device: str) -> list[dict]:
    r = _Results()
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    r.case("f32 w, u8 M=3, n=1", _welford_case(SIZES, 3, f32, torch.uint8, 1, device, 1))
    r.case("bf16 w, int16 M=40000, n=5", _welford_case(SIZES, 40000, bf16, torch.int16, 5, device, 2))
    r.case("fp16 w, int32 M=257, n=3", _welford_case(SIZES, 257, f16, torch.int32, 3, device, 3))
    r.case("f32 w, int64 M=1, n=7", _welford_case((7, 0), 1, f32, torch.int64, 7, device, 4))
    return r.rows


# ------------------------------------------------------------------------------------------ assign


def check_assign(device: str) -> list[dict]:
    r = _Results()
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    r.case("f32 w, u8 M=3", _elementwise_case("assign", SIZES, 3, f32, f32, torch.uint8, device, 1))
    r.case("bf16 w, bf16 a, int16 M=40000",
           _elementwise_case("assign", SIZES, 40000, bf16, bf16, torch.int16, device, 2))
    r.case("fp16 w, int32 M=257", _elementwise_case("assign", SIZES, 257, f16, f32, torch.int32, device, 3))
    r.case("f32 w, int64 M=1", _elementwise_case("assign", (1, 0, 7), 1, f32, f32, torch.int64, device, 4))

    def special(w_dtype):
        def run():
            # a = 0: w = 0 * r + b = b exactly (as float32), so b's bit patterns probe the rounding to
            # w's dtype: bfloat16 ties to even (low half 0x8000 on even and odd), just below/above a
            # tie, overflow to inf, inf, NaN, subnormals, fp16 overflow and subnormals.
            pats = [0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0x7F7FFFFF, 0x7F7F8000, 0x7F800000,
                    0xFF800000, 0x7FC00000, 0xFFC00001, 0x7F800001, 0x00000001, 0x00018000, 0x80000000,
                    0x477FF000, 0x477FEFFF, 0x33800000, 0x33000001, 0xC77FF000]
            b = torch.tensor(pats, dtype=torch.int64).to(torch.int32).view(torch.float32).to(device)
            n = b.numel()
            w = torch.zeros(n, dtype=w_dtype, device=device)
            a = torch.zeros(n, device=device)
            lab = torch.zeros(n, dtype=torch.uint8, device=device)
            rr = torch.ones(1, device=device)
            ref = (a * rr[_index(lab)] + b).to(w_dtype)
            tk.assign([w], [a], [b], [lab], rr)
            # NaN payloads are not a contract (torch itself writes 0xFFFF for a bfloat16 NaN on
            # CPU, 0x7FFF on CUDA): NaN must stay NaN, every other value must match bitwise.
            nan = torch.isnan(ref)
            ok = torch.equal(torch.isnan(w), nan) and _mismatches([w[~nan]], [ref[~nan]]) == [0]
            return ok, f"got {_bits(w).tolist()}, want {_bits(ref).tolist()}"

        return run

    r.case("bf16 rounding: ties, overflow, inf, NaN, subnormals", special(bf16))
    r.case("fp16 rounding: ties, overflow, inf, NaN, subnormals", special(f16))
    return r.rows


# ------------------------------------------------------------------------------- the 8-bit encoding


def _encoded(sizes, m, gen, device):
    """int8 codes, their per-mode scales, the labels (packed when m <= 16) and the plain label index."""
    from modeopt.modespace.kernels import encoding

    q, scales, labels, index = [], [], [], []
    for n in sizes:
        idx = torch.randint(0, m, (n,), generator=gen)
        if n:
            idx[: min(n, m)] = torch.arange(m - min(n, m), m)  # the top labels (nibble 15) occur
        x, s = encoding.quantize(torch.randn(n, generator=gen), idx, m)
        q.append(x.to(device))
        scales.append(s.to(device))
        labels.append((encoding.pack_labels(idx) if m <= 16 else idx.to(torch.uint8)).to(device))
        index.append(idx)
    return q, scales, labels, index


def _encoded_reduce_case(sizes, m, g_dtype, device, seed, none_at=()):
    """reduce of int8 codes: within 1e-6 of sum |q s g| of a float64 reference per mode, deterministic."""

    def run():
        gen = torch.Generator().manual_seed(seed)
        q, scales, labels, index = _encoded(sizes, m, gen, device)
        grads = [None if t in none_at else _rand(n, g_dtype, gen, device) for t, n in enumerate(sizes)]
        out1 = tk.reduce(grads, q, labels, m, scales)
        out2 = tk.reduce(grads, q, labels, m, scales)
        ref = torch.zeros(m, dtype=torch.float64)
        mag = torch.zeros(m, dtype=torch.float64)
        for g, x, s, idx in zip(grads, q, scales, index):
            if g is None:
                continue
            v = g.cpu().double() * x.cpu().double() * s.cpu().double()[idx]
            ref += torch.bincount(idx, weights=v, minlength=m)
            mag += torch.bincount(idx, weights=v.abs(), minlength=m)
        err = (out1.cpu() - ref).abs()
        det = torch.equal(out1, out2)
        return bool((err <= 1e-6 * mag).all()) and det, f"max err {float(err.max()):.2e}, deterministic {det}"

    return run


def _encoded_update_case(sizes, m, w_dtype, device, seed):
    """update of int8 codes: bitwise ``(w.float() + q.float() * (s * delta.float())[label]).to(w.dtype)``."""

    def run():
        gen = torch.Generator().manual_seed(seed)
        q, scales, labels, index = _encoded(sizes, m, gen, device)
        ws = [_rand(n, w_dtype, gen, device) for n in sizes]
        delta = torch.randn(m, generator=gen).to(device)
        refs = [(w.float() + x.float() * (s * delta)[idx.to(device)]).to(w.dtype)
                for w, x, s, idx in zip(ws, q, scales, index)]
        tk.update(ws, q, labels, delta, scales)
        bad = _mismatches(ws, refs)
        return sum(bad) == 0, f"mismatches per tensor {bad}"

    return run


def _encoded_form_case(sizes, m, w_dtype, device, seed):
    """form of int8 codes (out of place): bitwise the encoded update's result, weights untouched."""

    def run():
        gen = torch.Generator().manual_seed(seed)
        q, scales, labels, index = _encoded(sizes, m, gen, device)
        ws = [_rand(n, w_dtype, gen, device) for n in sizes]
        delta = (torch.randn(m, generator=gen) * 1e-3).to(device)
        refs = [(w.float() + x.float() * (s * delta)[idx.to(device)]).to(w.dtype)
                for w, x, s, idx in zip(ws, q, scales, index)]
        before = [w.clone() for w in ws]
        outs = tk.form(ws, q, labels, delta, scales)
        bad = _mismatches(outs, refs)
        untouched = all(torch.equal(_bits(w), _bits(w0)) for w, w0 in zip(ws, before))
        return sum(bad) == 0 and untouched, f"mismatches per tensor {bad}, untouched {untouched}"

    return run


def check_encoding(device: str) -> list[dict]:
    r = _Results()
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    r.case("reduce packed M=16, odd sizes, a None grad", _encoded_reduce_case(SIZES, 16, f32, device, 1, none_at=(1,)))
    r.case("reduce packed M=3, bf16 grads", _encoded_reduce_case(SIZES, 3, bf16, device, 2))
    r.case("reduce int8 codes, u8 labels M=40", _encoded_reduce_case(SIZES, 40, f16, device, 3))
    r.case("update packed M=16 f32 w", _encoded_update_case(SIZES, 16, f32, device, 4))
    r.case("update packed M=10 bf16 w", _encoded_update_case(SIZES, 10, bf16, device, 5))
    r.case("update int8 codes, u8 labels M=40 fp16 w", _encoded_update_case(SIZES, 40, f16, device, 6))
    r.case("form packed M=16 bf16 w", _encoded_form_case(SIZES, 16, bf16, device, 7))
    r.case("form int8 codes, u8 labels M=40 fp16 w", _encoded_form_case(SIZES, 40, f16, device, 8))
    ones = torch.ones(5, device=device)
    q = torch.ones(5, dtype=torch.int8, device=device)
    packed = torch.zeros(3, dtype=torch.uint8, device=device)
    r.case("int8 a without scales", _raises(ValueError, lambda: tk.update([ones], [q], [packed], ones[:3])))
    r.case("packed labels for 17 modes", _raises(
        ValueError, lambda: tk.update([ones], [q], [packed], torch.ones(17, device=device),
                                      [torch.ones(17, device=device)])))
    return r.rows


# ------------------------------------------------------------------------------------------ errors


def _raises(exc, fn):
    def run():
        try:
            fn()
        except exc as e:
            return True, f"{type(e).__name__}: {e}"
        return False, f"no {exc.__name__} raised"

    return run


def check_errors(device: str) -> list[dict]:
    r = _Results()
    ones = torch.ones(5, device=device)
    u8 = torch.zeros(5, dtype=torch.uint8, device=device)
    r.case("reduce M above the max", _raises(NotImplementedError,
                                             lambda: tk.reduce([ones], [ones], [u8], tk.MAX_REDUCE_MODES + 1)))
    r.case("reduce M=0", _raises(NotImplementedError, lambda: tk.reduce([ones], [ones], [u8], 0)))
    r.case("float64 grad", _raises(TypeError, lambda: tk.reduce([ones.double()], [ones], [u8], 3)))
    r.case("float16 a", _raises(TypeError, lambda: tk.reduce([ones], [ones.half()], [u8], 3)))
    r.case("uint8 labels for 300 modes", _raises(ValueError, lambda: tk.reduce([ones], [ones], [u8], 300)))
    r.case("size mismatch", _raises(ValueError, lambda: tk.update([ones], [ones[:4]], [u8], ones[:3])))
    r.case("list lengths differ", _raises(ValueError, lambda: tk.update([ones], [ones, ones], [u8], ones[:3])))
    r.case("non-contiguous weight", _raises(
        ValueError, lambda: tk.update([torch.ones(5, 2, device=device).t()], [ones.repeat(2)], [u8.repeat(2)],
                                      ones[:3])))
    r.case("float32 mean", _raises(TypeError, lambda: tk.welford([ones], [ones], [ones.double()], [u8], ones, 1)))
    r.case("welford n=0", _raises(ValueError, lambda: tk.welford([ones], [ones.double()], [ones.double()], [u8],
                                                                   ones.double(), 0)))
    r.case("bfloat16 b", _raises(TypeError, lambda: tk.assign([ones], [ones], [ones.bfloat16()], [u8], ones)))
    if device != "cpu":
        r.case("mixed devices", _raises(ValueError, lambda: tk.update([ones], [ones.cpu()], [u8], ones[:3])))
    return r.rows


# --------------------------------------------------------------------------------------------- form


def _form_case(sizes, m, w_dtype, a_dtype, l_dtype, device, seed, scale=1e-3):
    """``tk.form`` (out of place ``w + a * delta[label]``, one rounding) against the torch expression,
    bitwise, with the weights left untouched; deltas ``scale`` small so most sums fall between two
    neighbouring half-precision values (rounding decides every element)."""

    def run():
        gen = torch.Generator().manual_seed(seed)
        ws = [_rand(n, w_dtype, gen, device) for n in sizes]
        a = [_rand(n, a_dtype, gen, device) for n in sizes]
        labels = [_labels(n, m, l_dtype, gen, device, high=True) for n in sizes]
        delta = (torch.randn(m, generator=gen) * scale).to(device)
        before = [w.clone() for w in ws]
        refs = [(w.float() + x.float() * delta[_index(lab)]).to(w.dtype) for w, x, lab in zip(ws, a, labels)]
        outs = tk.form(ws, a, labels, delta)
        bad = _mismatches(outs, refs)
        untouched = all(torch.equal(_bits(w), _bits(w0)) for w, w0 in zip(ws, before))
        shapes = all(o.shape == w.shape and o.dtype == w.dtype for o, w in zip(outs, ws))
        return sum(bad) == 0 and untouched and shapes, f"mismatches {bad}, untouched {untouched}, shapes {shapes}"

    return run


def check_form(device: str) -> list[dict]:
    r = _Results()
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    u8, i16, i32 = torch.uint8, torch.int16, torch.int32
    r.case("bf16 w, bf16 a, u8 M=5", _form_case(SIZES, 5, bf16, bf16, u8, device, 11))
    r.case("bf16 w, f32 a, int16 M=40000", _form_case(SIZES, 40000, bf16, f32, i16, device, 12))
    r.case("fp16 w, f32 a, u8 M=3", _form_case(SIZES, 3, f16, f32, u8, device, 13))
    r.case("fp16 w, bf16 a, int32 M=70000, large deltas", _form_case(SIZES, 70000, f16, bf16, i32, device, 14, 10.0))
    r.case("f32 w, f32 a, u8 M=2", _form_case((1, 1023), 2, f32, f32, u8, device, 15))

    def shaped():  # a 3-D weight: output of its shape, labels in row-major order
        gen = torch.Generator().manual_seed(16)
        w = torch.randn(5, 3, 7, generator=gen).to(bf16).to(device)
        a = torch.randn(105, generator=gen).to(device)
        lab = _labels(105, 3, u8, gen, device)
        delta = torch.randn(3, generator=gen).to(device) * 1e-2
        ref = (w.reshape(-1).float() + a * delta[_index(lab)]).to(bf16).view(w.shape)
        out = tk.form([w], [a], [lab], delta)[0]
        return out.shape == w.shape and _mismatches([out], [ref]) == [0], ""

    r.case("3-D weight", shaped)
    return r.rows


CHECKS = {"reduce": check_reduce, "update": check_update, "welford": check_welford, "assign": check_assign,
          "form": check_form, "errors": check_errors, "encoding": check_encoding}


def run_all(device: str, names: list[str] | None = None) -> dict[str, list[dict]]:
    return {name: CHECKS[name](device) for name in (names or CHECKS)}


if __name__ == "__main__":
    dev = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    print(json.dumps(run_all(dev, sys.argv[2:] or None)))
