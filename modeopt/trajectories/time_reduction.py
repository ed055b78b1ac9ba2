"""The ``T x T`` reduction of a trajectory: a triangular factor of its ``N x T`` matrix, in one pass.

Every method here that works in the space of the T samples (PCA of a trajectory, exact DMD,
the Koopman observables) needs the ``T x T`` inner products of the samples, never an ``N x N`` or
``N x T`` matrix. :func:`time_factor` reads the ``(T, N)`` values in column chunks and returns the
upper-triangular ``R`` (``T x T``, float64) of a thin QR of the ``N x T`` matrix ``A`` (one column
per sample, time-centred or not): ``A = Q R`` with orthonormal ``Q``, which is never formed, so
``R^T R = A^T A``, and ``A``'s singular values and right singular vectors are ``R``'s.

Numerics: a tall-skinny QR (TSQR) in float64, on one thread. Each chunk is factorised alone and
its factor stacked under the running ``R`` and factorised again. Why a QR and not the Gram matrix
``A^T A``: ``R`` carries ``A``'s singular values down to about ``eps * sigma_max`` (float64 ``eps``
~2e-16), while the Gram matrix squares the condition number and loses them below about
``sqrt(eps) * sigma_max`` (~1e-8); exact DMD's default cut-off (``1e-10 sigma_max``) needs the QR.
What it costs against a Gram pass: docs/decomposition.md ("The T x T reduction"). Memory: ``R``,
plus one chunk of about :data:`~modeopt.utils.chunking.CHUNK_ELEMENTS` values.

Precision of the values: they are formed in float64. An ``offset`` (the float32 baseline of a
half-precision recording: values ``data + offset``) is added in float64, which is exact for a
bf16/fp16 movement unless it is some 2^40 times smaller than its weight. With ``centre=True`` each
chunk is then centred by its own time mean (exact: a chunk holds all T samples of its columns),
before any product, so a large weight does not cancel against its small movement.

Errors: :class:`NonFiniteValues` (NaN/inf, with the first bad sample and its column) and
:class:`NotMoving` (centred values that are zero at the scale of the values), both ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from modeopt.utils.chunking import CHUNK_ELEMENTS

__all__ = ["time_factor", "read_columns", "column_chunks", "first_nonfinite", "one_thread", "NonFiniteValues", "NotMoving", "CONSTANT_RTOL"]

#: centred values whose sum of squares is below ``CONSTANT_RTOL**2`` times that of the values are constant.
CONSTANT_RTOL = 1e-10
#: fewest columns in a chunk (a very long trajectory still reads chunks of useful width).
MIN_CHUNK_COLUMNS = 256

Chunks = Sequence[tuple[int, int]]


class NonFiniteValues(ValueError):
    """The values hold NaN/inf. ``sample``: the first sample (row) that does; ``column``: its first bad column."""

    def __init__(self, sample: int, column: int):
        self.sample, self.column = sample, column
        super().__init__(f"the values hold NaN/inf from sample {sample} on (first at column {column})")


class NotMoving(ValueError):
    """The time-centred values are zero (relative to the values' own scale, :data:`CONSTANT_RTOL`)."""

    def __init__(self, n_samples: int, n_columns: int):
        self.n_samples, self.n_columns = n_samples, n_columns
        super().__init__(f"the values do not move (zero variance over their {n_samples} samples of "
                         f"{n_columns:,} columns)")


def column_chunks(n_samples: int, ranges: Iterable[tuple[int, int]], chunk: int | None = None) -> list[tuple[int, int]]:
    """``(start, stop)`` column chunks covering ``ranges``, each ``chunk`` columns or fewer.

    ``chunk`` defaults to ``CHUNK_ELEMENTS // n_samples`` (at least :data:`MIN_CHUNK_COLUMNS`).
    """
    if chunk is None:
        chunk = max(MIN_CHUNK_COLUMNS, CHUNK_ELEMENTS // max(n_samples, 1))
    return [(i, min(i + chunk, b)) for a, b in ranges for i in range(a, b, chunk)]


def read_columns(data: Tensor, offset: Tensor | None, start: int, stop: int, *, centre: bool = False) -> Tensor:
    """Values of columns ``start:stop``, ``(T, stop - start)`` float64, time-centred when ``centre``.

    Args:
        data: ``(T, N)`` values (or movements from ``offset``), any floating dtype.
        offset: ``(N,)`` baseline of every sample, or ``None``: the values are ``data + offset``,
            formed in float64 (module doc).
    """
    x = data[:, start:stop].to(torch.float64)
    if offset is not None:
        x = x + offset[start:stop].to(torch.float64)
    return x - x.mean(0) if centre else x


def first_nonfinite(x: Tensor) -> tuple[int, int] | None:
    """``(sample, column)`` of the first NaN/inf of a ``(T, c)`` chunk (earliest sample first), or ``None``."""
    finite = torch.isfinite(x)
    if bool(finite.all()):
        return None
    t0 = int((~finite).any(1).nonzero()[0, 0])
    return t0, int((~finite[t0]).nonzero()[0, 0])


def time_factor(
    data: Tensor,
    offset: Tensor | None = None,
    *,
    centre: bool,
    ranges: Sequence[tuple[int, int]] | None = None,
    chunk: int | None = None,
    bar: Callable[[Chunks], Iterable[tuple[int, int]]] | None = None,
) -> Tensor:
    """``R``, ``(T, T)`` upper-triangular float64 with ``R^T R = A^T A`` (module doc).

    Args:
        data, offset: the ``(T, N)`` values as :func:`read_columns` takes them.
        centre: centre every column in time first (``A``'s columns are then the centred samples).
        ranges: ``(start, stop)`` column ranges to use (default all N columns).
        chunk: columns per chunk (default from ``CHUNK_ELEMENTS``; the result does not depend on it
            beyond rounding).
        bar: wraps the list of chunks for iteration, e.g. in a progress bar.

    Raises:
        NonFiniteValues: NaN/inf in the values (the earliest bad sample over all chunks).
        NotMoving: with ``centre``, values that do not change over time.
    """
    T, n = data.shape
    ranges = [(0, n)] if ranges is None else list(ranges)
    chunks = column_chunks(T, ranges, chunk)
    r_fac = torch.zeros(0, T, dtype=torch.float64)
    total_sq = 0.0  # the sum of squared values: the scale "not moving" is judged against
    bad: tuple[int, int] | None = None  # (first non-finite sample, its column)
    for i0, i1 in (chunks if bar is None else bar(chunks)):
        x = read_columns(data, offset, i0, i1)
        found = first_nonfinite(x)
        if found is not None and (bad is None or found[0] < bad[0]):
            bad = (found[0], i0 + found[1])
        if bad is not None:
            continue  # keep scanning for the earliest bad sample only
        if centre:
            total_sq += float(x.square().sum())
            x = x - x.mean(0)
        with one_thread():  # LAPACK's QR of a narrow panel gains little from threads, and loses much when shared
            r_chunk = torch.linalg.qr(x.T, mode="r").R
            r_fac = torch.linalg.qr(torch.cat([r_fac, r_chunk]), mode="r").R
    if bad is not None:
        raise NonFiniteValues(*bad)
    if r_fac.shape[0] < T:  # fewer columns than samples
        r_fac = torch.cat([r_fac, torch.zeros(T - r_fac.shape[0], T, dtype=torch.float64)])
    if centre and not float(r_fac.square().sum()) > CONSTANT_RTOL ** 2 * total_sq:
        raise NotMoving(T, sum(b - a for a, b in ranges))
    return r_fac


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the ``T x T`` algebra inside on one thread (restored after): such small matrices gain
    nothing from threads, and multi-threaded LAPACK on them is slow where cores are shared."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
