"""The observable of a run for its Koopman spectrum, and its principal coordinates over time.

An observable is a set of columns of a trajectory: all the weights (``"pca"``), chosen tensors
(``"layer"``) or every column of a ``(T, d)`` array (``"raw"``). One chunked pass over those
columns gives the time-centred ``T x T`` factor ``R`` (:func:`modeopt.trajectories.time_reduction.time_factor`,
``R^T R = Xc Xc^T`` for the centred ``(T, N)`` samples ``Xc``); its SVD gives the principal
coordinates ``Z = V_k S_k`` (``(T, k)``). A window of samples ``s:e`` is the column block
``R[:, s:e]``, so one pass serves every window of a run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from modeopt.utils.checks import check_int
from modeopt.trajectories.time_reduction import NotMoving, one_thread
from modeopt.trajectories.trajectory import Trajectory, as_tensor
from .factor import trajectory_factor

__all__ = ["OBSERVABLES", "DEFAULT_COMPONENTS", "COORDINATE_RTOL", "Observable", "resolve_observable",
           "as_trajectory", "observable_factor", "observable_gram", "coordinates", "principal_coordinates"]

OBSERVABLES = ("pca", "layer", "raw")
#: principal coordinates kept by ``observable="pca"`` unless ``n_components`` says otherwise.
DEFAULT_COMPONENTS = 10
#: principal directions with singular value below this fraction of the largest are dropped: the
#: delay embedding works on the Gram matrix of the coordinates, which resolves no finer.
COORDINATE_RTOL = 1e-6


@dataclass(frozen=True)
class Observable:
    """Which columns of a trajectory make the observable, and how many coordinates are kept.

    Attributes:
        kind: one of :data:`OBSERVABLES`.
        ranges: ``(start, stop)`` column ranges, in layout order.
        names, shapes: the chosen tensors (``"layer"`` only).
        n_weights: columns in the observable.
        n_components: coordinates asked for; ``None`` keeps all (lossless).
    """

    kind: str
    ranges: tuple[tuple[int, int], ...]
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    n_weights: int
    n_components: int | None

    @property
    def signature(self) -> tuple:
        """Equal for two runs exactly when their spectra describe the same observable."""
        if self.kind == "pca":  # basis-free: any two models' leading coordinates are comparable
            return ("pca", self.n_components)
        if self.kind == "layer":
            return ("layer", self.names, self.shapes, self.n_components)
        return ("raw", self.n_weights, self.n_components)

    def describe(self) -> str:
        """One line: the kind, the columns and the coordinates kept."""
        k = "all" if self.n_components is None else f"leading {self.n_components}"
        if self.kind == "pca":
            return f"pca: {k} principal coordinates of {self.n_weights:,} weights"
        if self.kind == "layer":
            names = ", ".join(self.names) if len(self.names) <= 4 else f"{', '.join(self.names[:3])}, ... " \
                                                                       f"({len(self.names)} tensors)"
            return f"layer: {names} ({self.n_weights:,} weights, {k} principal coordinates)"
        return f"raw: {self.n_weights:,} columns ({k} principal coordinates)"


def resolve_observable(traj: Trajectory, observable: str, layer, n_components: int | None) -> Observable:
    """The :class:`Observable` of ``traj`` that :func:`~modeopt.analysis.koopman_spectrum`'s arguments name.

    Raises:
        ValueError: an unknown observable, ``layer`` without ``"layer"`` (or the reverse), a tensor
            name the run does not have, or a trajectory without tensor names for ``"layer"``.
    """
    if observable not in OBSERVABLES:
        raise ValueError(f"observable must be one of {', '.join(map(repr, OBSERVABLES))}, got {observable!r}")
    if n_components is not None:
        check_int("n_components", n_components, 1)
    n = traj.n_weights
    if observable != "layer":
        if layer is not None:
            raise ValueError(f"layer= is only used with observable='layer' (got observable={observable!r}): "
                             "pass observable='layer' to study chosen tensors")
        k = (n_components or DEFAULT_COMPONENTS) if observable == "pca" else n_components
        return Observable(observable, ((0, n),), (), (), n, k)
    if layer is None or (not isinstance(layer, str) and len(layer) == 0):
        raise ValueError("observable='layer' needs layer=NAME (a tensor name such as 'fc1.weight', a module prefix "
                         "such as 'fc1', or a list of them)")
    if traj.layout is None:
        raise ValueError("observable='layer' needs tensor names, and this trajectory has none (a bare array): "
                         "use observable='raw' or 'pca', or give a Trajectory with a layout")
    specs = traj.layout.specs
    chosen: set[int] = set()
    for w in [layer] if isinstance(layer, str) else list(layer):
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
    return Observable("layer", tuple(ranges), tuple(s.name for s in sel), tuple(s.shape for s in sel),
                      sum(s.numel for s in sel), n_components)


def as_trajectory(run, what: str = "run", progress: bool | None = None) -> Trajectory:
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


def observable_factor(trajectory: Trajectory, ranges: Sequence[tuple[int, int]] | None = None, *,
                      progress: bool | None = None, what: str = "run") -> Tensor:
    """``R`` ``(T, T)`` float64 with ``R^T R = Xc Xc^T``, ``Xc`` the time-centred ``(T, n)`` weights in ``ranges``.

    Raises:
        ValueError: NaN/inf in the weights (naming the tensor element and the first bad step), or
            an observable that does not move.
    """
    try:
        return trajectory_factor(trajectory, centre=True, ranges=ranges, progress=progress, what=what,
                                 desc="time factor")
    except NotMoving as e:
        raise ValueError(f"{what}: the observable does not move (zero variance over its {e.n_samples} samples of "
                         f"{e.n_columns:,} weights): choose tensors that train (observable='layer', layer=...), "
                         "another window of the run, or check that the recording was taken while training") from None


def observable_gram(trajectory: Trajectory, ranges: Sequence[tuple[int, int]] | None = None, *,
                    progress: bool | None = None, what: str = "run") -> np.ndarray:
    """``(T, T)`` float64 Gram matrix ``Xc Xc^T`` of the weights in ``ranges``, centred in time
    (``R^T R`` of :func:`observable_factor`, with its errors)."""
    r = observable_factor(trajectory, ranges, progress=progress, what=what)
    return (r.T @ r).numpy()


def coordinates(factor: Tensor, n_components: int | None, what: str) -> tuple[Tensor, float]:
    """Principal coordinates of samples given by a block of a time factor, and the variance share they hold.

    Args:
        factor: ``(m, T')`` float64 whose columns are the samples in an orthonormal basis (columns
            ``s:e`` of a run's ``R`` are its samples ``s..e-1``); centred here over the ``T'`` samples.
        n_components: coordinates to keep (``None``: all those above :data:`COORDINATE_RTOL`).

    Returns:
        ``(Z, explained)``: ``Z`` ``(T', k)`` float64, ``Z = V_k S_k`` of the centred samples' SVD
        (column signs: largest entry positive); ``explained`` the share of the variance in ``Z``.
    """
    a = factor - factor.mean(1, keepdim=True)
    _, s, vh = torch.linalg.svd(a, full_matrices=False)
    if not float(s[0]) > 0:
        raise ValueError(f"{what}: the observable does not move (zero variance): choose tensors that train, "
                         "or another window of the run")
    live = int((s > COORDINATE_RTOL * s[0]).sum())
    k = live if n_components is None else min(n_components, live)
    z = vh[:k].T * s[:k]
    sign = torch.sign(z[z.abs().argmax(0), torch.arange(k)])  # deterministic: largest entry positive
    lam = s.square()
    return z * torch.where(sign == 0, 1.0, sign), float(lam[:k].sum() / lam.sum())


def principal_coordinates(
    trajectory,
    n_components: int | None = DEFAULT_COMPONENTS,
    *,
    layer: str | Sequence[str] | None = None,
    progress: bool | None = None,
) -> tuple[np.ndarray, float]:
    """PCA of a run over time, from its ``T x T`` time factor (no ``N x N`` or ``N x T`` matrix).

    Args:
        trajectory: as :func:`~modeopt.analysis.koopman_spectrum` takes it.
        n_components: coordinates to keep (``None``: all that the samples resolve).
        layer: restrict to these tensors (names or module prefixes).

    Returns:
        ``(Z, explained)``: ``Z`` is ``(T, k)`` float64, row t the coordinates of sample t (centred
        in time) on the leading principal directions, ``Z = U_k S_k`` of the SVD of the centred
        ``(T, N)`` samples (column signs: largest entry positive); ``explained`` is the share of
        the variance the k directions hold.
    """
    traj = as_trajectory(trajectory, progress=progress)
    obs = resolve_observable(traj, "layer" if layer is not None else "raw", layer, n_components)
    factor = observable_factor(traj, obs.ranges, progress=progress)
    with one_thread():
        z, explained = coordinates(factor, n_components, "the run")
    return z.numpy(), explained
