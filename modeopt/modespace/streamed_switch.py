"""The switch to mode space straight from a recording, one tensor at a time, keeping only what mode
space keeps.

:func:`~modeopt.decompose` followed by :func:`~modeopt.modespace.switch.initial_mode_space` holds
N-sized int64 labels and float32 ``a``, ``b``, scores and masks at once (about 21 bytes per weight,
then 12 more while the space is built): at the scale people fine-tune at that is several times the
training state the switch replaces. :func:`stream_mode_space` runs the same algorithm (the same
scan, sampling, clustering, assignment and fit, modes numbered by size as ``decompose`` numbers
them) and writes each chunk's result straight into the final storage of its tensor:

* labels in the compact label dtype (1 byte for ``M <= 256``), renumbered in place at the end;
* ``a`` in float32, divided in place by its mode's scale once every tensor is assigned (bfloat16:
  then rounded once, one tensor at a time); with ``coef_dtype=torch.int8`` each tensor's ``a`` is quantised
  as soon as its last chunk is in (its float32 copy lives only that long) and the per-mode scale
  is folded into the codes' scales afterwards (``q * (s / scale) = (q * s) / scale``: the weights'
  direction, not the codes, carries the normalisation);
* the "moving" masks (1 byte per weight) are freed tensor by tensor as the pass goes.

So a switch peaks at the compact result plus one tensor's float32 coefficients and a few
chunk-sized float64 buffers: 1 + 4 bytes per weight with float32 or bfloat16 ``a``, about 2.5 with
int8 codes (while the labels are packed), against ~33 before. Results equal the two-step path's up to the
rounding of a float64 sum taken per tensor instead of over everything (the mode scales), and the int8
codes by one in the rare case a code sits on a rounding tie.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from modeopt.decomposition.algorithm import NOTHING_MOVED, assign_chunks, mode_order, scan_moving
from modeopt.decomposition.clustering import cluster_samples
from modeopt.decomposition.sampling import sample_weights
from modeopt.modespace import kernels
from modeopt.modespace.switch import ModeSpaceInit
from modeopt.trajectories.trajectory import Trajectory
from modeopt.utils.chunking import ASSIGN_CHUNK_ELEMENTS, CHUNK_ELEMENTS, DEVICE_CHUNK_ELEMENTS

__all__ = ["StreamedInit", "stream_mode_space"]


@dataclass
class StreamedInit(ModeSpaceInit):
    """:class:`~modeopt.modespace.switch.ModeSpaceInit` as :func:`stream_mode_space` builds it.

    Attributes (beyond the base class's; ``labels`` are compact, ``a`` is in ``coef_dtype``):
        a_scale: with ``coef_dtype=torch.int8``, per tensor the ``(M,)`` float32 scales of the int8 codes
            in ``a`` (``ModeSpace(..., a_scale=...)``); None otherwise.
        fit: with ``fit=True``, per tensor the CMD fit ``a_i * w_ref(now) + b_i`` in the tensor's dtype and
            shape (what ``init="fit"`` writes into the weights); None otherwise.
        sizes: ``(M,)`` moving weights per mode (the modes are numbered by decreasing size).
        label_counts: ``(M,)`` weights per mode, those that did not move included (they carry mode 0).
        n_constant: how many weights did not move (``a = 0``).
        reference: ``(M,)`` int64, each mode's reference weight as a row of the concatenated tensors.
    """

    a_scale: list[Tensor] | None = None
    fit: list[Tensor] | None = None
    sizes: list[int] = field(default_factory=list)
    label_counts: list[int] = field(default_factory=list)
    n_constant: int = 0
    reference: Tensor | None = None


@torch.no_grad()
def stream_mode_space(
    trajectories: list[Trajectory | None],
    params: Sequence[Tensor],
    param_group: Sequence[int],
    n_groups: int,
    *,
    n_modes: int,
    n_samples: int,
    seed: int,
    mode_scale: str,
    coef_dtype: torch.dtype,
    fit: bool = False,
    device: torch.device | None = None,
    progress: bool | None = None,
    before_assign: Callable[[], None] | None = None,
    consumed: Callable[[int], None] | None = None,
) -> StreamedInit:
    """CMD of a recording, straight to the initial mode space, tensor by tensor.

    Args:
        trajectories: per embedded tensor, its recording ``(T, numel)`` (the same T samples in each;
            a view of one shared recording is fine). Entry ``i`` is set to None once tensor ``i`` is
            assigned, and ``consumed(i)`` called, so the caller can free its memory.
        params: the tensors now (the references' current values give ``r``; outputs go to their devices).
        param_group: per tensor, its param group; ``n_groups``: how many the optimizer has.
        n_modes, n_samples, seed: M, K and the sampling seed, as for :func:`~modeopt.decompose`.
        mode_scale: ``"rms"`` (RMS of ``a`` = 1 over each mode's moving weights) or ``"norm"``.
        coef_dtype: float32, bfloat16 or int8 (codes with ``a_scale``).
        fit: also return the CMD fit of every weight now (``init="fit"``).
        device: where the passes run (default: the CPU); results go to each tensor's device.
        before_assign: called once the clustering has succeeded, before the full assignment pass
            (every check that can fail has passed: the caller may now free what the result replaces).

    Raises:
        ValueError: fewer than 3 samples, NaN/inf (naming the tensor and sample), nothing moving,
            ``n_modes`` above the number of moving weights.
    """
    dev = torch.device("cpu") if device is None else torch.device(device)
    t = trajectories[0].n_samples
    if t < 3:
        raise ValueError(f"the recording has T={t} snapshots; CMD needs at least 3: record more snapshots")
    sizes = [p.numel() for p in params]
    offsets = np.cumsum([0] + sizes).tolist()
    budget = CHUNK_ELEMENTS if dev.type == "cpu" else DEVICE_CHUNK_ELEMENTS
    moving = [scan_moving(traj, dev, chunk_rows=max(1024, budget // t), progress=False) for traj in trajectories]
    if not any(bool(mv.any()) for mv in moving):
        raise ValueError(NOTHING_MOVED)
    samples = sample_weights([mv.cpu() for mv in moving] if dev.type != "cpu" else moving, None, n_samples,
                             np.random.default_rng(seed))
    k = samples.numel()
    if n_modes > k:
        raise ValueError(f"n_modes={n_modes} > the {k} weights that move and could be sampled: ask for at most "
                         f"{k} modes")
    owner = torch.searchsorted(torch.tensor(offsets[1:]), samples, right=True)  # tensor of each sample
    sample_prof = torch.cat([trajectories[i].take(samples[owner == i] - offsets[i], torch.float64)
                             for i in range(len(params))])
    clustering = cluster_samples(sample_prof, n_modes=n_modes)
    m = clustering.n_modes
    reference = samples[clustering.reference]
    profiles = sample_prof[clustering.reference]
    ref_owner = owner[clustering.reference].tolist()
    ref_now = torch.tensor([float(params[i].reshape(-1)[int(row) - offsets[i]]) for i, row in zip(ref_owner, reference)],
                           dtype=torch.float64)
    if before_assign is not None:
        before_assign()

    ldt = kernels.label_dtype(m)
    int8 = coef_dtype == torch.int8
    labels: list[Tensor] = []
    a: list[Tensor] = []  # float32 (int8: the codes)
    raw_scale: list[Tensor] = []  # int8: per tensor, max |a| / 127 per mode (clustering numbering)
    fits: list[Tensor] = []
    sq = torch.zeros(m, dtype=torch.float64, device=dev)
    all_count = torch.zeros(m, dtype=torch.float64, device=dev)
    votes = torch.zeros(m, n_groups, dtype=torch.float64, device=dev)  # moving weights per (mode, group)
    ref_now_dev = ref_now.to(device=dev, dtype=torch.float32)
    width = max(1024, (ASSIGN_CHUNK_ELEMENTS if dev.type == "cpu" else budget) // (t + m))
    for i, (off, n, g, p) in enumerate(zip(offsets, sizes, param_group, params)):
        mine = owner == i
        lab_i = torch.empty(n, dtype=ldt, device=p.device)
        # float32 (int8: for this tensor only, quantised when it is done; bf16: rounded once, after the scale)
        a_i = torch.empty(n, dtype=torch.float32, device=p.device)
        fit_i = torch.empty(n, dtype=p.dtype, device=p.device) if fit else None
        bounds = [(j, min(j + width, n)) for j in range(0, n, width)]
        refs_here = [(j, int(row) - off) for j, row in enumerate(reference.tolist()) if off <= row < off + n]
        for i0, i1, lab, ai, bi, _ in assign_chunks(trajectories[i], profiles, samples[mine] - off,
                                                    clustering.labels[mine], moving[i], bounds, device=dev,
                                                    progress=progress):
            for _, row in refs_here:  # the references: a = 1, b = 0 exactly, as decompose sets them
                if i0 <= row < i1:
                    ai[row - i0], bi[row - i0] = 1.0, 0.0
            mov = moving[i][i0:i1]
            sq += torch.bincount(lab, weights=ai.to(torch.float64) ** 2, minlength=m)
            # moving and still weights per mode in one count (no boolean indexing): [moving | still]
            both = torch.bincount(torch.where(mov, lab, lab + m), minlength=2 * m).to(torch.float64)
            votes[:, g] += both[:m]
            all_count += both[:m] + both[m:]
            lab_i[i0:i1] = lab.to(ldt)
            a_i[i0:i1] = ai
            if fit_i is not None:
                fit_i[i0:i1] = torch.addcmul(bi, ai, ref_now_dev[lab])
        trajectories[i] = None  # this tensor's recording and mask are no longer needed
        moving[i] = None
        if consumed is not None:
            consumed(i)
        if int8:
            q, s = kernels.quantize(a_i, lab_i, m)
            del a_i
            a.append(q)
            raw_scale.append(s)
        else:
            a.append(a_i)
        labels.append(lab_i)
        if fit_i is not None:
            fits.append(fit_i.view_as(p))

    # Modes numbered by decreasing size (decompose's numbering); every per-mode array follows.
    count = votes.sum(dim=1)  # moving weights per mode
    order = mode_order(count.cpu(), reference)
    relabel = torch.empty(m, dtype=torch.int64)
    relabel[order] = torch.arange(m)
    sq, count, all_count, votes = (x.cpu()[order] for x in (sq, count, all_count, votes))
    reference, ref_now = reference[order], ref_now[order]
    scale = (sq / count.clamp(min=1)).sqrt() if mode_scale == "rms" else sq.sqrt()  # > 0: a_ref = 1
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale32 = scale.to(torch.float32)
    for i, p in enumerate(params):
        labels[i] = _relabel_chunked(labels[i], relabel.to(p.device), width)
        if int8:
            raw_scale[i] = (raw_scale[i].cpu()[order] / scale32).to(p.device)
        else:
            _divide_chunked(a[i], labels[i], scale32.to(p.device), width)
            if coef_dtype != torch.float32:
                a[i] = a[i].to(coef_dtype)  # one tensor's float32 copy at a time
    r_groups = torch.full((m,), param_group[0], dtype=torch.int64) if len(set(param_group)) == 1 \
        else votes.argmax(dim=1)
    return StreamedInit(
        labels=labels, a=a, r_groups=r_groups, r=(ref_now * scale).to(torch.float32), reference_values=ref_now,
        scale=scale, a_scale=raw_scale if int8 else None, fit=fits if fit else None,
        sizes=[int(c) for c in count.tolist()], label_counts=[int(c) for c in all_count.tolist()],
        n_constant=sum(sizes) - int(count.sum()), reference=reference)


def _relabel_chunked(labels: Tensor, relabel: Tensor, width: int) -> Tensor:
    """``relabel[labels]`` in place, chunk by chunk (compact labels stay compact)."""
    for i0 in range(0, labels.numel(), width):
        part = labels[i0 : i0 + width]
        part.copy_(relabel[kernels.as_index(part).to(torch.int64)])
    return labels


def _divide_chunked(a: Tensor, labels: Tensor, scale: Tensor, width: int) -> None:
    """``a /= scale[labels]`` in place, chunk by chunk."""
    for i0 in range(0, a.numel(), width):
        a[i0 : i0 + width] /= scale[kernels.as_index(labels[i0 : i0 + width]).to(torch.int64)]
