"""The fused CPU kernels' C library: its source, build, SHA-256-checked cache, self-test and fallback.

The source (``fused_cpu.c`` beside this file) is compiled on first use with the system C compiler
(``$CC``, else ``cc``/``gcc``/``clang``) into ``$MODEOPT_CACHE`` (default ``~/.cache/modeopt``) as
``kernels-v2-<key>.so`` (the key hashes the source, compiler, flags and CPU), with its SHA-256
beside it, and loaded through ``ctypes``. The cache is trusted code (a ``.so`` loaded into the
process). :func:`library` never raises for a failure to build or load: it returns None (the torch
reference runs) and issues one :class:`~modeopt.modespace.kernels.switch.KernelWarning` naming the cause and
the fix; a bad cached file is rebuilt (see :func:`_build`).

Entry points (``ctypes`` releases the GIL while they run; ``a`` is ``f32``, ``bf16`` or ``i8`` (codes),
labels ``u8``/``u16``/``i32`` or ``u4`` (packed two per byte); pointers to contiguous CPU memory, ``n``
elements, packed labels starting at an even element):

* ``reduce_<a>_<l>(g, a, lab, n, acc, M)`` - ``acc[bank][lab[i]] += double(a[i] * g[i])``, float32
  ``g``, ``acc`` float64 of ``UNROLL * M``; ``reduce_<g>_<a>_<l>`` the same for bfloat16/float16 ``g``
  (:data:`G_NAMES`; converted exactly to float32 first, so the sums are bit for bit those of the
  float32 kernel on ``g.float()``; :func:`reduce_entry` names them); ``fold_banks(acc, M, out)``
  adds the banks into ``out``, ``fold_banks_scaled(acc, M, scale, out)`` adds ``scale[m]``
  (float64) times them;
* ``update_<a>_<l>(w, a, lab, delta, n)`` - ``w[i] += a[i] * delta[lab[i]]``, float32 ``w``, ``delta``;
* ``welford_<l>(w, mean, com, lab, dr, inv_n, n)`` - float32 ``w``, float64 moments and ``dr``;
* ``assign_<l>(w, a, b, lab, r, n)`` - ``w[i] = a[i] * r[lab[i]] + b[i]``, all float32;
* ``form_<w>_<a>_<l>(w, a, lab, out, delta, n)`` - ``out[i] = w(float(w[i]) + a[i] * delta[lab[i]])``
  out of place, ``w``/``out`` bfloat16 or float16 (:data:`W_NAMES`), float32 ``delta``, one rounding.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from .switch import KernelWarning

__all__ = ["SOURCE", "UNROLL", "A_NAMES", "L_NAMES", "W_NAMES", "G_NAMES", "PACKED", "reduce_entry", "library", "compiler", "library_path", "digest_path",
           "sha256", "compile_library", "load"]

logger = logging.getLogger("modeopt")

#: The C source of the kernels.
SOURCE = Path(__file__).with_name("fused_cpu.c")
#: Accumulator banks per mode of ``reduce_*`` (must match ``UNROLL`` in the C source).
UNROLL = 8
#: Coefficient dtypes the C code covers, and their names in the entry points (int8: the codes of
#: the 8-bit encoding, see :mod:`modeopt.modespace.kernels.encoding`).
A_NAMES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.int8: "i8"}
#: Label dtypes the C code covers (int16 read as uint16), and their names in the entry points.
L_NAMES = {torch.uint8: "u8", torch.int16: "u16", torch.int32: "i32"}
#: Half-precision weight dtypes ``form_*`` covers, and their names in the entry points.
W_NAMES = {torch.bfloat16: "bf16", torch.float16: "f16"}
#: Gradient dtypes ``reduce_*`` covers: float32 (``reduce_<a>_<l>``) and the half-precision ones
#: named here (``reduce_<g>_<a>_<l>``), the gradients of bf16/fp16 models.
G_NAMES = {torch.float32: "", torch.bfloat16: "bf16", torch.float16: "f16"}
#: The name of packed 4-bit labels (uint8 storage, two per byte) in the entry points.
PACKED = "u4"


def reduce_entry(g: torch.dtype, a: torch.dtype, label_name: str) -> str:
    """The name of the ``reduce`` entry point for gradients of dtype ``g`` (a key of :data:`G_NAMES`),
    coefficients of dtype ``a`` (of :data:`A_NAMES`) and labels named ``label_name`` (of
    :data:`L_NAMES`' values or :data:`PACKED`)."""
    gn = G_NAMES[g]
    return f"reduce_{gn + '_' if gn else ''}{A_NAMES[a]}_{label_name}"

_lib = None
_lib_tried = False
_lock = threading.Lock()


def _cache_dir() -> Path:
    return Path(os.environ.get("MODEOPT_CACHE", Path.home() / ".cache" / "modeopt"))


# -ffp-contract=off: a * d + w is a rounded product then an add, as in torch and Triton (no FMA)
_FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-std=c99", "-ffp-contract=off"]


def compiler() -> str | None:
    """The C compiler to build with: ``$CC``, else ``cc``, ``gcc`` or ``clang`` on the PATH; None if none."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


#: Bumped when the cache layout changes (v2: a digest file beside every library).
_CACHE_FORMAT = "v2"


def library_path(cc: str | None = None, cache: Path | None = None) -> Path:
    """Where the compiled library for this source, compiler, flags and CPU is cached."""
    cc = cc or compiler() or "cc"
    key = hashlib.sha256(SOURCE.read_bytes()
                         + " ".join([cc, *_FLAGS, platform.machine(), _cpu_flags()]).encode()).hexdigest()[:16]
    return (cache or _cache_dir()) / f"kernels-{_CACHE_FORMAT}-{key}.so"


def digest_path(lib: Path) -> Path:
    """Where the SHA-256 (hex text) of the cached library ``lib`` is recorded: ``<lib>.sha256``."""
    return lib.with_name(lib.name + ".sha256")


def sha256(path: Path) -> str:
    """The hex SHA-256 of the file at ``path``."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _KernelError(Exception):
    """Why a compiled library cannot be used (a short, user-facing cause)."""


def compile_library(cc: str, directory: Path) -> Path:
    """Compile :data:`SOURCE` with ``cc`` into a fresh temporary name in ``directory``; returns its path.

    Raises ``_KernelError`` (a short, user-facing cause) if the compiler fails or cannot run."""
    fd, tmp = tempfile.mkstemp(prefix="kernels-", suffix=".so.tmp", dir=directory)
    os.close(fd)
    try:
        subprocess.run([cc, *_FLAGS, str(SOURCE), "-o", tmp], check=True, capture_output=True, timeout=120)
    except subprocess.CalledProcessError as e:
        Path(tmp).unlink(missing_ok=True)
        detail = (e.stderr or b"").decode(errors="replace").strip()[:300]
        raise _KernelError(f"compiling with {cc} failed: {detail}") from None
    except (subprocess.SubprocessError, OSError) as e:
        Path(tmp).unlink(missing_ok=True)
        raise _KernelError(f"running the compiler {cc} failed: {e}") from None
    return Path(tmp)


def load(path: Path) -> ctypes.CDLL:
    """Load ``path``, declare every entry point and check each against the torch reference.

    Raises ``_KernelError`` if it cannot be loaded, lacks an entry point or computes wrong results."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise _KernelError(f"it cannot be loaded ({e})") from None
    vp, i64 = ctypes.c_void_p, ctypes.c_int64
    try:
        for adt, an in A_NAMES.items():
            for ln in (*L_NAMES.values(), PACKED):
                for gdt in G_NAMES:
                    getattr(lib, reduce_entry(gdt, adt, ln)).argtypes = [vp, vp, vp, i64, vp, i64]
                getattr(lib, f"update_{an}_{ln}").argtypes = [vp, vp, vp, vp, i64]
                for wn in W_NAMES.values():
                    getattr(lib, f"form_{wn}_{an}_{ln}").argtypes = [vp, vp, vp, vp, vp, i64]
        lib.fold_banks.argtypes = [vp, i64, vp]
        lib.fold_banks_scaled.argtypes = [vp, i64, vp, vp]
        for ln in L_NAMES.values():
            getattr(lib, f"welford_{ln}").argtypes = [vp, vp, vp, vp, vp, ctypes.c_double, i64]
            getattr(lib, f"assign_{ln}").argtypes = [vp, vp, vp, vp, vp, i64]
    except AttributeError as e:
        raise _KernelError(f"it lacks an entry point ({e})") from None
    _self_test(lib)
    return lib


def _self_test(lib: ctypes.CDLL) -> None:
    """Run every entry point once on a small input against the torch reference."""
    g = torch.Generator().manual_seed(0)
    n, m = 37, 5  # not a multiple of the unroll or the label load width: the tails run too
    w = torch.randn(n, generator=g)
    x32 = torch.randn(n, generator=g)
    lab = torch.randint(0, m, (n,), generator=g)
    delta = torch.randn(m, generator=g)
    halves = {dt: w.to(dt) for dt in G_NAMES if dt != torch.float32}
    halves[torch.float16][:3] = torch.tensor([2.0 ** -24, -3 * 2.0 ** -20, 2.0 ** -14])  # subnormals, the edge
    from .encoding import pack_labels

    with torch.no_grad():
        for adt, an in A_NAMES.items():
            x = (x32 * 40).round().to(adt) if adt == torch.int8 else x32.to(adt)
            xf = x.to(torch.float32)
            for ldt, ln in (*L_NAMES.items(), (None, PACKED)):
                lt = pack_labels(lab) if ldt is None else lab.to(ldt)
                acc = torch.zeros(UNROLL * m, dtype=torch.float64)
                out = torch.zeros(m, dtype=torch.float64)
                getattr(lib, f"reduce_{an}_{ln}")(w.data_ptr(), x.data_ptr(), lt.data_ptr(), n, acc.data_ptr(), m)
                lib.fold_banks(acc.data_ptr(), m, out.data_ptr())
                ref = torch.bincount(lab, weights=(xf * w).to(torch.float64), minlength=m)
                if not torch.allclose(out, ref, rtol=1e-12, atol=1e-12):
                    raise _KernelError(f"its reduce_{an}_{ln} disagrees with the torch reference")
                for gdt, gh in halves.items():  # each half grad exactly as its float32 value
                    name = reduce_entry(gdt, adt, ln)
                    acc.zero_()
                    got = torch.zeros(m, dtype=torch.float64)
                    getattr(lib, name)(gh.data_ptr(), x.data_ptr(), lt.data_ptr(), n, acc.data_ptr(), m)
                    lib.fold_banks(acc.data_ptr(), m, got.data_ptr())
                    want = torch.zeros(m, dtype=torch.float64)
                    gf = gh.to(torch.float32)
                    acc.zero_()
                    getattr(lib, f"reduce_{an}_{ln}")(gf.data_ptr(), x.data_ptr(), lt.data_ptr(), n, acc.data_ptr(), m)
                    lib.fold_banks(acc.data_ptr(), m, want.data_ptr())
                    ref = torch.bincount(lab, weights=(xf * gf).to(torch.float64), minlength=m)
                    if not (torch.equal(got, want) and torch.allclose(got, ref, rtol=1e-12, atol=1e-12)):
                        raise _KernelError(f"its {name} disagrees with the torch reference")
                y = w.clone()
                getattr(lib, f"update_{an}_{ln}")(y.data_ptr(), x.data_ptr(), lt.data_ptr(), delta.data_ptr(), n)
                if not torch.allclose(y, w + xf * delta[lab], rtol=1e-6, atol=1e-6):
                    raise _KernelError(f"its update_{an}_{ln} disagrees with the torch reference")
                for wdt, wn in W_NAMES.items():
                    wh = w.to(wdt)
                    got = torch.empty_like(wh)
                    getattr(lib, f"form_{wn}_{an}_{ln}")(wh.data_ptr(), x.data_ptr(), lt.data_ptr(),
                                                         got.data_ptr(), delta.data_ptr(), n)
                    want = (wh.to(torch.float32) + xf * delta[lab]).to(wdt)
                    if not torch.equal(got, want):  # one rounding, bit for bit
                        raise _KernelError(f"its form_{wn}_{an}_{ln} disagrees with the torch reference")
        scale = torch.rand(m, generator=g, dtype=torch.float64)
        acc = torch.randn(UNROLL * m, generator=g, dtype=torch.float64)
        out = torch.zeros(m, dtype=torch.float64)
        lib.fold_banks_scaled(acc.data_ptr(), m, scale.data_ptr(), out.data_ptr())
        if not torch.allclose(out, scale * acc.view(UNROLL, m).sum(0), rtol=1e-12, atol=1e-12):
            raise _KernelError("its fold_banks_scaled disagrees with the torch reference")
        for ldt, ln in L_NAMES.items():
            lt = lab.to(ldt)
            mean = torch.randn(n, generator=g, dtype=torch.float64)
            com = torch.randn(n, generator=g, dtype=torch.float64)
            dr = torch.randn(m, generator=g, dtype=torch.float64)
            mu, c = mean.clone(), com.clone()
            getattr(lib, f"welford_{ln}")(w.data_ptr(), mu.data_ptr(), c.data_ptr(), lt.data_ptr(), dr.data_ptr(),
                                          0.25, n)
            dw = w.to(torch.float64) - mean
            if not (torch.allclose(mu, mean + 0.25 * dw, rtol=1e-12, atol=1e-12)
                    and torch.allclose(c, com + dw * dr[lab], rtol=1e-12, atol=1e-12)):
                raise _KernelError(f"its welford_{ln} disagrees with the torch reference")
            y = torch.empty(n)
            getattr(lib, f"assign_{ln}")(y.data_ptr(), x32.data_ptr(), w.data_ptr(), lt.data_ptr(), delta.data_ptr(), n)
            if not torch.allclose(y, x32 * delta[lab] + w, rtol=1e-6, atol=1e-6):
                raise _KernelError(f"its assign_{ln} disagrees with the torch reference")


_FIX = ("To fix: make CC (or cc/gcc/clang on the PATH) a working C compiler (unset a CC that points "
        "nowhere), make MODEOPT_CACHE (default ~/.cache/modeopt) a writable directory, or clear it "
        "(rm -rf ~/.cache/modeopt, or $MODEOPT_CACHE); MODEOPT_KERNELS=torch turns the fused kernels off "
        "and silences this")


def _build() -> tuple[ctypes.CDLL | None, str | None]:
    """Build (or reuse from the cache) and load the library: ``(library or None, warning or None)``.

    ``None`` means the torch path. Raises nothing for a failure of building or loading:

    * a cached library is loaded only if it matches the SHA-256 recorded beside it when it was
      built (a truncated library can crash the dynamic loader with SIGBUS, which no ``try`` catches);
    * one that does not, cannot be loaded, lacks an entry point or fails the self-test is deleted
      and rebuilt once, under a fresh name (the dynamic loader caches libraries by path);
    * an unwritable cache builds into a temporary directory (removed once the library is loaded);
    * whatever still fails gives the torch path.

    Every such event is described in the returned warning.
    """
    cc = compiler()
    if cc is None:
        logger.info("modeopt: no C compiler found; mode-space steps use the torch fallback")
        return None, None
    problems: list[str] = []
    out = library_path(cc)
    digest = digest_path(out)
    use_temp = False
    if out.exists():
        try:
            recorded = digest.read_text().strip()
        except OSError:
            recorded = None
        try:
            actual = sha256(out)
        except OSError as e:
            actual = f"unreadable ({e})"
        if recorded is None:
            problems.append(f"the cached library {out} has no recorded digest ({digest.name})")
        elif recorded != actual:
            problems.append(f"the cached library {out} does not match its recorded digest (truncated or modified)")
        else:
            try:
                return load(out), None
            except _KernelError as e:
                problems.append(f"the cached library {out} is unusable: {e}")
        try:
            out.unlink()  # never loaded again; rebuilt below
            digest.unlink(missing_ok=True)
        except OSError as e:
            problems.append(f"it cannot be removed ({e}), so it is rebuilt into a temporary directory")
            use_temp = True
    if not use_temp:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            tempfile.NamedTemporaryFile(dir=out.parent, prefix=".probe-").close()  # writable?
        except OSError as e:
            problems.append(f"the cache directory {out.parent} is not writable ({e}), so the library is built "
                            "into a temporary directory for this process")
            use_temp = True
    temporary = Path(tempfile.mkdtemp(prefix="modeopt-kernels-")) if use_temp else None
    lib = None
    try:
        tmp = compile_library(cc, temporary or out.parent)
        try:
            lib = load(tmp)  # under its fresh name; a loaded library stays mapped when renamed
        except _KernelError as e:
            problems.append(f"the freshly built library is unusable: {e}")
        if lib is not None and temporary is None:
            try:
                _write_atomic(digest, sha256(tmp))  # digest first: a library without one is never loaded
                os.replace(tmp, out)  # atomic: concurrent builders never see a half-written file
            except OSError as e:
                problems.append(f"caching the built library failed ({e})")
        Path(tmp).unlink(missing_ok=True)
    except _KernelError as e:
        problems.append(str(e))
    except OSError as e:
        problems.append(f"building the library failed: {e}")
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
    if lib is None:
        if not problems:  # pragma: no cover - every failure above records its cause
            problems.append("the library could not be built")
        return None, "; ".join(problems) + ". Mode-space steps use the (slower) torch path. " + _FIX
    if problems:
        return lib, "; ".join(problems) + ". The fused kernels are in use. " + _FIX
    return lib, None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def library() -> ctypes.CDLL | None:
    """The loaded library, built on the first call (thread-safe); None where it cannot be built or
    loaded (one :class:`KernelWarning` then) or with ``MODEOPT_KERNELS=torch`` (silently)."""
    global _lib, _lib_tried
    if _lib_tried:
        return _lib
    message = None
    with _lock:
        if not _lib_tried:
            if os.environ.get("MODEOPT_KERNELS", "auto") != "torch" and not SOURCE.is_file():
                message = (f"the C source {SOURCE} is missing from this installation (a build of modeopt without "
                           "its package data): mode-space steps use the torch path; reinstall modeopt")
            elif os.environ.get("MODEOPT_KERNELS", "auto") != "torch":
                try:
                    _lib, message = _build()
                except Exception as e:  # noqa: BLE001 - the torch path always works
                    _lib, message = None, f"unexpected failure ({e!r}). Mode-space steps use the torch path. {_FIX}"
            _lib_tried = True
    if message is not None:  # outside the lock, state settled: a filter that raises leaves it consistent
        warnings.warn(f"modeopt: fused CPU kernels: {message}", KernelWarning, stacklevel=3)
    return _lib

