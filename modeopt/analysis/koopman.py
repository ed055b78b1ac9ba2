"""Koopman spectra of training runs, and a test of whether two runs have the same dynamics.

After Redman et al., "Identifying equivalent training dynamics" (arXiv 2302.09160): record an
observable of the weights at every step, embed it in time delays, fit exact DMD, and take the DMD
eigenvalues as the run's (approximate) Koopman spectrum. Conjugate dynamical systems have the
same spectrum, so two runs are compared by the Wasserstein-1 distance between their eigenvalues.

:func:`koopman_spectrum` for one run of T samples:

1. **Observable.** The weights of the whole model (``"pca"``), of chosen tensors (``"layer"``) or
   every column of a ``(T, d)`` array (``"raw"``), centred in time.
2. **Gram matrix.** One chunked pass over the weights accumulates the ``T x T`` float64 Gram matrix
   ``G = Xc Xc^T`` of the centred ``(T, N)`` observable (each chunk is centred by its own time mean
   before the product, so the large weights do not cancel against their small movements). Nothing
   of size ``N x N`` or ``N x T`` is formed: memory ``T^2`` plus one chunk, time ``O(N T^2)``.
3. **Principal coordinates.** ``G = U diag(lam) U^T``; the coordinates are ``Z = U_k sqrt(lam_k)``
   (``(T, k)``, the PCA coefficients of the samples). ``"pca"`` keeps the leading ``k`` (10 by
   default); ``"layer"``/``"raw"`` keep all of them (lossless: DMD eigenvalues do not change under
   an orthogonal change of coordinates, and the samples span at most ``T - 1`` directions).
4. **Time-delay (Hankel) embedding** with ``D`` delays: ``h_t = [z_t; z_{t+1}; ...; z_{t+D-1}]``,
   ``t = 0 .. T-D``, ``T' = T - D + 1`` vectors of ``D k`` numbers.
5. **Exact DMD with an affine term** on the pairs ``(h_t, h_{t+1})``: ``h_{t+1} ~= A h_t + c``.
   Fitting ``c`` (equivalently, centring the "before" and "after" matrices by their own means)
   makes the eigenvalues independent of where the run is in weight space: two runs that converge
   with the same linear dynamics to different points have the same spectrum, and the trivial
   eigenvalue 1 of the constant offset is not part of it. Rank ``r`` explicit, or the smallest
   that holds ``energy`` of the squared singular values. Everything is computed from the
   ``T' x T'`` Gram matrix of the delay vectors (the method of snapshots), which is a sum of
   ``D`` shifted blocks of ``Z Z^T``: the ``D k``-long vectors are never formed, so the lossless
   ``"layer"`` observable costs the same as ``"pca"``.

Precision: a Gram matrix squares the condition number, so directions with singular value below
``1e-6`` of the largest are treated as zero (:data:`GRAM_RTOL`); the leading ones, which DMD keeps,
lose little (tested: the eigenvalues of a linear system seen through 3,000 weights come out to 1e-12).

:func:`compare_dynamics` computes both runs' spectra and the distance, and judges it against a
null distribution from windows of the runs (see its docstring): a single pass over each run's
weights serves every window, because a window's Gram matrix is a block of the run's.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from tqdm.auto import tqdm

from .. import _progress
from .._chunking import CHUNK_ELEMENTS
from ..trajectory import Trajectory, as_tensor

__all__ = ["KoopmanSpectrum", "DynamicsComparison", "koopman_spectrum", "compare_dynamics", "spectrum_distance",
           "observable_gram", "principal_coordinates", "OBSERVABLES"]

OBSERVABLES = ("pca", "layer", "raw")
#: principal coordinates kept by ``observable="pca"`` unless ``n_components`` says otherwise.
DEFAULT_COMPONENTS = 10
#: eigenvalues of a Gram matrix below this fraction of the largest are rounding noise
#: (singular values below 1e-6 of the largest: float64 resolves ~1e-16 of the squared scale).
GRAM_RTOL = 1e-12
#: a trajectory whose movement is below this fraction of its values' RMS is constant.
CONSTANT_RTOL = 1e-10


# ================================================================= observables
@dataclass(frozen=True)
class _Observable:
    """Which columns of a trajectory make the observable, and how many coordinates are kept."""

    kind: str
    ranges: tuple[tuple[int, int], ...]
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    n_weights: int
    n_components: int | None  # requested; None = all (lossless)

    @property
    def signature(self) -> tuple:
        """Equal for two runs exactly when their spectra describe the same observable."""
        if self.kind == "pca":  # basis-free: any two models' leading coordinates are comparable
            return ("pca", self.n_components)
        if self.kind == "layer":
            return ("layer", self.names, self.shapes, self.n_components)
        return ("raw", self.n_weights, self.n_components)

    def describe(self) -> str:
        k = "all" if self.n_components is None else f"leading {self.n_components}"
        if self.kind == "pca":
            return f"pca: {k} principal coordinates of {self.n_weights:,} weights"
        if self.kind == "layer":
            names = ", ".join(self.names) if len(self.names) <= 4 else f"{', '.join(self.names[:3])}, ... " \
                                                                       f"({len(self.names)} tensors)"
            return f"layer: {names} ({self.n_weights:,} weights, {k} principal coordinates)"
        return f"raw: {self.n_weights:,} columns ({k} principal coordinates)"


def _check_components(n_components) -> None:
    if n_components is not None and (not isinstance(n_components, int) or isinstance(n_components, bool)
                                     or n_components < 1):
        raise ValueError(f"n_components must be an integer >= 1 (or None), got {n_components!r}")


def _resolve_observable(traj: Trajectory, observable: str, layer, n_components: int | None) -> _Observable:
    if observable not in OBSERVABLES:
        raise ValueError(f"observable must be one of {', '.join(map(repr, OBSERVABLES))}, got {observable!r}")
    _check_components(n_components)
    n = traj.n_weights
    if observable != "layer":
        if layer is not None:
            raise ValueError(f"layer= is only used with observable='layer' (got observable={observable!r}): "
                             "pass observable='layer' to study chosen tensors")
        k = (n_components or DEFAULT_COMPONENTS) if observable == "pca" else n_components
        return _Observable(observable, ((0, n),), (), (), n, k)
    if layer is None or (not isinstance(layer, str) and len(layer) == 0):
        raise ValueError("observable='layer' needs layer=NAME (a tensor name such as 'fc1.weight', a module prefix "
                         "such as 'fc1', or a list of them)")
    if traj.layout is None:
        raise ValueError("observable='layer' needs tensor names, and this trajectory has none (a bare array): "
                         "use observable='raw' or 'pca', or give a Trajectory with a layout")
    wanted = [layer] if isinstance(layer, str) else list(layer)
    specs = traj.layout.specs
    chosen: set[int] = set()
    for w in wanted:
        hit = [i for i, s in enumerate(specs) if s.name == w or s.name.startswith(str(w) + ".")]
        if not hit:
            avail = ", ".join(s.name for s in specs[:12]) + (", ..." if len(specs) > 12 else "")
            raise ValueError(f"layer {w!r} is not a tensor (or module prefix) of this run; its tensors are: {avail}")
        chosen.update(hit)
    sel = [specs[i] for i in sorted(chosen)]  # layout order, whatever order they were asked in
    ranges: list[tuple[int, int]] = []
    for s in sel:  # merge neighbours: fewer, longer chunks
        if ranges and ranges[-1][1] == s.offset:
            ranges[-1] = (ranges[-1][0], s.stop)
        else:
            ranges.append((s.offset, s.stop))
    return _Observable("layer", tuple(ranges), tuple(s.name for s in sel), tuple(s.shape for s in sel),
                       sum(s.numel for s in sel), n_components)


def _as_trajectory(run, what: str = "run", progress: bool | None = None) -> Trajectory:
    """A Trajectory from a Trajectory, a path that load_trajectory reads, or a time-major (T, d) array."""
    if isinstance(run, Trajectory):
        return run
    if isinstance(run, (str, os.PathLike)) or (isinstance(run, (list, tuple)) and run
                                                and isinstance(run[0], (str, os.PathLike))):
        from .io import load_trajectory

        return load_trajectory(run, progress=progress)[0]
    try:
        x = as_tensor(run)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}: expected a Trajectory, a path (recording, trajectory file or checkpoint "
                         f"directory) or a (T, d) array, got {type(run).__name__} ({e})") from None
    if x.dim() != 2:
        raise ValueError(f"{what}: an array observable must be 2-D, time-major (T, d), got shape {tuple(x.shape)}")
    return Trajectory(x)


def observable_gram(trajectory: Trajectory, ranges: Sequence[tuple[int, int]] | None = None, *,
                    progress: bool | None = None, what: str = "run") -> np.ndarray:
    """``(T, T)`` float64 Gram matrix ``Xc Xc^T`` of the weights in ``ranges``, centred in time.

    One pass over the columns in chunks of :data:`CHUNK_ELEMENTS`; each chunk is centred by its own
    time mean (exact: a chunk holds all T samples of its weights) before its product is added.

    Raises:
        ValueError: NaN/inf in the weights (naming the tensor element and the first bad step), or
            an observable that does not move.
    """
    T, n = trajectory.n_samples, trajectory.n_weights
    ranges = [(0, n)] if ranges is None else list(ranges)
    chunk = max(256, CHUNK_ELEMENTS // max(T, 1))
    bounds = [(i, min(i + chunk, b)) for a, b in ranges for i in range(a, b, chunk)]
    hide = _progress.disable(progress, len(bounds), 8)
    gram = torch.zeros(T, T, dtype=torch.float64)
    total_sq = 0.0  # sum of squared values: the scale a "constant" movement is judged against
    bad: tuple[int, int] | None = None  # (first non-finite step index, its column)
    for i0, i1 in tqdm(bounds, desc="Gram matrix", disable=hide, leave=False):
        x = trajectory.cols(i0, i1, torch.float64)  # (T, c)
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            rows = (~finite).any(1).nonzero()[:, 0]
            t0 = int(rows[0])
            if bad is None or t0 < bad[0]:
                bad = (t0, i0 + int((~finite[t0]).nonzero()[0, 0]))
            continue
        if bad is not None:
            continue  # keep scanning for the earliest bad step only
        mean = x.mean(0)
        x = x - mean
        total_sq += float(mean.square().sum()) * T + float(x.square().sum())
        gram.addmm_(x, x.T)
    if bad is not None:
        t0, col = bad
        where = f"column {col}"
        if trajectory.layout is not None:
            name, idx = trajectory.layout.locate(col)
            where = f"{name}[{', '.join(map(str, idx))}]" if idx else name
        step = trajectory.steps[t0]
        raise ValueError(f"{what}: the weights hold NaN/inf from step {step} on (sample {t0}; first at {where}): the "
                         f"run diverged there. Analyse the samples before it (stop={step}, or "
                         f"trajectory.window(0, {t0})), or fix the training")
    g = gram.numpy()
    var = float(np.trace(g))
    if not var > CONSTANT_RTOL ** 2 * total_sq:
        raise ValueError(f"{what}: the observable does not move (zero variance over its {T} samples of {n:,} "
                         "weights): choose tensors that train (observable='layer', layer=...), another window of "
                         "the run, or check that the recording was taken while training")
    return g


# ============================================================ the spectrum
@dataclass
class KoopmanSpectrum:
    """The DMD (approximate Koopman) spectrum of one run's delay-embedded observable.

    Attributes:
        eigenvalues: ``(r,)`` complex128 per-sample eigenvalues, sorted by ``|lambda|`` descending,
            then by angle descending (a conjugate pair: positive angle first).
        modes: ``(k, r)`` complex128 DMD modes in the observable's principal coordinates (the first
            delay block of the exact-DMD modes).
        amplitudes: ``(r,)`` complex128 amplitudes of the modes at the first delay vector (in the
            rank-r coordinates, so ``|amplitude|`` ranks the modes' weight in the run).
        rank: r, the number of DMD eigenvalues.
        delays: D, the number of delays in the embedding.
        n_components: k, principal coordinates actually used (fewer than asked when the samples
            span fewer directions).
        observable: a description of the observable.
        singular_values: the resolved singular values of the centred delay matrix, descending.
        energy: fraction of their squared sum held by the first r.
        explained_variance: fraction of the observable's variance held by the k coordinates.
        reconstruction_error: relative one-step-ahead error of the rank-r model on the delay
            vectors, ``||Y - (A X + c)|| / ||Y - mean||`` (0 = exactly linear).
        free_run_error: relative error of the model run freely from the first delay vector
            (``||H - H_hat|| / ||H - mean||``; inf if it blows up).
        n_steps: T, the samples the spectrum was fitted to; ``steps`` their step numbers.
    """

    eigenvalues: np.ndarray
    modes: np.ndarray = field(repr=False)
    amplitudes: np.ndarray = field(repr=False)
    rank: int
    delays: int
    n_components: int
    observable: str
    singular_values: np.ndarray = field(repr=False)
    energy: float
    explained_variance: float
    reconstruction_error: float
    free_run_error: float
    n_steps: int
    steps: list[int] = field(default_factory=list, repr=False)
    signature: tuple = field(default=(), repr=False, compare=False)

    def __repr__(self) -> str:
        return (f"KoopmanSpectrum(rank={self.rank}, delays={self.delays}, T={self.n_steps}, "
                f"observable={self.observable!r}, one-step error={self.reconstruction_error:.3g})")

    @property
    def continuous_eigenvalues(self) -> np.ndarray:
        """``log(lambda)`` per sample interval: real part = growth rate, imaginary = angular frequency."""
        with np.errstate(divide="ignore"):
            return np.log(self.eigenvalues)

    def to_dict(self) -> dict:
        """JSON-ready numbers (complex values as ``[re, im]``)."""
        return {
            "observable": self.observable, "rank": self.rank, "delays": self.delays,
            "n_components": self.n_components, "n_steps": self.n_steps,
            "first_step": self.steps[0] if self.steps else None, "last_step": self.steps[-1] if self.steps else None,
            "eigenvalues": _complex_list(self.eigenvalues), "amplitudes": _complex_list(self.amplitudes),
            "abs_eigenvalues": [float(v) for v in np.abs(self.eigenvalues)],
            "energy": self.energy, "explained_variance": self.explained_variance,
            "reconstruction_error": _finite_or_none(self.reconstruction_error),
            "free_run_error": _finite_or_none(self.free_run_error),
            "singular_values": [float(v) for v in self.singular_values[:64]],
        }


def _complex_list(x: np.ndarray) -> list[list[float]]:
    return [[float(v.real), float(v.imag)] for v in np.asarray(x)]


def _finite_or_none(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def _check_settings(delays, rank, energy) -> None:
    if not isinstance(delays, int) or isinstance(delays, bool) or delays < 1:
        raise ValueError(f"delays must be an integer >= 1 (1 = no delay embedding), got {delays!r}")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ValueError(f"rank must be an integer >= 1 (or None to choose it by energy=), got {rank!r}")
    if not isinstance(energy, (int, float)) or isinstance(energy, bool) or not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1] (the share of the squared singular values the rank keeps, "
                         f"e.g. 0.99), got {energy!r}")


def _check_length(T: int, delays: int, rank: int | None, what: str) -> None:
    """Raise unless T samples, embedded with ``delays``, support DMD at ``rank`` (>= 1 if None)."""
    r = 1 if rank is None else rank
    # T' = T - D + 1 delay vectors give T' - 1 pairs; centring them leaves rank <= T' - 2.
    if T - delays - 1 >= r:
        return
    ask = f"rank {rank}" if rank is not None else "any rank"
    if T - r - 1 >= 1:
        fix = f"use delays <= {T - r - 1}"
        if T - delays - 1 >= 1:
            fix += f", or rank <= {T - delays - 1}"
    else:
        fix = f"record at least {r + 2} samples"
    raise ValueError(f"{what}: too few samples for the delays and rank asked: {T} samples with delays={delays} "
                     f"leave {T - delays + 1} delay vectors, and DMD at {ask} needs at least {r + 2}: {fix} "
                     "(or record more steps)")


def _double_centre(m: Tensor) -> Tensor:
    """``J m J`` (J = I - 11^T/n on each side): the Gram of the centred vectors from an uncentred one."""
    return m - m.mean(0, keepdim=True) - m.mean(1, keepdim=True) + m.mean()


def _eigh_desc(m: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending, clipped at 0) and eigenvectors of a symmetric PSD matrix."""
    lam, u = torch.linalg.eigh(m)
    return lam.flip(0).clamp_min(0.0), u.flip(1)


@contextmanager
def _one_thread():
    """Run the ``T x T`` algebra on one thread: these matrices are too small to gain from threads,
    and multi-threaded LAPACK on them is slow where cores are shared (measured here, 2 shared
    vCPUs: a 200 x 200 ``eigh`` took 6.5 ms on one thread, 236 ms on two)."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _coordinates(gram, n_components: int | None, what: str) -> tuple[Tensor, float]:
    """Principal coordinates ``(T, k)`` float64 of the samples whose Gram matrix is ``gram``, and
    the share of the variance they hold. Directions the Gram cannot resolve (:data:`GRAM_RTOL`)
    are dropped."""
    lam, u = _eigh_desc(_double_centre(torch.as_tensor(gram, dtype=torch.float64)))
    if not float(lam[0]) > 0:
        raise ValueError(f"{what}: the observable does not move (zero variance): choose tensors that train, "
                         "or another window of the run")
    live = int((lam > GRAM_RTOL * lam[0]).sum())
    k = live if n_components is None else min(n_components, live)
    z = u[:, :k] * lam[:k].sqrt()
    sign = torch.sign(z[z.abs().argmax(0), torch.arange(k)])  # deterministic: largest entry positive
    return z * torch.where(sign == 0, 1.0, sign), float(lam[:k].sum() / lam.sum())


def principal_coordinates(
    trajectory,
    n_components: int | None = DEFAULT_COMPONENTS,
    *,
    layer: str | Sequence[str] | None = None,
    progress: bool | None = None,
) -> tuple[np.ndarray, float]:
    """PCA of a run over time, from its ``T x T`` Gram matrix (no ``N x N`` or ``N x T`` matrix).

    Args:
        trajectory: as :func:`koopman_spectrum` takes it.
        n_components: coordinates to keep (``None``: all that the samples resolve).
        layer: restrict to these tensors (names or module prefixes).

    Returns:
        ``(Z, explained)``: ``Z`` is ``(T, k)`` float64, row t the coordinates of sample t (centred
        in time) on the leading principal directions, ``Z = U_k S_k`` of the SVD of the centred
        ``(T, N)`` samples (column signs: largest entry positive); ``explained`` is the share of
        the variance the k directions hold.
    """
    traj = _as_trajectory(trajectory, progress=progress)
    obs = _resolve_observable(traj, "layer" if layer is not None else "raw", layer, n_components)
    gram = observable_gram(traj, obs.ranges, progress=progress)
    with _one_thread():
        z, explained = _coordinates(gram, n_components, "the run")
    return z.numpy(), explained


def _spectrum_from_gram(gram, obs: _Observable, *, delays: int, rank: int | None, energy: float,
                        steps: Sequence[int], what: str, details: bool = True) -> KoopmanSpectrum:
    """The spectrum of samples whose (time-centred or not) observable Gram matrix is ``gram`` (T x T).

    ``details=False`` skips the modes, amplitudes and free-run error (the null's windows need only
    the eigenvalues).
    """
    T = gram.shape[0]
    _check_length(T, delays, rank, what)
    with _one_thread():
        return _spectrum(gram, obs, delays=delays, rank=rank, energy=energy, steps=steps, what=what,
                         details=details)


def _spectrum(gram, obs: _Observable, *, delays: int, rank: int | None, energy: float, steps: Sequence[int],
              what: str, details: bool) -> KoopmanSpectrum:
    T = gram.shape[0]
    z, explained = _coordinates(gram, obs.n_components, what)
    k = z.shape[1]

    # Gram of the delay vectors h_t (t < T'): a sum of D shifted diagonal blocks of Z Z^T.
    gz = z @ z.T
    tp = T - delays + 1
    kh = torch.zeros(tp, tp, dtype=torch.float64)
    for d in range(delays):
        kh += gz[d : d + tp, d : d + tp]
    n = tp - 1  # pairs (h_t, h_t+1)
    kxx = _double_centre(kh[:n, :n])  # X~^T X~, X~ = X - mean: the affine fit
    kxy = _double_centre(kh[:n, 1:])  # X~^T Y~
    s2, v = _eigh_desc(kxx)
    if not float(s2[0]) > 0:
        raise ValueError(f"{what}: the delay-embedded observable does not move: choose tensors that train, or "
                         "another window of the run")
    resolved = int((s2 > GRAM_RTOL * s2[0]).sum())
    cum = (torch.cumsum(s2, 0) / s2.sum()).numpy()
    if rank is None:
        r = min(int(np.searchsorted(cum, energy - 1e-12)) + 1, resolved)
    elif rank > resolved:
        raise ValueError(f"{what}: rank {rank} asked, but the delay-embedded observable ({k} coordinates x "
                         f"{delays} delays, {T} samples) has only {resolved} resolved directions: use rank <= "
                         f"{resolved}, or more components/delays if the dynamics need more")
    else:
        r = rank
    sig = s2[:r].sqrt()
    vr = v[:, :r] / sig  # V S^-1
    a_tilde = (vr.T @ kxy @ v[:, :r]) / sig[None, :]  # U^T Y~ V S^-1 with U = X~ V S^-1: (r, r)
    ev_t, w_t = torch.linalg.eig(a_tilde)
    ev, w = ev_t.numpy(), w_t.numpy()
    order = np.lexsort((-np.angle(ev), -np.round(np.abs(ev), 12)))
    ev, w = ev[order], w[:, order]
    kyy = _double_centre(kh[1:, 1:])
    ty = float(torch.trace(kyy))
    kept = float(torch.trace(v[:, :r].T @ kyy @ v[:, :r]))
    one_step = math.sqrt(max(ty - kept, 0.0) / ty) if ty > 0 else 0.0

    modes = np.zeros((k, r), dtype=np.complex128)
    amps = np.zeros(r, dtype=np.complex128)
    free_run = float("nan")
    if details:
        y0 = z[1 : n + 1] - z[1 : n + 1].mean(0)  # first delay block of Y~ (n, k)
        modes = (y0.T @ vr).numpy().astype(np.complex128) @ w
        # q_t = U^T (h_t - x_mean) for every delay vector: from the Gram alone.
        m = kh[:n, :]
        p = m - m.mean(0, keepdim=True)
        p = p - p[:, :n].mean(1, keepdim=True)
        q = (vr.T @ p).numpy()  # (r, T')
        amps = torch.linalg.solve(torch.from_numpy(w), torch.from_numpy(q[:, 0]).to(torch.complex128)).numpy()
        free_run = _free_run_error(kh.numpy(), q, a_tilde.numpy(), n)
    return KoopmanSpectrum(
        eigenvalues=ev, modes=modes, amplitudes=amps, rank=r, delays=delays, n_components=k,
        observable=obs.describe(), singular_values=s2[:resolved].sqrt().numpy(), energy=float(cum[r - 1]),
        explained_variance=explained, reconstruction_error=one_step, free_run_error=free_run, n_steps=T,
        steps=list(steps), signature=obs.signature)


def _free_run_error(kh: np.ndarray, q: np.ndarray, a_tilde: np.ndarray, n: int) -> float:
    """Relative error of ``q_{t+1} = A q_t + c`` run from ``q_0`` (projected DMD), plus what lies
    outside the rank-r subspace, over ``||H - mean||``."""
    tp = kh.shape[0]
    drift = (q[:, n] - q[:, 0]) / n  # U^T (y_mean - x_mean)
    qh = np.empty_like(q)
    qh[:, 0] = q[:, 0]
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(1, tp):
            qh[:, t] = a_tilde @ qh[:, t - 1] + drift
        # ||h_t - x_mean||^2 from the Gram, minus its part inside the subspace
        xm = kh[:n, :n].mean()
        h2 = np.diag(kh) - 2 * kh[:n, :].mean(0) + xm
        resid = np.clip(h2 - (q ** 2).sum(0), 0.0, None).sum()
        err = float(((q - qh) ** 2).sum() + resid)
    tot = kh - kh.mean(0, keepdims=True) - kh.mean(1, keepdims=True) + kh.mean()
    den = float(np.trace(tot))
    if not math.isfinite(err):
        return float("inf")
    return math.sqrt(err / den) if den > 0 else 0.0


def koopman_spectrum(
    trajectory,
    *,
    observable: str = "pca",
    n_components: int | None = None,
    layer: str | Sequence[str] | None = None,
    delays: int = 32,
    rank: int | None = None,
    energy: float = 0.99,
    progress: bool | None = None,
) -> KoopmanSpectrum:
    """The Koopman (DMD) spectrum of a run: observable -> delay embedding -> exact DMD (module doc).

    Args:
        trajectory: a :class:`~modeopt.Trajectory`; a path :func:`~modeopt.analysis.load_trajectory`
            reads (snapshot directory, trajectory file, checkpoint directory); or a time-major
            ``(T, d)`` tensor/array (weights or an observable you computed).
        observable: ``"pca"`` - the leading principal coordinates of all the weights;
            ``"layer"`` - the weights of the tensors named by ``layer``; ``"raw"`` - every column.
        n_components: principal coordinates kept: default 10 for ``"pca"``, all (lossless) for
            ``"layer"`` and ``"raw"``.
        layer: for ``"layer"``: a tensor name (``"fc1.weight"``), a module prefix (``"fc1"``: its
            weight and bias) or a list of them.
        delays: D, delays of the Hankel embedding (1 = none). Needs ``T >= D + rank + 1``.
        rank: r, DMD eigenvalues to keep; ``None`` chooses the smallest r whose singular values
            hold ``energy`` of the squared total.
        energy: in (0, 1], used when ``rank`` is None.
        progress: progress bar over the weights (``None``: only on a terminal, for big runs).

    Returns:
        A :class:`KoopmanSpectrum`. Memory beyond the input: ``O(T^2)`` plus one chunk.

    Raises:
        ValueError: saying what to change - too few samples for the delays and rank, a rank
            beyond the observable's resolved directions, an observable that does not move,
            NaN/inf weights (which tensor, from which step), or bad settings.
    """
    _check_settings(delays, rank, energy)
    traj = _as_trajectory(trajectory, progress=progress)
    obs = _resolve_observable(traj, observable, layer, n_components)
    _check_length(traj.n_samples, delays, rank, "the run")
    _warn_uneven(traj.steps)
    gram = observable_gram(traj, obs.ranges, progress=progress, what="the run")
    return _spectrum_from_gram(gram, obs, delays=delays, rank=rank, energy=energy, steps=traj.steps,
                               what="the run")


def _warn_uneven(steps: Sequence[int]) -> None:
    gaps = {b - a for a, b in zip(steps, steps[1:])}
    if len(gaps) > 1:
        warnings.warn(f"DMD assumes evenly spaced samples; these steps have gaps {sorted(gaps)[:5]}: the "
                      "eigenvalues are per sample, not per step", stacklevel=3)


# ============================================================ the distance
def spectrum_distance(a, b) -> tuple[float, np.ndarray]:
    """Wasserstein-1 distance between two equal-size eigenvalue sets in the complex plane.

    With ``r`` eigenvalues each (uniform weights ``1/r``), W1 is the mean ``|lambda_a - lambda_b|``
    over the optimal one-to-one matching (``scipy.optimize.linear_sum_assignment``).

    Args:
        a, b: :class:`KoopmanSpectrum` objects or 1-D complex arrays.

    Returns:
        ``(distance, pairs)``: pairs is ``(r, 2)`` int, rows ``(i, j)`` matching ``a[i]`` to ``b[j]``.

    Raises:
        ValueError: spectra of different observables, or of different sizes (compute both at one
            ``rank``).
    """
    if isinstance(a, KoopmanSpectrum) and isinstance(b, KoopmanSpectrum):
        if a.signature and b.signature and a.signature != b.signature:
            raise ValueError(f"the spectra describe different observables ({_signature_text(a.signature)} vs. "
                             f"{_signature_text(b.signature)}): compute both with the same observable, layer and "
                             "n_components")
        if a.delays != b.delays:
            raise ValueError(f"the spectra use different delays ({a.delays} vs. {b.delays}): compute both with the "
                             "same delays")
    la = np.asarray(a.eigenvalues if isinstance(a, KoopmanSpectrum) else a, dtype=np.complex128).ravel()
    lb = np.asarray(b.eigenvalues if isinstance(b, KoopmanSpectrum) else b, dtype=np.complex128).ravel()
    if la.size != lb.size:
        raise ValueError(f"the spectra have different ranks ({la.size} vs. {lb.size} eigenvalues): compute both at "
                         f"one rank (e.g. rank={min(la.size, lb.size)}) - compare_dynamics does this for you")
    if la.size == 0:
        raise ValueError("empty spectra: nothing to compare")
    cost = np.abs(la[:, None] - lb[None, :])
    ia, ib = linear_sum_assignment(cost)
    return float(cost[ia, ib].mean()), np.stack([ia, ib], axis=1)


def _signature_text(sig: tuple) -> str:
    if not sig:
        return "unknown"
    if sig[0] == "pca":
        return f"pca with n_components={sig[1]}"
    if sig[0] == "layer":
        parts = ", ".join(f"{n} {tuple(s)}" for n, s in zip(sig[1], sig[2]))
        return f"layer {parts}" + ("" if sig[3] is None else f" with n_components={sig[3]}")
    return f"raw with {sig[1]} columns" + ("" if sig[2] is None else f", n_components={sig[2]}")


# ============================================================ the comparison
@dataclass
class DynamicsComparison:
    """Two runs' Koopman spectra, their distance, and its significance (:func:`compare_dynamics`).

    Attributes:
        distance: W1 distance between the full runs' spectra (mean ``|lambda_a - lambda_b|`` over
            the optimal matching).
        p_value: ``(1 + #{null >= statistic}) / (1 + len(null))``: how often a run's windows are at
            least as far apart as the two runs' windows typically are. Small = different dynamics.
        statistic: the median of ``between``, the observed between-run distance at window scale.
        null: within-run distances: a window of A vs. a non-overlapping window of A (B vs. B).
        between: between-run distances for the same pairs of window positions (A vs. B).
        pairs: ``(r, 2)`` matched indices into ``spectrum_a.eigenvalues`` / ``spectrum_b.eigenvalues``.
        spectrum_a, spectrum_b: the full runs' spectra (same rank and delays).
        window: samples per window; ``window_starts`` their first sample indices.
        labels: names of the two runs (figure, report).
        notes: how the rank was settled, and anything else worth knowing.
    """

    distance: float
    p_value: float
    statistic: float
    null: np.ndarray = field(repr=False)
    between: np.ndarray = field(repr=False)
    pairs: np.ndarray = field(repr=False)
    spectrum_a: KoopmanSpectrum = field(repr=False)
    spectrum_b: KoopmanSpectrum = field(repr=False)
    window: int = 0
    window_starts: list[int] = field(default_factory=list, repr=False)
    labels: tuple[str, str] = ("A", "B")
    method: str = "segments"
    notes: list[str] = field(default_factory=list, repr=False)

    @property
    def rank(self) -> int:
        return self.spectrum_a.rank

    @property
    def delays(self) -> int:
        return self.spectrum_a.delays

    @property
    def matched(self) -> list[tuple[complex, complex]]:
        """The matched eigenvalue pairs ``(lambda_a, lambda_b)``, in the order of ``spectrum_a``."""
        la, lb = self.spectrum_a.eigenvalues, self.spectrum_b.eigenvalues
        return [(complex(la[i]), complex(lb[j])) for i, j in self.pairs]

    def __repr__(self) -> str:
        return (f"DynamicsComparison(distance={self.distance:.4g}, p={self.p_value:.3g}, rank={self.rank}, "
                f"delays={self.delays}, window={self.window}, null={len(self.null)})")

    def plot(self, path: str | os.PathLike, *, title: str | None = None) -> Path:
        """Both spectra with the matching, and the null with the observed statistic (PNG)."""
        from .figures import plot_comparison

        return plot_comparison(self, path, title=title)

    def to_dict(self) -> dict:
        """JSON-ready numbers."""
        la, lb = self.spectrum_a.eigenvalues, self.spectrum_b.eigenvalues
        return {
            "labels": list(self.labels), "distance": self.distance, "p_value": self.p_value,
            "statistic": self.statistic, "method": self.method, "rank": self.rank, "delays": self.delays,
            "window": self.window, "window_starts": list(self.window_starts),
            "null": [float(v) for v in self.null], "between": [float(v) for v in self.between],
            "null_median": float(np.median(self.null)), "between_median": float(np.median(self.between)),
            "pairs": [{"a": int(i), "b": int(j), "lambda_a": [float(la[i].real), float(la[i].imag)],
                       "lambda_b": [float(lb[j].real), float(lb[j].imag)], "distance": float(abs(la[i] - lb[j]))}
                      for i, j in self.pairs],
            "spectrum_a": self.spectrum_a.to_dict(), "spectrum_b": self.spectrum_b.to_dict(),
            "notes": list(self.notes),
        }

    def markdown(self, *, title: str | None = None, figure: str | None = None) -> str:
        """A short markdown report: the verdict, the numbers, the matched eigenvalues."""
        a, b = self.labels
        sa, sb = self.spectrum_a, self.spectrum_b
        verdict = ("different dynamics (p <= 0.05)" if self.p_value <= 0.05
                   else "not distinguishable (p > 0.05)")
        lines = [f"# {title or f'Koopman spectra: {a} vs. {b}'}", "",
                 f"**W1 distance {self.distance:.4g}, p = {self.p_value:.3g}: {verdict}.**", "",
                 "| | " + a + " | " + b + " |", "|---|---|---|",
                 f"| samples | {sa.n_steps} | {sb.n_steps} |",
                 f"| observable | {sa.observable} | {sb.observable} |",
                 f"| coordinates used (variance held) | {sa.n_components} ({sa.explained_variance:.3f}) | "
                 f"{sb.n_components} ({sb.explained_variance:.3f}) |",
                 f"| rank / delays | {sa.rank} / {sa.delays} | {sb.rank} / {sb.delays} |",
                 f"| energy held at this rank | {sa.energy:.4f} | {sb.energy:.4f} |",
                 f"| one-step error | {sa.reconstruction_error:.3g} | {sb.reconstruction_error:.3g} |",
                 f"| free-run error | {sa.free_run_error:.3g} | {sb.free_run_error:.3g} |",
                 f"| largest abs(eigenvalue) | {np.abs(sa.eigenvalues).max():.4f} | "
                 f"{np.abs(sb.eigenvalues).max():.4f} |", "",
                 f"Null ({self.method}): {len(self.null)} within-run distances between non-overlapping windows of "
                 f"{self.window} samples (median {np.median(self.null):.4g}); the same window positions across the "
                 f"runs give {len(self.between)} between-run distances (median {self.statistic:.4g} = the "
                 f"statistic). p = (1 + #null >= statistic) / (1 + #null).", ""]
        if figure:
            lines += [f"![spectra and null]({figure})", ""]
        lines += ["| # | lambda " + a + " | lambda " + b + " | abs(difference) |", "|---|---|---|---|"]
        for k, (la, lb) in enumerate(self.matched):
            lines.append(f"| {k} | {_fmt_complex(la)} | {_fmt_complex(lb)} | {abs(la - lb):.4g} |")
        if self.notes:
            lines += ["", "Notes:", ""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def _fmt_complex(z: complex) -> str:
    return f"{z.real:.4f} {'+' if z.imag >= 0 else '-'} {abs(z.imag):.4f}i"


def compare_dynamics(
    run_a,
    run_b,
    *,
    observable: str = "pca",
    n_components: int | None = None,
    layer: str | Sequence[str] | None = None,
    delays: int = 32,
    rank: int | None = None,
    energy: float = 0.99,
    window: int | None = None,
    n_windows: int = 32,
    n_null: int = 200,
    null: str = "segments",
    seed: int = 0,
    labels: tuple[str, str] = ("A", "B"),
    progress: bool | None = None,
) -> DynamicsComparison:
    """Are two runs the same dynamical system? Their spectra, W1 distance, and a p-value.

    **Basis.** Each run gets its own PCA basis (and each window its own): DMD eigenvalues do not
    depend on the basis the observable is written in, so no shared basis is needed, and none would
    be meaningful across seeds (two inits train in unrelated weight directions - hidden units are
    permuted) or across architectures (the paper compares shallow and wide networks). A joint
    basis would also make one run's spectrum depend on the other run.

    **Rank.** ``rank`` if given; otherwise each full run's ``energy`` rank, and the smaller of the
    two for both (W1 needs equal-size sets; the smaller rank is what both runs resolve). It is
    capped by what a window can hold (``window - delays - 1``); ``notes`` says when that happened.

    **Null distribution** (``null="segments"``): windows of ``window`` samples start at
    ``n_windows`` evenly spaced positions in each run. For every pair of non-overlapping positions
    (``s, s'``), the within-run distances ``d(A_s, A_s')`` and ``d(B_s, B_s')`` form the null
    ("the same dynamics": how far a run is from itself), and the between-run distances
    ``d(A_s, B_s')`` and ``d(B_s, A_s')`` use the same positions, so that drift of the dynamics
    along a run enters both alike. Windows do not overlap, so a within-run pair shares no data. At
    most ``n_null`` of each are kept (a random subset of position pairs, seeded). The statistic is
    the median between-run distance; ``p = (1 + #{null >= statistic}) / (1 + #null)``, the share of
    a run's own window pairs that are at least as far apart as the two runs typically are.
    It is conservative: under the same dynamics the statistic sits mid-null (p around 0.5), and a
    p below 0.05 needs the typical between-run distance to exceed 95 % of the within-run ones. The
    smallest p it can give is ``1 / (1 + #null)``.

    Args:
        run_a, run_b: anything :func:`koopman_spectrum` takes (the same kind of observable in both).
        observable, n_components, layer, delays, rank, energy: as :func:`koopman_spectrum`, for
            both runs and every window.
        window: samples per window (default a third of the shorter run).
        n_windows: window positions per run.
        n_null: at most this many null (and between-run) distances.
        null: ``"segments"`` (the only method).
        seed: seeds the choice of position pairs when there are more than ``n_null``.
        labels: names of the runs, for the figure and report.

    Raises:
        ValueError: runs with different observables (tensor names/shapes, ``n_components``), a
            window too short for the delays and rank or too long for two non-overlapping windows,
            and every error of :func:`koopman_spectrum`.
    """
    if null != "segments":
        raise ValueError(f"null must be 'segments' (within-run window distances), got {null!r}")
    _check_settings(delays, rank, energy)
    for name, v, lo in (("n_windows", n_windows, 2), ("n_null", n_null, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    la, lb = labels
    ta = _as_trajectory(run_a, f"run {la}", progress)
    tb = _as_trajectory(run_b, f"run {lb}", progress)
    oa = _resolve_observable(ta, observable, layer, n_components)
    ob = _resolve_observable(tb, observable, layer, n_components)
    if oa.signature != ob.signature:
        raise ValueError(f"the runs have different observables: {la} has {_signature_text(oa.signature)}, {lb} has "
                         f"{_signature_text(ob.signature)}; compare runs of the same tensors (or use "
                         "observable='pca', which compares any two models)")
    for t, lab in ((ta, la), (tb, lb)):
        _check_length(t.n_samples, delays, rank, f"run {lab}")
        _warn_uneven(t.steps)
    t_min = min(ta.n_samples, tb.n_samples)
    if window is None:
        window = t_min // 3
    elif not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"window must be an integer >= 1 (samples per window), got {window!r}")
    if 2 * window > t_min:
        raise ValueError(f"window={window} is too long: the null needs two non-overlapping windows in the shorter run "
                         f"({t_min} samples): use window <= {t_min // 2}")
    _check_length(window, delays, rank, f"a window of {window} samples (the null's)")

    ga = torch.from_numpy(observable_gram(ta, oa.ranges, progress=progress, what=f"run {la}"))
    gb = torch.from_numpy(observable_gram(tb, ob.ranges, progress=progress, what=f"run {lb}"))
    notes: list[str] = []
    cap = window - delays - 1  # the largest rank a window supports
    if rank is None:
        ra = _spectrum_from_gram(ga, oa, delays=delays, rank=None, energy=energy, steps=ta.steps,
                                 what=f"run {la}", details=False).rank
        rb = _spectrum_from_gram(gb, ob, delays=delays, rank=None, energy=energy, steps=tb.steps,
                                 what=f"run {lb}", details=False).rank
        r = min(ra, rb)
        notes.append(f"rank {r}: energy {energy} needs rank {ra} in {la} and {rb} in {lb}; both use the smaller")
        if r > cap:
            notes.append(f"rank lowered from {r} to {cap}, the most a window of {window} samples with {delays} "
                         "delays holds (pass window= or delays= to change it)")
            r = cap
    else:
        r = rank
    spec_a = _spectrum_from_gram(ga, oa, delays=delays, rank=r, energy=energy, steps=ta.steps, what=f"run {la}")
    spec_b = _spectrum_from_gram(gb, ob, delays=delays, rank=r, energy=energy, steps=tb.steps, what=f"run {lb}")
    distance, pairs = spectrum_distance(spec_a, spec_b)

    # ---- the null: windows at evenly spaced positions, pairs that do not overlap
    starts = sorted({int(round(s)) for s in np.linspace(0, t_min - window, n_windows)})
    pos = [(i, j) for i in range(len(starts)) for j in range(i + 1, len(starts)) if starts[j] - starts[i] >= window]
    items = [(p, side) for p in pos for side in (0, 1)]  # side 0: A-A null, A_s-B_s'; side 1: B-B, B_s-A_s'
    if len(items) > n_null:
        rng = np.random.default_rng(seed)
        items = [items[i] for i in sorted(rng.choice(len(items), size=n_null, replace=False))]
    grams = (ga, gb)
    steps = (ta.steps, tb.steps)
    cache: dict[tuple[int, int], np.ndarray] = {}

    def eig(run: int, i: int) -> np.ndarray:
        if (run, i) not in cache:
            s = starts[i]
            what = f"the window of samples {s}..{s + window - 1} of run {labels[run]}"
            cache[run, i] = _spectrum_from_gram(grams[run][s : s + window, s : s + window], (oa, ob)[run],
                                                delays=delays, rank=r, energy=energy, steps=steps[run][s : s + window],
                                                what=what, details=False).eigenvalues
        return cache[run, i]

    hide = not progress  # ~1 ms a window pair: a bar only when asked for
    within, across = [], []
    for (i, j), side in tqdm(items, desc="null windows", disable=hide, leave=False):
        within.append(spectrum_distance(eig(side, i), eig(side, j))[0])
        across.append(spectrum_distance(eig(side, i), eig(1 - side, j))[0])
    null_d, between = np.asarray(within), np.asarray(across)
    stat = float(np.median(between))
    p = float((1 + np.count_nonzero(null_d >= stat)) / (1 + null_d.size))
    return DynamicsComparison(distance=distance, p_value=p, statistic=stat, null=null_d, between=between,
                              pairs=pairs, spectrum_a=spec_a, spectrum_b=spec_b, window=window,
                              window_starts=starts, labels=(la, lb), method=null, notes=notes)
