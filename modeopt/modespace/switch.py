"""From a decomposition of the warm-up to the initial state of mode space (the switch's arithmetic).

:func:`initial_mode_space` turns a :class:`~modeopt.decomposition.algorithm.Decomposition` of the embedded
weights into what :class:`~modeopt.modespace.space.ModeSpace` is built from: per tensor the mode labels
and the normalised coefficients ``a``, and per mode its scalar ``r`` and its param group. The
weights are then ``w_i = a_i * r[m(i)] + b_i`` with ``b`` absorbing the rest (``init="keep"``), or
moved to the CMD fit by :func:`move_to_fit` (``init="fit"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from modeopt.decomposition.algorithm import Decomposition
from modeopt.trajectories.layout import ParamLayout

__all__ = ["ModeSpaceInit", "initial_mode_space", "move_to_fit", "switch_device", "world_size"]


def world_size() -> int:
    """Processes in the default ``torch.distributed`` group (1 when it is not initialised)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def switch_device(params: Sequence[Tensor]) -> torch.device:
    """Where the switch decomposes: the weights' CUDA device (the first one when they are spread
    over several; the results then move per tensor), else the CPU."""
    cuda = sorted({p.device for p in params if p.device.type == "cuda"}, key=lambda d: d.index or 0)
    return cuda[0] if cuda else torch.device("cpu")


@dataclass
class ModeSpaceInit:
    """The initial mode space computed at a switch.

    Attributes:
        labels: per embedded tensor, ``(numel,)`` int64 mode of each element, on that tensor's device.
        a: per embedded tensor, ``(numel,)`` float32 normalised coefficients, on that tensor's device.
        r_groups: ``(M,)`` int64 on the CPU, the param group of each mode's scalar.
        r: ``(M,)`` float32 on the CPU, the initial mode scalars (reference values times ``scale``).
        reference_values: ``(M,)`` float64 on the CPU, each mode's reference weight now.
        scale: ``(M,)`` float64 on the CPU, what each mode's ``a`` was divided by.
    """

    labels: list[Tensor]
    a: list[Tensor]
    r_groups: Tensor
    r: Tensor
    reference_values: Tensor
    scale: Tensor


def initial_mode_space(d: Decomposition, layout: ParamLayout, params: Sequence[Tensor], param_group: Sequence[int],
                       n_groups: int, mode_scale: str) -> ModeSpaceInit:
    """Normalise each mode of ``d`` and place its scalar in a param group.

    Args:
        d: the decomposition of the recorded weights (rows in ``layout`` order).
        layout: the embedded tensors, in the order of ``params``.
        params: the embedded tensors now (their values give ``r``).
        param_group: per embedded tensor, the index of its param group.
        n_groups: how many param groups the base optimizer has.
        mode_scale: ``"rms"`` (RMS(a) = 1 over each mode's moving weights) or ``"norm"`` (unit-norm
            ``a`` per mode). Weights that did not move have ``a = 0`` and add nothing to the scale.

    Each mode's scalar joins the param group that holds most of its moving weights.
    """
    m = d.n_modes
    by_name = dict(zip(layout.names, params))
    r = torch.tensor([float(by_name[name][idx]) for name, idx in map(layout.locate, d.reference.tolist())],
                     dtype=torch.float64)  # the references' values now
    sq = torch.bincount(d.labels, weights=d.a.to(torch.float64) ** 2, minlength=m)
    count = torch.bincount(d.labels[~d.constant], minlength=m).clamp(min=1).to(torch.float64)
    scale = (sq / count).sqrt() if mode_scale == "rms" else sq.sqrt()  # > 0: a_ref = 1
    a_scaled = d.a / scale.to(torch.float32)[d.labels]
    scale = scale.cpu()  # (M,): on the host with r and r_groups; labels and a stay on d's device
    if len(set(param_group)) == 1:
        r_groups = torch.full((m,), param_group[0], dtype=torch.int64)
    else:
        row_group = torch.tensor(list(param_group), dtype=torch.int64).repeat_interleave(
            torch.tensor(layout.numels, dtype=torch.int64)).to(d.labels.device)
        moving = ~d.constant
        votes = torch.bincount(d.labels[moving] * n_groups + row_group[moving], minlength=m * n_groups)
        r_groups = votes.view(m, n_groups).argmax(dim=1).cpu()
    return ModeSpaceInit(  # each tensor's labels and a on that tensor's device (no-op on one device)
        labels=[d.labels[s.offset : s.stop].to(p.device) for s, p in zip(layout.specs, params)],
        a=[a_scaled[s.offset : s.stop].to(p.device) for s, p in zip(layout.specs, params)],
        r_groups=r_groups,
        r=(r * scale).to(torch.float32),
        reference_values=r,
        scale=scale,
    )


@torch.no_grad()
def move_to_fit(d: Decomposition, layout: ParamLayout, params: Sequence[Tensor], reference_values: Tensor) -> None:
    """Set every embedded weight to its CMD fit ``a_i * w_ref(now) + b_i`` (``init="fit"``), in place."""
    ref_now = reference_values.to(device=d.a.device, dtype=torch.float32)
    for spec, p in zip(layout.specs, params):
        sl = slice(spec.offset, spec.stop)
        p.copy_(torch.addcmul(d.b[sl], d.a[sl], ref_now[d.labels[sl]]).view_as(p))
