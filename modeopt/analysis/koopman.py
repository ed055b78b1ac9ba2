"""Koopman spectra of training runs: observable -> time-delay embedding -> exact DMD.

After Redman et al., "Identifying equivalent training dynamics" (arXiv 2302.09160): record an
observable of the weights at every step, embed it in time delays, fit exact DMD, and take the DMD
eigenvalues as the run's (approximate) Koopman spectrum. Conjugate dynamical systems have the
same spectrum, so two runs are compared by the Wasserstein-1 distance between their eigenvalues
(:mod:`~modeopt.analysis.spectrum_matching`, :mod:`~modeopt.analysis.null_test`).

:func:`koopman_spectrum` for one run of T samples:

1. **Observable and principal coordinates** (:mod:`~modeopt.analysis.observable`): ``Z`` ``(T, k)``
   from one chunked pass over the chosen weights. ``"pca"`` keeps the leading ``k`` (10 by
   default); ``"layer"``/``"raw"`` keep all of them (lossless: DMD eigenvalues do not change under
   an orthogonal change of coordinates, and the samples span at most ``T - 1`` directions).
2. **Time-delay (Hankel) embedding** with ``D`` delays: ``h_t = [z_t; z_{t+1}; ...; z_{t+D-1}]``,
   ``t = 0 .. T-D``, ``T' = T - D + 1`` vectors of ``D k`` numbers.
3. **Exact DMD with an affine term** on the pairs ``(h_t, h_{t+1})``: ``h_{t+1} ~= A h_t + c``
   (centring the "before" and "after" matrices by their own means): the eigenvalues do not depend
   on where the run is in weight space, and the trivial eigenvalue 1 of the constant offset is not
   part of them. Rank ``r`` explicit, or the smallest that holds ``energy`` of the squared singular
   values. Everything comes from the ``T' x T'`` Gram matrix of the delay vectors (the method of
   snapshots), a sum of ``D`` shifted blocks of ``Z Z^T``: the ``D k``-long vectors are never formed.

Precision: the Gram matrices of step 3 square the condition number, so delay-embedded directions
with singular value below ``1e-6`` of the largest are treated as zero (:data:`GRAM_RTOL` on their
squares).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from modeopt.utils.checks import check_int
from modeopt.trajectories.time_reduction import one_thread
from modeopt.trajectories.trajectory import Trajectory
from .factor import warn_uneven_steps
from .observable import Observable, as_trajectory, coordinates, observable_factor, resolve_observable

__all__ = ["KoopmanSpectrum", "koopman_spectrum", "spectrum_from_factor", "open_run", "check_settings",
           "check_length", "GRAM_RTOL", "DEFAULT_DELAYS", "DEFAULT_ENERGY"]

#: eigenvalues of a Gram matrix below this fraction of the largest are rounding noise
#: (singular values below 1e-6 of the largest: float64 resolves ~1e-16 of the squared scale).
GRAM_RTOL = 1e-12
#: delays of the embedding, and the energy that chooses the rank, unless given.
DEFAULT_DELAYS, DEFAULT_ENERGY = 32, 0.99


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
        signature: identifies the observable (:attr:`Observable.signature`): spectra of different
            observables are not compared.
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


def check_settings(delays, rank, energy) -> None:
    """Raise ``ValueError`` for delays, rank or energy out of range (``rank=None``: chosen by energy)."""
    check_int("delays", delays, 1)
    if rank is not None:
        check_int("rank", rank, 1)
    if not isinstance(energy, (int, float)) or isinstance(energy, bool) or not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1] (the share of the squared singular values the rank keeps, "
                         f"e.g. 0.99), got {energy!r}")


def check_length(T: int, delays: int, rank: int | None, what: str) -> None:
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


def spectrum_from_factor(factor: Tensor, obs: Observable, *, delays: int, rank: int | None, energy: float,
                         steps: Sequence[int], what: str, details: bool = True) -> KoopmanSpectrum:
    """The spectrum of the samples whose time factor is ``factor``.

    Args:
        factor: ``(m, T)`` float64, the samples as columns in an orthonormal basis: a run's
            :func:`~modeopt.analysis.observable.observable_factor`, or a block of its columns (a window).
        obs: the observable (its ``n_components`` and description).
        delays, rank, energy: as :func:`koopman_spectrum`.
        steps: the T samples' steps; ``what`` names them in errors.
        details: ``False`` skips the modes, amplitudes and free-run error (the null's windows need
            only the eigenvalues).
    """
    T = factor.shape[1]
    check_length(T, delays, rank, what)
    with one_thread():
        z, explained = coordinates(factor, obs.n_components, what)
        return _spectrum(z, explained, obs, delays=delays, rank=rank, energy=energy, steps=steps, what=what,
                         details=details)


def _spectrum(z: Tensor, explained: float, obs: Observable, *, delays: int, rank: int | None, energy: float,
              steps: Sequence[int], what: str, details: bool) -> KoopmanSpectrum:
    """DMD of the delay-embedded principal coordinates ``z`` ``(T, k)`` (module doc, steps 2-3)."""
    T, k = z.shape

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
    delays: int = DEFAULT_DELAYS,
    rank: int | None = None,
    energy: float = DEFAULT_ENERGY,
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
    check_settings(delays, rank, energy)
    traj, obs = open_run(trajectory, observable=observable, layer=layer, n_components=n_components, delays=delays,
                         rank=rank, what="the run", progress=progress)
    factor = observable_factor(traj, obs.ranges, progress=progress, what="the run")
    return spectrum_from_factor(factor, obs, delays=delays, rank=rank, energy=energy, steps=traj.steps,
                                what="the run")


def open_run(run, *, observable: str, layer, n_components: int | None, delays: int, rank: int | None, what: str,
             progress: bool | None) -> tuple[Trajectory, Observable]:
    """The trajectory and observable of a run, checked for length and (with a warning) even spacing.

    ``run`` is anything :func:`koopman_spectrum` takes; ``what`` names it in errors.
    """
    traj = as_trajectory(run, what, progress)
    obs = resolve_observable(traj, observable, layer, n_components)
    check_length(traj.n_samples, delays, rank, what)
    warn_uneven_steps(traj.steps, stacklevel=3)
    return traj, obs


