"""The checks of :class:`~modeopt.CMDOptimizer`'s constructor arguments, and their defaults resolved.

Each check raises ``ValueError`` saying what was wrong and what to do, before the optimizer exists.
"""

from __future__ import annotations

import torch

from modeopt.utils.checks import check_int

__all__ = ["SCALE_INVARIANT", "check_coef_dtype", "check_dtypes", "check_settings", "check_snapshot_count", "resolve_mode_scale"]

def check_snapshot_count(name: str, steps: int, every: int) -> None:
    """Raise ``ValueError`` unless ``steps`` full-training steps record at least 3 snapshots (CMD's minimum)."""
    if steps // every < 3:
        raise ValueError(
            f"{name}={steps} with snapshot_every={every} records {steps // every} snapshot(s); CMD needs at "
            f"least 3: make {name} >= {3 * every} or snapshot_every <= {max(1, steps // 3)}")


#: Optimizers whose step size does not scale with the gradient's magnitude.
SCALE_INVARIANT = tuple(
    getattr(torch.optim, n)
    for n in ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta", "Rprop", "SparseAdam")
    if hasattr(torch.optim, n)
)


def check_settings(*, n_modes: int, warmup_steps: int, snapshot_every: int, n_samples: int,
                   max_snapshots: int | None, recluster_every: int | None, recluster_steps: int | None,
                   init: str, mode_scale: str, coef_dtype: torch.dtype, record_dtype: torch.dtype) -> int | None:
    """Check the constructor's settings (see ``CMDOptimizer``); return ``recluster_steps`` with its
    default filled in (``max(recluster_every // 4, 3 * snapshot_every)``; None without re-clustering)."""
    check_int("n_modes", n_modes, 1)
    check_int("warmup_steps", warmup_steps, 1)
    check_int("snapshot_every", snapshot_every, 1)
    check_int("n_samples", n_samples, 1)
    if n_modes > n_samples:
        raise ValueError(f"n_modes={n_modes} > n_samples={n_samples}: ask for fewer modes or sample more "
                         f"weights (n_samples >= 30 * n_modes is a good rule)")
    check_snapshot_count("warmup_steps", warmup_steps, snapshot_every)
    if max_snapshots is not None:
        check_int("max_snapshots", max_snapshots, 3)
    if recluster_every is not None:
        check_int("recluster_every", recluster_every, 1)
        if recluster_steps is None:
            recluster_steps = max(recluster_every // 4, 3 * snapshot_every)
        check_int("recluster_steps", recluster_steps, 1)
        check_snapshot_count("recluster_steps", recluster_steps, snapshot_every)
    elif recluster_steps is not None:
        raise ValueError("recluster_steps needs recluster_every (how many embedded steps per cycle)")
    if init not in ("keep", "fit"):
        raise ValueError(f"init must be 'keep' or 'fit', got {init!r}")
    if mode_scale not in ("auto", "rms", "norm"):
        raise ValueError(f"mode_scale must be 'auto', 'rms' or 'norm', got {mode_scale!r}")
    check_dtypes(coef_dtype, record_dtype)
    return recluster_steps


def check_dtypes(coef_dtype: torch.dtype, record_dtype: torch.dtype) -> None:
    """``coef_dtype`` (storage of ``a``, see :func:`check_coef_dtype`); ``record_dtype`` (snapshots) a float dtype.

    An integer recording would store nothing of the movements.
    """
    check_coef_dtype(coef_dtype)
    if not (isinstance(record_dtype, torch.dtype) and record_dtype.is_floating_point):
        raise ValueError(f"record_dtype must be a floating-point torch.dtype, got {record_dtype!r} (e.g. "
                         "torch.float32, torch.bfloat16)")


def check_coef_dtype(coef_dtype: object) -> None:
    """``coef_dtype`` must be float32, bfloat16 or int8 (the 8-bit encoding of ``a`` with 4-bit labels
    for M <= 16; :mod:`modeopt.modespace.kernels.encoding`)."""
    if coef_dtype not in (torch.float32, torch.bfloat16, torch.int8):
        raise ValueError(f"coef_dtype must be torch.float32, torch.bfloat16 or torch.int8 (8-bit coefficients with "
                         f"a scale per tensor and mode, 4-bit labels for n_modes <= 16), got {coef_dtype!r}")


def resolve_mode_scale(mode_scale: str, base: torch.optim.Optimizer) -> str:
    """``"auto"``: ``"rms"`` for scale-invariant base optimizers (Adam & co.), else ``"norm"``."""
    if mode_scale == "auto":
        return "rms" if isinstance(base, SCALE_INVARIANT) else "norm"
    return mode_scale
