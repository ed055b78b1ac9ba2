"""The result of :func:`~modeopt.analysis.compare_dynamics`, and its JSON, markdown and figure."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .koopman import KoopmanSpectrum

__all__ = ["DynamicsComparison"]


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
        method: how the null was formed (``"segments"``).
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
        """r, the number of eigenvalues of each spectrum (the same in both)."""
        return self.spectrum_a.rank

    @property
    def delays(self) -> int:
        """D, the delays of both embeddings."""
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
