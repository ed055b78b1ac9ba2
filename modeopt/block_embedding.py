"""Embedding one block of a model with a small memory peak (for :class:`~modeopt.BlockwiseCMD`).

:func:`~modeopt.decompose` returns N-sized int64 labels and float32 ``a``, ``b`` and scores for
the whole recording, then the switch derives the mode space from them: about 40 bytes per weight
live at once, which for a transformer layer (1.8 M weights) is as much as the activations of a
fine-tuning step. Here the same algorithm runs with the assignment done one tensor at a time:
the clustering of the K sampled weights is shared by the block, each tensor's labels are narrowed
to the compact label dtype and its ``a`` kept in float32 only until the per-mode scales are known,
then cast to ``coef_dtype``. What outlives a tensor's pass is 5 bytes per weight (1 label + 4 of
``a``) and, at the end, 1 + ``coef_dtype`` bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from . import kernels
from .clustering import cluster_samples
from .decomposition import assign_and_fit
from .sampling import sample_weights
from .switch import ModeSpaceInit
from .trajectory import Trajectory

__all__ = ["embed_block"]

#: values per chunk of the passes over a tensor's recording (float64 working copies: ~2 MiB each)
CHUNK_VALUES = 1 << 18


@torch.no_grad()
def embed_block(trajectory: Trajectory, params: Sequence[Tensor], param_group: Sequence[int], n_groups: int, *,
                n_modes: int, n_samples: int, seed: int, mode_scale: str = "rms",
                coef_dtype: torch.dtype = torch.bfloat16) -> ModeSpaceInit:
    """CMD of one block's recording, straight to the initial mode space.

    Args:
        trajectory: ``(T, N)`` recording of the block with its layout (rows in ``params`` order).
        params: the block's tensors now (their references' values give ``r``).
        param_group: per tensor, its param group; ``n_groups``: how many the optimizer has.
        n_modes, n_samples, seed: M, K and the sampling seed, as for :func:`~modeopt.decompose`.
        mode_scale: ``"rms"`` or ``"norm"`` normalisation of each mode's ``a`` (see ``CMDOptimizer``).
        coef_dtype: dtype of the returned ``a``.

    Returns:
        A :class:`~modeopt.switch.ModeSpaceInit`: per tensor compact labels and ``a`` in
        ``coef_dtype`` on its device, per mode ``r_groups``, ``r``, reference values and scale.

    Raises:
        ValueError: NaN/inf in the recording (naming the tensor), nothing moving, fewer than 3 samples.
    """
    layout, t = trajectory.layout, trajectory.n_samples
    if t < 3:
        raise ValueError(f"the block's recording has {t} snapshots; CMD needs at least 3")
    specs = layout.specs
    eps = torch.finfo(trajectory.value_dtype).eps
    moving = torch.empty(layout.n, dtype=torch.bool)
    width = max(1024, CHUNK_VALUES // t)
    for s in specs:
        for i0 in range(s.offset, s.stop, width):
            i1 = min(i0 + width, s.stop)
            x = trajectory.cols(i0, i1)
            hi, lo = x.amax(dim=0), x.amin(dim=0)
            if not bool(torch.isfinite(hi).all() and torch.isfinite(lo).all()):
                raise ValueError(f"the recording of {s.name!r} holds NaN/inf: the block cannot be embedded. Lower "
                                 "the learning rate or clip gradients, and resume from a checkpoint")
            moving[i0:i1] = (hi - lo) > 4 * eps * torch.maximum(hi.abs(), lo.abs())
    if not bool(moving.any()):
        raise ValueError("no weight of the block moved while it was trained: check that its parameters receive "
                         "gradients (and that the learning rate is not 0)")
    samples = sample_weights(moving, layout.numels, n_samples, np.random.default_rng(seed))
    if n_modes > samples.numel():
        raise ValueError(f"n_modes={n_modes} > the {samples.numel()} weights of the block that move: ask for fewer")
    sample_prof = trajectory.take(samples, torch.float64)
    clustering = cluster_samples(sample_prof, n_modes=n_modes)
    m = clustering.n_modes
    reference = samples[clustering.reference]
    profiles = sample_prof[clustering.reference]
    ldt = kernels.label_dtype(m)
    labels, a = [], []
    sq = torch.zeros(m, dtype=torch.float64)
    count = torch.zeros(m, dtype=torch.float64)
    votes = torch.zeros(m, n_groups, dtype=torch.float64)
    width = max(1024, CHUNK_VALUES // (t + m))
    for s, p, g in zip(specs, params, param_group):
        sub = Trajectory(trajectory.data[:, s.offset : s.stop], None, trajectory.steps,
                         None if trajectory.offset is None else trajectory.offset[s.offset : s.stop])
        lo, hi = (int(v) for v in torch.searchsorted(samples, torch.tensor([s.offset, s.stop])))
        bounds = [(i, min(i + width, s.numel)) for i in range(0, s.numel, width)]
        lab, ai, _, _ = assign_and_fit(sub, profiles, samples[lo:hi] - s.offset, clustering.labels[lo:hi],
                                       moving[s.offset : s.stop], bounds, device=torch.device("cpu"))
        mov = moving[s.offset : s.stop]
        sq += torch.bincount(lab[mov], weights=ai[mov].to(torch.float64) ** 2, minlength=m)
        per_mode = torch.bincount(lab[mov], minlength=m).to(torch.float64)
        count += per_mode
        votes[:, g] += per_mode
        labels.append(lab.to(ldt))
        a.append(ai)
        del lab
    # references: a = 1 exactly, as decompose sets them
    for j, row in enumerate(reference.tolist()):
        name, _ = layout.locate(row)
        i = layout.names.index(name)
        a[i][row - specs[i].offset] = 1.0
    ref_now = torch.tensor([float(params[layout.names.index(n)].reshape(-1)[row - layout[n].offset])
                            for n, row in ((layout.locate(r)[0], r) for r in reference.tolist())], dtype=torch.float64)
    scale = (sq / count.clamp(min=1)).sqrt() if mode_scale == "rms" else sq.sqrt()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    inv = (1.0 / scale).to(torch.float32)
    out_a = []
    for lab, ai, p in zip(labels, a, params):
        out_a.append((ai * inv[lab.to(torch.int64)]).to(coef_dtype).to(p.device))
    a.clear()
    return ModeSpaceInit(labels=[lab.to(p.device) for lab, p in zip(labels, params)], a=out_a,
                         r_groups=votes.argmax(dim=1), r=(ref_now * scale).to(torch.float32),
                         reference_values=ref_now, scale=scale)
