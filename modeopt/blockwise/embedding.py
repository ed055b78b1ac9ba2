"""Embedding one block of a model with a small memory peak (for :class:`~modeopt.BlockwiseCMD`).

Each tensor of the block has its own recording; :func:`embed_block` hands them to
:func:`~modeopt.modespace.streamed_switch.stream_mode_space`, which assigns one tensor at a time,
writes compact labels and ``a`` straight into their final storage (int8 codes quantised as each
tensor is done) and frees each tensor's recording as soon as it is assigned. What outlives the
switch is 1 + ``coef_dtype`` bytes per weight (1.5 with int8 codes and 4-bit labels).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from modeopt.modespace.streamed_switch import StreamedInit, stream_mode_space
from modeopt.trajectories.layout import ParamLayout
from modeopt.trajectories.snapshots import SnapshotBuffer

__all__ = ["embed_block"]


@torch.no_grad()
def embed_block(recordings: list[SnapshotBuffer], names: Sequence[str], params: Sequence[Tensor],
                param_group: Sequence[int], n_groups: int, *, n_modes: int, n_samples: int, seed: int,
                mode_scale: str = "rms", coef_dtype: torch.dtype = torch.bfloat16,
                before_assign: Callable[[], None] | None = None) -> StreamedInit:
    """CMD of one block's recording, straight to the initial mode space.

    Args:
        recordings: per tensor of the block, its snapshots (``numel`` values each; the same
            snapshots in every one). **Consumed**: each is removed from the list once its tensor is
            assigned, so that its memory is freed while the later tensors are processed (keep no
            other reference to them).
        names, params: the block's tensors' names and the tensors now (their references' values give ``r``).
        param_group: per tensor, its param group; ``n_groups``: how many the optimizer has.
        n_modes, n_samples, seed: M, K and the sampling seed, as for :func:`~modeopt.decompose`.
        mode_scale: ``"rms"`` or ``"norm"`` normalisation of each mode's ``a`` (see ``CMDOptimizer``).
        coef_dtype: float32, bfloat16, or int8 (``a`` then holds the codes and ``a_scale`` their scales).
        before_assign: called once the clustering has succeeded, before the full pass (the block's optimizer
            state may be freed then: nothing that can fail for the data's sake comes after).

    Returns:
        A :class:`~modeopt.modespace.streamed_switch.StreamedInit`: per tensor compact labels and ``a``
        on its device, per mode ``r_groups``, ``r``, reference values, scale and sizes.

    Raises:
        ValueError: NaN/inf in the recording (naming the tensor), nothing moving, fewer than 3 samples.
    """
    trajs = [rec.per_tensor(ParamLayout([name], [tuple(p.shape)]))[0]
             for rec, name, p in zip(recordings, names, params)]

    def consumed(i: int) -> None:
        recordings[0] = None  # tensor i's recording (the list shrinks as tensors are done)
        del recordings[0]

    try:
        return stream_mode_space(trajs, params, param_group, n_groups, n_modes=n_modes, n_samples=n_samples,
                                 seed=seed, mode_scale=mode_scale, coef_dtype=coef_dtype, consumed=consumed,
                                 before_assign=before_assign)
    except ValueError as e:
        raise ValueError(f"the block cannot be embedded: {e}. Lower the learning rate or clip gradients if the "
                         "recording diverged, and resume from a checkpoint") from None

