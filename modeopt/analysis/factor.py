"""What the DMD-based analyses share: a trajectory's ``T x T`` time factor, and the spacing check.

:func:`trajectory_factor` is :func:`modeopt.trajectories.time_reduction.time_factor` on a trajectory's values,
with a progress bar, and NaN/inf reported by step and tensor element rather than by row and column.
:func:`warn_uneven_steps` warns that DMD takes the samples as evenly spaced.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from torch import Tensor
from tqdm.auto import tqdm

from modeopt.utils import progress as _progress
from modeopt.trajectories.time_reduction import NonFiniteValues, time_factor
from modeopt.trajectories.trajectory import Trajectory

__all__ = ["trajectory_factor", "warn_uneven_steps"]


def _nonfinite_error(err: NonFiniteValues, trajectory: Trajectory, what: str) -> ValueError:
    """The error for NaN/inf found at ``err.sample``/``err.column``: the step and the tensor element."""
    t0, col = err.sample, err.column
    where = f"column {col}"
    if trajectory.layout is not None:
        name, idx = trajectory.layout.locate(col)
        where = f"{name}[{', '.join(map(str, idx))}]" if idx else name
    step = trajectory.steps[t0]
    return ValueError(f"{what}: the weights hold NaN/inf from step {step} on (sample {t0}; first at {where}): the "
                      f"run diverged there. Analyse the samples before it (stop={step}, or "
                      f"trajectory.window(0, {t0})), or fix the training")


def trajectory_factor(
    trajectory: Trajectory,
    *,
    centre: bool,
    ranges: Sequence[tuple[int, int]] | None = None,
    progress: bool | None = None,
    what: str = "the run",
    desc: str = "time factor",
) -> Tensor:
    """``R`` ``(T, T)`` float64 with ``R^T R = A^T A``, ``A`` the ``(N, T)`` values (time-centred if ``centre``).

    Args:
        ranges: the columns (weights) to use, as ``(start, stop)`` ranges; default all.
        progress: progress bar over the chunks (``None``: only on a terminal, for many chunks).
        what: names the trajectory in error messages; ``desc`` labels the bar.

    Raises:
        ValueError: NaN/inf in the values (naming the step and tensor element), and
            :class:`~modeopt.trajectories.time_reduction.NotMoving` for centred values that do not move.
    """

    def bar(chunks):
        return tqdm(chunks, desc=desc, disable=_progress.disable(progress, len(chunks), 4), leave=False)

    try:
        return time_factor(trajectory.data, trajectory.offset, centre=centre, ranges=ranges, bar=bar)
    except NonFiniteValues as e:
        raise _nonfinite_error(e, trajectory, what) from None


def warn_uneven_steps(steps: Sequence[int], stacklevel: int = 3) -> None:
    """Warn when the samples' steps are not evenly spaced (DMD eigenvalues are then per sample, not per step)."""
    gaps = {b - a for a, b in zip(steps, steps[1:])}
    if len(gaps) > 1:
        warnings.warn(f"DMD assumes evenly spaced samples; these steps have gaps {sorted(gaps)[:5]}: the "
                      "eigenvalues are per sample, not per step", stacklevel=stacklevel + 1)
