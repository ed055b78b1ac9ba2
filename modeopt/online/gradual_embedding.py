"""Gradual embedding's decisions, as functions of plain tensors: which weights' fits have settled,
and which free weight takes over a mode's reference when the tensor holding it is frozen.

Used by :class:`~modeopt.OnlineCMDOptimizer`; the fits ``a``, ``b`` and labels are
:meth:`OnlineCMD.coefficients <modeopt.OnlineCMD.coefficients>`'s (per tensor, flat).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from modeopt.modespace import kernels
from modeopt.utils.transfer import to_device

__all__ = ["relative_change", "plan_hand_offs", "stop_training"]


def relative_change(labels: Tensor, reference_variance: Tensor, a: Tensor, mean: Tensor,
                    prev: tuple[Tensor, Tensor] | None) -> Tensor:
    """How much each weight's fitted trajectory moved since the last check, relative to its own movement:
    ``(|a - a_prev| sd_r + |mean - mean_prev|) / (|a| sd_r)``, with ``sd_r`` its reference's standard
    deviation (from the ``(M,)`` ``reference_variance``). ``a``, ``mean``, ``labels``: one tensor's, flat;
    ``prev``: its ``(a, mean)`` at the last check, or None (then every change is ``inf``)."""
    lab = kernels.as_index(labels)
    sd = to_device(reference_variance, lab.device).sqrt()[lab]
    if prev is None:
        return torch.full_like(a, float("inf"))
    return ((a - prev[0]).abs() * sd + (mean - prev[1]).abs()) / (a.abs() * sd).clamp(min=1e-30)


def plan_hand_offs(ref_index: Sequence[tuple[int, int]], candidates: Sequence[int], leaving: set[int],
                   whole: set[int], partly: Mapping[int, Tensor], labels: Sequence[Tensor],
                   a_all: Sequence[Tensor], b_all: Sequence[Tensor]) -> list[tuple] | None:
    """New reference weights for the modes whose reference (``ref_index``: ``(tensor, element)`` per
    mode) lies in the tensors ``leaving``.

    For each such mode: among the ``candidates`` tensors that stay free (not ``leaving``, not
    ``whole``-ly frozen; the weights ``partly[u]`` marks are frozen too), the weight of the mode with
    the largest ``|a|`` (its profile carries r with the least relative noise). Returns one
    ``(mode, tensor, index, a, b)`` per mode (the arguments of :meth:`OnlineCMD.hand_off
    <modeopt.OnlineCMD.hand_off>`), or None if a mode has no such weight left (or only ones with
    ``|a| < 1e-3``).
    """
    plan = []
    for m, (t_ref, _) in enumerate(ref_index):
        if t_ref not in leaving:
            continue
        best = (0.0, None)
        for u in candidates:
            if u in leaving or u in whole:
                continue
            score = a_all[u].abs() * (kernels.as_index(labels[u]) == m)
            if u in partly:
                score = score.masked_fill(partly[u], 0.0)
            i = int(score.argmax())
            if float(score[i]) > best[0]:
                best = (float(score[i]), (m, u, i, float(a_all[u][i]), float(b_all[u][i])))
        # |a| relative to the old reference's own slope (1): a ~ 0 would amplify noise without bound
        if best[1] is None or best[0] < 1e-3:
            return None
        plan.append(best[1])
    return plan


def stop_training(p: Tensor, optimizer: torch.optim.Optimizer) -> None:
    """``p`` leaves training: no gradient (``requires_grad=False``, ``grad`` dropped), and no place in
    ``optimizer``'s param groups nor state."""
    p.requires_grad_(False)
    p.grad = None
    for group in optimizer.param_groups:
        group["params"][:] = [q for q in group["params"] if q is not p]
    optimizer.state.pop(p, None)
