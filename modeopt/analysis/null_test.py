"""Whether two runs have the same dynamics: their spectra, W1 distance, and a null from windows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch import Tensor
from tqdm.auto import tqdm

from modeopt.utils.checks import check_int
from modeopt.trajectories.trajectory import Trajectory
from .comparison import DynamicsComparison
from .koopman import (
    DEFAULT_DELAYS, DEFAULT_ENERGY, KoopmanSpectrum, check_length, check_settings, open_run, spectrum_from_factor,
)
from .observable import Observable, observable_factor
from .spectrum_matching import signature_text, spectrum_distance

__all__ = ["compare_dynamics"]


def compare_dynamics(run_a, run_b, *, observable: str = "pca", n_components: int | None = None,
                     layer: str | Sequence[str] | None = None, delays: int = DEFAULT_DELAYS, rank: int | None = None,
                     energy: float = DEFAULT_ENERGY, window: int | None = None, n_windows: int = 32,
                     n_null: int = 200, null: str = "segments", seed: int = 0, labels: tuple[str, str] = ("A", "B"),
                     progress: bool | None = None) -> DynamicsComparison:
    """Are two runs the same dynamical system? Their spectra, W1 distance, and a p-value.

    **Basis.** Each run gets its own PCA basis (and each window its own): DMD eigenvalues do not
    depend on the basis, so runs of different seeds or architectures compare (docs/koopman.md,
    "Choices in compare_dynamics", says why no shared basis is used).

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
        run_a, run_b: anything :func:`~modeopt.analysis.koopman_spectrum` takes (the same kind of observable in both).
        observable, n_components, layer, delays, rank, energy: as :func:`~modeopt.analysis.koopman_spectrum`, for
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
            and every error of :func:`~modeopt.analysis.koopman_spectrum`.
    """
    if null != "segments":
        raise ValueError(f"null must be 'segments' (within-run window distances), got {null!r}")
    check_settings(delays, rank, energy)
    check_int("n_windows", n_windows, 2)
    check_int("n_null", n_null, 1)
    runs = [_Run.open(run, label, observable=observable, layer=layer, n_components=n_components, delays=delays,
                      rank=rank, progress=progress) for run, label in zip((run_a, run_b), labels)]
    _check_same_observable(*runs)
    window = _check_window(window, min(run.n_samples for run in runs), delays, rank)
    for run in runs:
        run.factor = observable_factor(run.trajectory, run.observable.ranges, progress=progress, what=run.what)
    r, notes = _shared_rank(runs, rank, delays=delays, energy=energy, window=window)
    spec_a, spec_b = (run.spectrum(rank=r, delays=delays, energy=energy) for run in runs)
    distance, pairs = spectrum_distance(spec_a, spec_b)
    starts, within, between = _window_null(runs, window, n_windows=n_windows, n_null=n_null, seed=seed,
                                           rank=r, delays=delays, energy=energy, progress=progress)
    stat = float(np.median(between))
    p = float((1 + np.count_nonzero(within >= stat)) / (1 + within.size))
    return DynamicsComparison(distance=distance, p_value=p, statistic=stat, null=within, between=between,
                              pairs=pairs, spectrum_a=spec_a, spectrum_b=spec_b, window=window,
                              window_starts=starts, labels=tuple(labels), method=null, notes=notes)


@dataclass
class _Run:
    """One run of the comparison: its trajectory, observable and (once computed) time factor."""

    trajectory: Trajectory
    observable: Observable
    label: str
    factor: Tensor | None = None

    @classmethod
    def open(cls, run, label: str, **settings) -> _Run:
        """Read and check a run (:func:`~modeopt.analysis.koopman.open_run`)."""
        return cls(*open_run(run, what=f"run {label}", **settings), label)

    @property
    def what(self) -> str:
        """The run, named for error messages."""
        return f"run {self.label}"

    @property
    def n_samples(self) -> int:
        """T, the run's samples."""
        return self.trajectory.n_samples

    def spectrum(self, *, rank: int | None, delays: int, energy: float, start: int = 0, stop: int | None = None,
                 details: bool = True) -> KoopmanSpectrum:
        """The spectrum of samples ``start:stop`` (a window: the columns of the run's factor)."""
        stop = self.n_samples if stop is None else stop
        what = self.what if (start, stop) == (0, self.n_samples) else \
            f"the window of samples {start}..{stop - 1} of {self.what}"
        return spectrum_from_factor(self.factor[:stop, start:stop], self.observable, delays=delays, rank=rank,
                                    energy=energy, steps=self.trajectory.steps[start:stop], what=what,
                                    details=details)


def _check_same_observable(a: _Run, b: _Run) -> None:
    if a.observable.signature != b.observable.signature:
        raise ValueError(f"the runs have different observables: {a.label} has "
                         f"{signature_text(a.observable.signature)}, {b.label} has "
                         f"{signature_text(b.observable.signature)}; compare runs of the same tensors (or use "
                         "observable='pca', which compares any two models)")


def _check_window(window: int | None, t_min: int, delays: int, rank: int | None) -> int:
    """The window length (default a third of the shorter run), checked to fit two windows and the DMD."""
    if window is None:
        window = t_min // 3
    else:
        check_int("window (samples per window)", window, 1)
    if 2 * window > t_min:
        raise ValueError(f"window={window} is too long: the null needs two non-overlapping windows in the shorter run "
                         f"({t_min} samples): use window <= {t_min // 2}")
    check_length(window, delays, rank, f"a window of {window} samples (the null's)")
    return window


def _shared_rank(runs: Sequence[_Run], rank: int | None, *, delays: int, energy: float,
                 window: int) -> tuple[int, list[str]]:
    """``rank``, or the smaller of the runs' energy ranks capped by what a window holds; with notes."""
    if rank is not None:
        return rank, []
    ra, rb = (run.spectrum(rank=None, delays=delays, energy=energy, details=False).rank for run in runs)
    r = min(ra, rb)
    notes = [f"rank {r}: energy {energy} needs rank {ra} in {runs[0].label} and {rb} in {runs[1].label}; both use "
             "the smaller"]
    cap = window - delays - 1  # the largest rank a window supports
    if r > cap:
        notes.append(f"rank lowered from {r} to {cap}, the most a window of {window} samples with {delays} "
                     "delays holds (pass window= or delays= to change it)")
        r = cap
    return r, notes


def _window_null(runs: Sequence[_Run], window: int, *, n_windows: int, n_null: int, seed: int, rank: int,
                 delays: int, energy: float, progress: bool | None) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Window starts, within-run and between-run distances for the same pairs of positions (docstring
    of :func:`compare_dynamics`)."""
    t_min = min(run.n_samples for run in runs)
    starts = sorted({int(round(s)) for s in np.linspace(0, t_min - window, n_windows)})
    pos = [(i, j) for i in range(len(starts)) for j in range(i + 1, len(starts)) if starts[j] - starts[i] >= window]
    items = [(p, side) for p in pos for side in (0, 1)]  # side 0: A-A null, A_s-B_s'; side 1: B-B, B_s-A_s'
    if len(items) > n_null:
        rng = np.random.default_rng(seed)
        items = [items[i] for i in sorted(rng.choice(len(items), size=n_null, replace=False))]
    cache: dict[tuple[int, int], np.ndarray] = {}

    def eig(run: int, i: int) -> np.ndarray:
        if (run, i) not in cache:
            cache[run, i] = runs[run].spectrum(rank=rank, delays=delays, energy=energy, start=starts[i],
                                               stop=starts[i] + window, details=False).eigenvalues
        return cache[run, i]

    hide = not progress  # ~1 ms a window pair: a bar only when asked for
    within, across = [], []
    for (i, j), side in tqdm(items, desc="null windows", disable=hide, leave=False):
        within.append(spectrum_distance(eig(side, i), eig(side, j))[0])
        across.append(spectrum_distance(eig(side, i), eig(1 - side, j))[0])
    return starts, np.asarray(within), np.asarray(across)
