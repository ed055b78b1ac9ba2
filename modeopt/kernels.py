"""The two memory-bound passes of a mode-space step, fused, with a pure-torch fallback.

* :func:`reduce` - ``dL/dr_m = sum_{i in m} a_i g_i`` over many tensors, accumulated in float64;
* :func:`update` - ``w_i += a_i * delta[m(i)]`` in place.

On CPU the fused versions are a small C library (``_kernels.c``), compiled on first use with the
system C compiler (about a second) into ``$MODEOPT_CACHE`` (default ``~/.cache/modeopt``) and
called through ``ctypes``. The cache is trusted code (a ``.so`` loaded into the process); every
failure to build or load it ends in the torch path with one :class:`KernelWarning` (see
:func:`_build`), and a bad cached file is rebuilt. ``ctypes`` releases the GIL, so a few Python threads run the pieces in
parallel. Work is cut into pieces of fixed size and every piece reduces into its own accumulator,
folded in piece order: results do not depend on the number of threads or on timing.

Where no compiler is found, for dtypes the C code does not cover, or with ``MODEOPT_KERNELS=torch``,
the same passes run as torch operations (``bincount`` in float64, ``index_select`` + ``addcmul_``) -
the reference the fused code is tested against. On CUDA they run as the Triton kernels of
:mod:`modeopt.triton_kernels` where those cover the case, else as the torch reference.

Every public pass calls one ``torch.library`` operator (``torch.ops.modeopt.*``, registered by
:mod:`modeopt.ops` when this module is imported); the dispatcher picks the implementation for the
tensors' device. Labels are compact on every path (:func:`label_dtype`); the torch path reads them
through :func:`as_index` (on CPU into a reused int32 buffer).
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
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["reduce", "update", "welford", "assign", "fused_available", "use_fused", "label_dtype", "as_index",
           "check_labels", "KernelWarning"]

logger = logging.getLogger("modeopt")

PIECE = 1 << 18  # elements per piece of work (and per accumulator)
UNROLL = 8  # must match _kernels.c
_SOURCE = Path(__file__).with_name("_kernels.c")
_A_NAMES = {torch.float32: "f32", torch.bfloat16: "bf16"}
_L_NAMES = {torch.uint8: "u8", torch.int16: "u16", torch.int32: "i32"}

_lib = None
_lib_tried = False
_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def label_dtype(n_modes: int) -> torch.dtype:
    """The label dtype of a mode space with ``n_modes`` modes, on every device and path."""
    if n_modes <= 256:
        return torch.uint8
    if n_modes <= 65536:
        return torch.int16  # read as uint16 by the C code; torch ops see it through .to(int64)
    return torch.int32


def _cache_dir() -> Path:
    return Path(os.environ.get("MODEOPT_CACHE", Path.home() / ".cache" / "modeopt"))


_FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-std=c99"]


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


#: Bumped when the cache layout changes (v2: a digest file beside every library).
_CACHE_FORMAT = "v2"


def _library_path(cc: str | None = None, cache: Path | None = None) -> Path:
    """Where the compiled library for this source, compiler, flags and CPU is cached."""
    cc = cc or _compiler() or "cc"
    key = hashlib.sha256(_SOURCE.read_bytes()
                         + " ".join([cc, *_FLAGS, platform.machine(), _cpu_flags()]).encode()).hexdigest()[:16]
    return (cache or _cache_dir()) / f"kernels-{_CACHE_FORMAT}-{key}.so"


def _digest_path(lib: Path) -> Path:
    return lib.with_name(lib.name + ".sha256")


def _sha256(path: Path) -> str:
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


def _compile(cc: str, directory: Path) -> Path:
    """Compile the source into a fresh temporary name in ``directory``; returns its path."""
    fd, tmp = tempfile.mkstemp(prefix="kernels-", suffix=".so.tmp", dir=directory)
    os.close(fd)
    try:
        subprocess.run([cc, *_FLAGS, str(_SOURCE), "-o", tmp], check=True, capture_output=True, timeout=120)
    except subprocess.CalledProcessError as e:
        Path(tmp).unlink(missing_ok=True)
        detail = (e.stderr or b"").decode(errors="replace").strip()[:300]
        raise _KernelError(f"compiling with {cc} failed: {detail}") from None
    except (subprocess.SubprocessError, OSError) as e:
        Path(tmp).unlink(missing_ok=True)
        raise _KernelError(f"running the compiler {cc} failed: {e}") from None
    return Path(tmp)


def _load(path: Path) -> ctypes.CDLL:
    """Load ``path``, declare every entry point and check each against the torch reference."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise _KernelError(f"it cannot be loaded ({e})") from None
    vp, i64 = ctypes.c_void_p, ctypes.c_int64
    try:
        for an in _A_NAMES.values():
            for ln in _L_NAMES.values():
                getattr(lib, f"reduce_{an}_{ln}").argtypes = [vp, vp, vp, i64, vp, i64]
                getattr(lib, f"update_{an}_{ln}").argtypes = [vp, vp, vp, vp, i64]
        lib.fold_banks.argtypes = [vp, i64, vp]
        for ln in _L_NAMES.values():
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
    with torch.no_grad():
        for adt, an in _A_NAMES.items():
            x = x32.to(adt)
            xf = x.to(torch.float32)
            for ldt, ln in _L_NAMES.items():
                lt = lab.to(ldt)
                acc = torch.zeros(UNROLL * m, dtype=torch.float64)
                out = torch.zeros(m, dtype=torch.float64)
                getattr(lib, f"reduce_{an}_{ln}")(w.data_ptr(), x.data_ptr(), lt.data_ptr(), n, acc.data_ptr(), m)
                lib.fold_banks(acc.data_ptr(), m, out.data_ptr())
                ref = torch.bincount(lab, weights=(xf * w).to(torch.float64), minlength=m)
                if not torch.allclose(out, ref, rtol=1e-12, atol=1e-12):
                    raise _KernelError(f"its reduce_{an}_{ln} disagrees with the torch reference")
                y = w.clone()
                getattr(lib, f"update_{an}_{ln}")(y.data_ptr(), x.data_ptr(), lt.data_ptr(), delta.data_ptr(), n)
                if not torch.allclose(y, w + xf * delta[lab], rtol=1e-6, atol=1e-6):
                    raise _KernelError(f"its update_{an}_{ln} disagrees with the torch reference")
        for ldt, ln in _L_NAMES.items():
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


class KernelWarning(RuntimeWarning):
    """The fused CPU kernels could not be built or loaded as cached (issued at most once per process)."""


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
    cc = _compiler()
    if cc is None:
        logger.info("modeopt: no C compiler found; mode-space steps use the torch fallback")
        return None, None
    problems: list[str] = []
    out = _library_path(cc)
    digest = _digest_path(out)
    use_temp = False
    if out.exists():
        try:
            recorded = digest.read_text().strip()
        except OSError:
            recorded = None
        try:
            actual = _sha256(out)
        except OSError as e:
            actual = f"unreadable ({e})"
        if recorded is None:
            problems.append(f"the cached library {out} has no recorded digest ({digest.name})")
        elif recorded != actual:
            problems.append(f"the cached library {out} does not match its recorded digest (truncated or modified)")
        else:
            try:
                return _load(out), None
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
        tmp = _compile(cc, temporary or out.parent)
        try:
            lib = _load(tmp)  # under its fresh name; a loaded library stays mapped when renamed
        except _KernelError as e:
            problems.append(f"the freshly built library is unusable: {e}")
        if lib is not None and temporary is None:
            try:
                _write_atomic(digest, _sha256(tmp))  # digest first: a library without one is never loaded
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


def _get_lib() -> ctypes.CDLL | None:
    global _lib, _lib_tried
    if _lib_tried:
        return _lib
    message = None
    with _lock:
        if not _lib_tried:
            if os.environ.get("MODEOPT_KERNELS", "auto") != "torch":
                try:
                    _lib, message = _build()
                except Exception as e:  # noqa: BLE001 - the torch path always works
                    _lib, message = None, f"unexpected failure ({e!r}). Mode-space steps use the torch path. {_FIX}"
            _lib_tried = True
    if message is not None:  # outside the lock, state settled: a filter that raises leaves it consistent
        warnings.warn(f"modeopt: fused CPU kernels: {message}", KernelWarning, stacklevel=3)
    return _lib


_enabled = True


def fused_available() -> bool:
    """Whether the compiled CPU kernels are in use (``MODEOPT_KERNELS=torch`` turns them off)."""
    return _enabled and _get_lib() is not None


class use_fused:
    """Context manager: turn the fused kernels off (``use_fused(False)``) in a block, e.g. to time
    or test the torch path beside them: the operators then run the torch reference on every device
    (the Triton kernels too). Labels stay compact either way."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self):
        global _enabled
        self._before, _enabled = _enabled, self.enabled
        return self

    def __exit__(self, *exc):
        global _enabled
        _enabled = self._before


def _workers() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=max(1, THREADS - 1), thread_name_prefix="modeopt")
    return _pool


#: id(label tensor) -> (weakref, version, data_ptr, numel, 1 + largest label): label tensors already
#: checked, so that a check costs a host sync once per tensor, not once per step.
_checked: dict[int, tuple] = {}


def _check_sizes(what: str, *lists: Sequence[Tensor]) -> None:
    """Every list has one tensor per weight tensor, of the weight's number of elements."""
    if len({len(x) for x in lists}) != 1:
        raise ValueError(f"{what}: got {[len(x) for x in lists]} tensors per argument; they must agree")
    for j, ts in enumerate(zip(*lists)):
        sizes = [t.numel() for t in ts]
        if len(set(sizes)) != 1:
            raise ValueError(f"{what}: tensor {j} has arguments of {sizes} elements; they must agree")


def _version(t: Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return -1


def check_labels(labels: Sequence[Tensor], n_modes: int, what: str = "labels") -> None:
    """Raise ``ValueError`` unless every label lies in ``[0, n_modes)``.

    The fused kernels index per-mode arrays by label without a bound check, so an out-of-range
    label would read or write outside them. A tensor is checked once (all new tensors together:
    one host sync); later calls with the same, unmodified tensor cost a dictionary look-up.
    """

    def known(lab: Tensor):
        entry = _checked.get(id(lab))
        if (entry is None or entry[0]() is not lab or entry[1] != _version(lab) or entry[2] != lab.data_ptr()
                or entry[3] != lab.numel()):
            return None
        return entry

    fresh = [(j, lab) for j, lab in enumerate(labels) if known(lab) is None]
    for j, lab in fresh:
        if lab.is_floating_point() or lab.is_complex() or lab.dtype == torch.bool:
            raise ValueError(f"{what}[{j}] must be an integer tensor, got {lab.dtype}")
    stats = [(idx.min(), idx.max()) if idx.numel() else (idx.new_zeros(()), idx.new_full((), -1))
             for idx in (as_index(lab) for _, lab in fresh)]
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


def _fusable(tensors: Sequence[Tensor], a: Sequence[Tensor], labels: Sequence[Tensor]) -> bool:
    return (
        fused_available()
        and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)
        and all(x.dtype in _A_NAMES and x.is_contiguous() for x in a)
        and all(lab.dtype in _L_NAMES and lab.is_contiguous() for lab in labels)
    )


def _pieces(sizes: Sequence[int]) -> list[tuple[int, int, int]]:
    """(tensor, start, stop) pieces of at most PIECE elements, in a fixed order."""
    out = []
    for t, n in enumerate(sizes):
        for s in range(0, n, PIECE):
            out.append((t, s, min(s + PIECE, n)))
    return out


#: Threads the fused kernels use (``MODEOPT_KERNEL_THREADS``). Default 1: between torch ops,
#: torch's own OpenMP workers keep spinning for a while, and a second thread of ours fights them
#: for the cores (measured on 2 cores: the reduction inside a ResNet18 backward took 20.5 ms
#: split over 2 threads, 15.5 ms on 1).
THREADS = int(os.environ.get("MODEOPT_KERNEL_THREADS", "1"))


def _run_split(fn, pieces: list) -> None:
    """Run ``fn(piece)`` for every piece, spread over ``THREADS`` threads in contiguous runs."""
    k = max(1, min(THREADS, len(pieces)))
    if k == 1:
        for p in pieces:
            fn(p)
        return
    bounds = [len(pieces) * j // k for j in range(k + 1)]

    def run(lo: int, hi: int) -> None:
        for p in pieces[lo:hi]:
            fn(p)

    futures = [_workers().submit(run, bounds[j], bounds[j + 1]) for j in range(1, k)]
    run(bounds[0], bounds[1])
    for f in futures:
        f.result()


# ----------------------------------------------------------------------------------------------
# The public passes. Each one calls its operator (``torch.ops.modeopt.*``, see modeopt/ops.py): the
# dispatcher picks the implementation for the tensors' device - on CPU the fused C kernels (or the
# torch reference), on CUDA the Triton kernels (or the torch reference), elsewhere the reference.


def reduce(grads: Sequence[Tensor | None], a: Sequence[Tensor], labels: Sequence[Tensor], n_modes: int) -> Tensor:
    """``(n_modes,)`` float64: ``sum_i a_i * g_i`` per mode over all tensors (``None`` grads skipped).

    The result lives on the tensors' device (on ``a[0]``'s when every grad is None).

    Args:
        grads: per tensor, the gradient of the loss w.r.t. the weight (any shape, ``numel`` elements).
        a, labels: per tensor, flat coefficients and mode labels of the same ``numel``.
    """
    grads, a, labels = list(grads), list(a), list(labels)
    if not any(g is not None for g in grads):
        return torch.zeros(n_modes, dtype=torch.float64, device=a[0].device if a else "cpu")
    if _direct(a[0]):
        return _reduce_cpu(grads, a, labels, int(n_modes))
    return torch.ops.modeopt.mode_reduce(grads, a, labels, int(n_modes))


@torch.no_grad()
def update(weights: Sequence[Tensor], a: Sequence[Tensor], labels: Sequence[Tensor], delta: Tensor,
           scratch: Tensor | None = None) -> None:
    """``w += a * delta[label]`` for every tensor, in place.

    Args:
        weights: the tensors to update (any layout; contiguous ones take the fused kernels).
        a, labels: per tensor, flat coefficients and labels.
        delta: ``(n_modes,)`` change of the mode scalars, on the weights' device.
        scratch: unused (kept for compatibility): the torch path keeps its own reusable buffers.
    """
    if not len(weights):
        return
    if _direct(delta):
        _update_cpu(list(weights), list(a), list(labels), delta)
    else:
        torch.ops.modeopt.mode_update(list(weights), list(a), list(labels), delta)


@torch.no_grad()
def welford(weights: Sequence[Tensor], mean: Sequence[Tensor], comoment: Sequence[Tensor],
            labels: Sequence[Tensor], dr: Tensor, n: int) -> None:
    """One Welford/Chan sample for every tensor, in place: ``mean += (w - mean) / n`` and
    ``comoment += (w - mean_before) * dr[label]``.

    Args:
        weights: float tensors (any shape); mean, comoment: flat float64 of the same sizes;
        labels: flat mode labels; dr: ``(M,)`` float64, references minus their updated means.
    """
    flat = [w.detach().reshape(-1) for w in weights]
    _check_sizes("welford", flat, mean, comoment, labels)
    check_labels(labels, dr.numel())
    if not flat:
        return
    if _direct(dr):
        _welford_cpu(flat, list(mean), list(comoment), list(labels), dr, int(n))
    else:
        torch.ops.modeopt.welford_sample(flat, list(mean), list(comoment), list(labels), dr, int(n))


@torch.no_grad()
def assign(weights: Sequence[Tensor], a: Sequence[Tensor], b: Sequence[Tensor], labels: Sequence[Tensor],
           r: Tensor) -> None:
    """``w = a * r[label] + b`` for every tensor, in place (float32 a and b, flat)."""
    _check_sizes("assign", weights, a, b, labels)
    check_labels(labels, r.numel())
    if not len(weights):
        return
    if _direct(r):
        _assign_cpu(list(weights), list(a), list(b), list(labels), r)
    else:
        torch.ops.modeopt.mode_assign(list(weights), list(a), list(b), list(labels), r)


#: Eager calls on CPU tensors run the operator's CPU implementation directly: the dispatcher adds
#: ~20-60 us of Python per call (lists of tensors are converted for the schema), measurable on a CPU
#: step (docs/performance.md). Under torch.compile, and on every other device, the operator is called.
#: False: always through the operator (tests).
CPU_DIRECT = True


def _direct(t: Tensor) -> bool:
    return CPU_DIRECT and t.device.type == "cpu" and not torch.compiler.is_compiling()


# ----------------------------------------------------------------------------------------------
# Implementations (called by the operators in modeopt/ops.py; never host-synchronising).


def _torch_only() -> bool:
    """The torch reference on every device: ``use_fused(False)`` or ``MODEOPT_KERNELS=torch``."""
    return not _enabled or os.environ.get("MODEOPT_KERNELS", "auto") == "torch"


_triton_state: bool | None = None
#: CUDA device index -> whether the Triton kernels passed their self-test there
_triton_device_ok: dict = {}


def _triton_ok(device: torch.device | None = None) -> bool:
    """Whether the CUDA implementations may use the Triton kernels (on ``device``).

    The first use on a CUDA device runs every kernel once on a small input against the torch
    reference (one host sync, once per device and process); a kernel that fails to compile or
    disagrees turns Triton off for that device with one :class:`KernelWarning`: the torch path
    runs instead. (Skipped, and trusted, while a CUDA graph is being captured.)
    """
    global _triton_state
    if _torch_only():
        return False
    if _triton_state is None:
        from . import triton_kernels

        _triton_state = triton_kernels.available()
    if not _triton_state or device is None or device.type != "cuda":
        return _triton_state
    ok = _triton_device_ok.get(device.index)
    if ok is None:
        if torch.cuda.is_current_stream_capturing():
            return True
        ok = _triton_device_ok[device.index] = _triton_self_test(device)
    return ok


def _triton_self_test(device: torch.device) -> bool:
    """Every Triton kernel once on ``device`` against the torch reference; False (and a warning) on failure."""
    tk = _tri()
    try:
        g = torch.Generator().manual_seed(0)
        n, m = 37, 5
        w = torch.randn(n, generator=g).to(device)
        x = torch.randn(n, generator=g).to(device)
        b = torch.randn(n, generator=g).to(device)
        lab = torch.randint(0, m, (n,), generator=g).to(torch.uint8).to(device)
        d = torch.randn(m, generator=g).to(device)
        out = tk.reduce([w], [x], [lab], m)
        if not torch.allclose(out, _reduce_torch([w], [x], [lab], m), rtol=1e-5, atol=1e-6):
            raise _KernelError("reduce disagrees with the torch reference")
        y1, y2 = w.clone(), w.clone()
        tk.update([y1], [x], [lab], d)
        _update_torch([y2], [x], [lab], d)
        if not torch.allclose(y1, y2, rtol=1e-6, atol=1e-6):
            raise _KernelError("update disagrees with the torch reference")
        mu = [torch.randn(n, generator=g, dtype=torch.float64).to(device)] * 2
        com = [torch.randn(n, generator=g, dtype=torch.float64).to(device)] * 2
        mu, com = [t.clone() for t in mu], [t.clone() for t in com]
        dr = d.double()
        tk.welford([w], mu[:1], com[:1], [lab], dr, 3)
        _welford_torch([w], mu[1:], com[1:], [lab], dr, 3)
        if not (torch.allclose(mu[0], mu[1], rtol=1e-12, atol=1e-12)
                and torch.allclose(com[0], com[1], rtol=1e-12, atol=1e-12)):
            raise _KernelError("welford disagrees with the torch reference")
        y1, y2 = torch.empty_like(w), torch.empty_like(w)
        tk.assign([y1], [x], [b], [lab], d)
        _assign_torch([y2], [x], [b], [lab], d)
        if not torch.allclose(y1, y2, rtol=1e-6, atol=1e-6):
            raise _KernelError("assign disagrees with the torch reference")
    except Exception as e:  # noqa: BLE001 - a Triton that cannot compile here: the torch path works
        warnings.warn(f"modeopt: the Triton kernels failed their self-test on {device} ({e!r}); mode-space "
                      "passes there use the (slower) torch path. MODEOPT_KERNELS=torch silences this",
                      KernelWarning, stacklevel=2)
        return False
    return True


def _tri():
    from . import triton_kernels

    return triton_kernels


_TRI_W = (torch.float32, torch.bfloat16, torch.float16)
_TRI_A = (torch.float32, torch.bfloat16)
_TRI_L_MAX = {torch.uint8: 256, torch.int16: 65536, torch.int32: 2**31 - 1, torch.int64: 2**31 - 1}


def _tri_labels_ok(lab: Tensor, n_modes: int) -> bool:
    return lab.is_contiguous() and n_modes <= _TRI_L_MAX.get(lab.dtype, 0)


#: (device, dtype) -> a reusable CPU buffer of the torch path (large allocations page-fault on
#: every step otherwise). Only CPU: on accelerators the caching allocator reuses memory anyway.
_scratch: dict[tuple, Tensor] = {}


def _buffer(kind: str, like: Tensor, dtype: torch.dtype, n: int) -> Tensor | None:
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


def _items(grads, a, labels):
    return [(g.reshape(-1), x, lab) for g, x, lab in zip(grads, a, labels) if g is not None]


def _reduce_torch(grads, a, labels, n_modes: int) -> Tensor:
    items = _items(grads, a, labels)
    if not items:
        return torch.zeros(n_modes, dtype=torch.float64, device=a[0].device)
    out = torch.zeros(n_modes, dtype=torch.float64, device=items[0][0].device)
    for g, x, lab in items:
        # a * g rounded once to float32 (as the fused kernels do), whatever the dtypes of g and a
        out += _segment_sum_torch(g.to(torch.float32) * x, lab, n_modes)
    return out


def _reduce_cpu(grads, a, labels, n_modes: int) -> Tensor:
    items = _items(grads, a, labels)
    if items:
        gs, xs, ls = zip(*items)
        if _fusable(gs, xs, ls):
            return _reduce_fused(gs, xs, ls, n_modes)
    return _reduce_torch(grads, a, labels, n_modes)


def _reduce_cuda(grads, a, labels, n_modes: int) -> Tensor:
    if _triton_ok(a[0].device) and _tri().supports(n_modes):
        items = [(g, x, lab) for g, x, lab in zip(grads, a, labels) if g is not None]
        if all(g.dtype in _TRI_W and x.dtype in _TRI_A and x.is_contiguous() and _tri_labels_ok(lab, n_modes)
               for g, x, lab in items):
            return _tri().reduce([g if g is None else g.contiguous() for g in grads], a, labels, n_modes)
    return _reduce_torch(grads, a, labels, n_modes)


def _reduce_fused(gs, xs, ls, n_modes: int) -> Tensor:
    _check_sizes("reduce", gs, xs, ls)
    lib = _get_lib()
    gs = [g.contiguous() for g in gs]
    pieces = _pieces([g.numel() for g in gs])
    acc = torch.zeros(len(pieces), UNROLL * n_modes, dtype=torch.float64)
    fns = [getattr(lib, f"reduce_{_A_NAMES[x.dtype]}_{_L_NAMES[lab.dtype]}") for x, lab in zip(xs, ls)]

    def one(j_piece):
        j, (t, s, e) = j_piece
        g, x, lab = gs[t], xs[t], ls[t]
        fns[t](g.data_ptr() + 4 * s, x.data_ptr() + x.element_size() * s, lab.data_ptr() + lab.element_size() * s,
               e - s, acc[j].data_ptr(), n_modes)

    _run_split(one, list(enumerate(pieces)))
    out = torch.zeros(n_modes, dtype=torch.float64)
    for j in range(len(pieces)):  # fixed order: deterministic
        lib.fold_banks(acc[j].data_ptr(), n_modes, out.data_ptr())
    return out


def _update_torch(weights, a, labels, delta: Tensor) -> None:
    d32 = None
    for w, x, lab in zip(weights, a, labels):
        idx = _index(lab)
        if w.dtype == torch.float32:
            d32 = delta.to(torch.float32) if d32 is None else d32
            buf = _buffer("values", w, torch.float32, w.numel())
            buf = torch.index_select(d32, 0, idx) if buf is None else torch.index_select(d32, 0, idx, out=buf)
            if w.is_contiguous():
                w.view(-1).addcmul_(buf, x.to(torch.float32))
            else:  # e.g. channels_last: labels follow the logical (row-major) order
                w.add_((buf * x.to(torch.float32)).view(w.shape))
        else:  # bf16/fp16 weights: computed in float32, rounded once (as the Triton kernels do)
            d = delta.to(torch.float32)
            new = w.reshape(-1).to(torch.float32) + x.to(torch.float32) * d[idx]
            w.copy_(new.view(w.shape))


def _update_cpu(weights, a, labels, delta: Tensor) -> None:
    if _fusable(weights, a, labels):
        _update_fused(weights, a, labels, delta)
    else:
        _update_torch(weights, a, labels, delta)


def _update_cuda(weights, a, labels, delta: Tensor) -> None:
    rest = list(range(len(weights)))
    if _triton_ok(delta.device):
        m = delta.numel()
        fast = [j for j in rest if weights[j].is_contiguous() and weights[j].dtype in _TRI_W
                and a[j].dtype in _TRI_A and a[j].is_contiguous() and _tri_labels_ok(labels[j], m)]
        if fast:
            _tri().update([weights[j] for j in fast], [a[j] for j in fast], [labels[j] for j in fast], delta)
            done = set(fast)
            rest = [j for j in rest if j not in done]
    if rest:
        _update_torch([weights[j] for j in rest], [a[j] for j in rest], [labels[j] for j in rest], delta)


def _update_fused(weights, a, labels, delta: Tensor) -> None:
    _check_sizes("update", weights, a, labels)
    lib = _get_lib()
    d = delta.to(torch.float32).contiguous()
    fns = [getattr(lib, f"update_{_A_NAMES[x.dtype]}_{_L_NAMES[lab.dtype]}") for x, lab in zip(a, labels)]

    def one(piece):
        t, s, e = piece
        w, x, lab = weights[t], a[t], labels[t]
        fns[t](w.data_ptr() + 4 * s, x.data_ptr() + x.element_size() * s, lab.data_ptr() + lab.element_size() * s,
               d.data_ptr(), e - s)

    _run_split(one, _pieces([w.numel() for w in weights]))


def _welford_torch(flat, mean, comoment, labels, dr: Tensor, n: int) -> None:
    for w, mu, com, lab in zip(flat, mean, comoment, labels):
        dw = w.reshape(-1).to(torch.float64) - mu
        mu.add_(dw, alpha=1.0 / n)
        com.addcmul_(dw, dr[as_index(lab)])


def _welford_fusable(flat, mean, comoment, labels) -> bool:
    return (fused_available()
            and all(w.device.type == "cpu" and w.dtype == torch.float32 and w.is_contiguous() for w in flat)
            and all(t.dtype == torch.float64 and t.device.type == "cpu" and t.is_contiguous()
                    for t in (*mean, *comoment))
            and all(lab.dtype in _L_NAMES and lab.is_contiguous() for lab in labels))


def _welford_cpu(flat, mean, comoment, labels, dr: Tensor, n: int) -> None:
    if not _welford_fusable(flat, mean, comoment, labels):
        return _welford_torch(flat, mean, comoment, labels, dr, n)
    lib = _get_lib()
    d = dr.to(torch.float64).contiguous()
    fns = [getattr(lib, f"welford_{_L_NAMES[lab.dtype]}") for lab in labels]

    def one(piece):
        t, s, e = piece
        w, mu, com, lab = flat[t], mean[t], comoment[t], labels[t]
        fns[t](w.data_ptr() + 4 * s, mu.data_ptr() + 8 * s, com.data_ptr() + 8 * s,
               lab.data_ptr() + lab.element_size() * s, d.data_ptr(), 1.0 / n, e - s)

    _run_split(one, _pieces([w.numel() for w in flat]))


def _welford_cuda(flat, mean, comoment, labels, dr: Tensor, n: int) -> None:
    m = dr.numel()
    if (_triton_ok(dr.device) and n >= 1
            and all(w.dtype in _TRI_W and w.is_contiguous() for w in flat)
            and all(t.dtype == torch.float64 and t.is_contiguous() for t in (*mean, *comoment))
            and all(_tri_labels_ok(lab, m) for lab in labels)):
        return _tri().welford(flat, mean, comoment, labels, dr, n)
    return _welford_torch(flat, mean, comoment, labels, dr, n)


def _assign_torch(weights, a, b, labels, r: Tensor) -> None:
    rr = r.to(torch.float32)
    for w, x, y, lab in zip(weights, a, b, labels):
        new = torch.addcmul(y.to(torch.float32), x.to(torch.float32), rr[as_index(lab)])
        w.copy_(new.view(w.shape))


def _assign_cpu(weights, a, b, labels, r: Tensor) -> None:
    ok = (fused_available() and all(w.device.type == "cpu" and w.dtype == torch.float32 and w.is_contiguous()
                                    for w in weights)
          and all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in (*a, *b))
          and all(lab.dtype in _L_NAMES and lab.is_contiguous() for lab in labels))
    if not ok:
        return _assign_torch(weights, a, b, labels, r)
    lib = _get_lib()
    rr = r.to(torch.float32).contiguous()
    fns = [getattr(lib, f"assign_{_L_NAMES[lab.dtype]}") for lab in labels]

    def one(piece):
        t, s, e = piece
        w, x, y, lab = weights[t], a[t], b[t], labels[t]
        fns[t](w.data_ptr() + 4 * s, x.data_ptr() + 4 * s, y.data_ptr() + 4 * s,
               lab.data_ptr() + lab.element_size() * s, rr.data_ptr(), e - s)

    _run_split(one, _pieces([w.numel() for w in weights]))


def _assign_cuda(weights, a, b, labels, r: Tensor) -> None:
    m = r.numel()
    if (_triton_ok(r.device) and all(w.dtype in _TRI_W and w.is_contiguous() for w in weights)
            and all(x.dtype in _TRI_A and x.is_contiguous() for x in a)
            and all(y.dtype == torch.float32 and y.is_contiguous() for y in b)
            and all(_tri_labels_ok(lab, m) for lab in labels)):
        return _tri().assign(weights, a, b, labels, r)
    return _assign_torch(weights, a, b, labels, r)


def as_index(labels: Tensor) -> Tensor:
    """Labels as an index tensor (int16 labels hold uint16 values: modes up to 65535)."""
    if labels.dtype in (torch.int32, torch.int64):
        return labels
    if labels.dtype == torch.int16:
        return labels.to(torch.int32) & 0xFFFF
    return labels.to(torch.int32)


def _segment_sum_torch(values: Tensor, labels: Tensor, n: int) -> Tensor:
    """float64 ``out[m] = sum(values[labels == m])``, deterministic."""
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


from . import ops as _ops  # noqa: E402,F401 - registers torch.ops.modeopt.* (its implementations are above)
