"""The distance between two Koopman spectra: Wasserstein-1 over the optimal eigenvalue matching."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from .koopman import KoopmanSpectrum

__all__ = ["spectrum_distance", "signature_text"]


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
            raise ValueError(f"the spectra describe different observables ({signature_text(a.signature)} vs. "
                             f"{signature_text(b.signature)}): compute both with the same observable, layer and "
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


def signature_text(sig: tuple) -> str:
    """An observable's signature (:attr:`KoopmanSpectrum.signature`) in words, for error messages."""
    if not sig:
        return "unknown"
    if sig[0] == "pca":
        return f"pca with n_components={sig[1]}"
    if sig[0] == "layer":
        parts = ", ".join(f"{n} {tuple(s)}" for n, s in zip(sig[1], sig[2]))
        return f"layer {parts}" + ("" if sig[3] is None else f" with n_components={sig[3]}")
    return f"raw with {sig[1]} columns" + ("" if sig[2] is None else f", n_components={sig[2]}")
