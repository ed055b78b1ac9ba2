"""Embedding one block of a model with a small memory peak (for :class:`~modeopt.BlockwiseCMD`).

:func:`~modeopt.decompose` returns N-sized int64 labels and float32 ``a``, ``b`` and scores for
the whole recording, then the switch derives the mode space from them: about 40 bytes per weight
live at once, which for a transformer layer (1.8 M weights) is as much as the activations of a
fine-tuning step. Here the same algorithm runs with the assignment done one tensor at a time:
each tensor has its own recording, freed as soon as that tensor is assigned; the clustering of
the K sampled weights is shared by the block, each tensor's labels are narrowed
to the compact label dtype and its ``a`` kept in float32 only until the per-mode scales are known,
then cast to ``coef_dtype``. What outlives a tensor's pass is 5 bytes per weight (1 label + 4 of
``a``) and, at the end, 1 + ``coef_dtype`` bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from modeopt.modespace import kernels
from modeopt.decomposition.clustering import cluster_samples
from modeopt.decomposition.algorithm import assign_and_fit, scan_moving
from modeopt.trajectories.layout import ParamLayout
from modeopt.decomposition.sampling import sample_weights
from modeopt.trajectories.snapshots import SnapshotBuffer
from modeopt.modespace.switch import ModeSpaceInit
from modeopt.trajectories.trajectory import Trajectory

__all__ = ["embed_block"]

#: values per chunk of the passes over a tensor's recording (float64 working copies: ~2 MiB each)
CHUNK_VALUES = 1 << 18


@torch.no_grad()
def embed_block(recordings: list[SnapshotBuffer], names: Sequence[str], params: Sequence[Tensor],
                param_group: Sequence[int], n_groups: int, *, n_modes: int, n_samples: int, seed: int,
                mode_scale: str = "rms", coef_dtype: torch.dtype = torch.bfloat16) -> ModeSpaceInit:
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
        coef_dtype: dtype of the returned ``a`` (float32 for int8, which ModeSpace quantises).

    Returns:
        A :class:`~modeopt.modespace.switch.ModeSpaceInit`: per tensor compact labels and ``a`` in
        ``coef_dtype`` on its device, per mode ``r_groups``, ``r``, reference values and scale.

    Raises:
        ValueError: NaN/inf in the recording (naming the tensor), nothing moving, fewer than 3 samples.
    """
    trajs = [_trajectory(rec, name, p.shape) for rec, name, p in zip(recordings, names, params)]
    t = trajs[0].n_samples
    if t < 3:
        raise ValueError(f"the block's recording has {t} snapshots; CMD needs at least 3")
    sizes = [p.numel() for p in params]
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    cpu = torch.device("cpu")
    scans = []
    for name, traj in zip(names, trajs):
        try:
            scans.append(scan_moving(traj, cpu, chunk_rows=max(1024, CHUNK_VALUES // t)))
        except ValueError as e:  # decompose's NaN/inf report: where, and in which snapshot
            raise ValueError(f"the recording of {name!r} holds NaN/inf: the block cannot be embedded ({e}). Lower "
                             "the learning rate or clip gradients, and resume from a checkpoint") from None
    moving = torch.cat(scans)
    if not bool(moving.any()):
        raise ValueError("no weight of the block moved while it was trained: check that its parameters receive "
                         "gradients (and that the learning rate is not 0)")
    samples = sample_weights(moving, sizes, n_samples, np.random.default_rng(seed))
    if n_modes > samples.numel():
        raise ValueError(f"n_modes={n_modes} > the {samples.numel()} weights of the block that move: ask for fewer")
    owner = torch.searchsorted(torch.tensor(offsets[1:]), samples, right=True)  # tensor of each sample
    sample_prof = torch.cat([trajs[i].take(samples[owner == i] - offsets[i], torch.float64)
                             for i in range(len(trajs))])
    clustering = cluster_samples(sample_prof, n_modes=n_modes)
    m = clustering.n_modes
    reference = samples[clustering.reference]
    profiles = sample_prof[clustering.reference]
    ref_owner = owner[clustering.reference].tolist()
    ref_now = torch.tensor([float(params[i].reshape(-1)[int(row) - offsets[i]]) for i, row in zip(ref_owner, reference)],
                           dtype=torch.float64)
    ldt = kernels.label_dtype(m)
    labels, a = [], []
    sq = torch.zeros(m, dtype=torch.float64)
    count = torch.zeros(m, dtype=torch.float64)
    votes = torch.zeros(m, n_groups, dtype=torch.float64)
    width = max(1024, CHUNK_VALUES // (t + m))
    for i, (off, n, g) in enumerate(zip(offsets, sizes, param_group)):
        mine = owner == i
        bounds = [(j, min(j + width, n)) for j in range(0, n, width)]
        mov = moving[off : off + n]
        lab, ai, _, _ = assign_and_fit(trajs[i], profiles, samples[mine] - off, clustering.labels[mine], mov, bounds,
                                       device=cpu)
        trajs[i] = None  # this tensor's recording is no longer needed: free it now
        recordings[0] = None
        del recordings[0]
        for row in reference.tolist():
            if off <= row < off + n:
                ai[row - off] = 1.0  # the references: a = 1 exactly, as decompose sets them
        sq += torch.bincount(lab[mov], weights=ai[mov].to(torch.float64) ** 2, minlength=m)
        per_mode = torch.bincount(lab[mov], minlength=m).to(torch.float64)
        count += per_mode
        votes[:, g] += per_mode
        labels.append(lab.to(ldt))
        a.append(ai)
        del lab
    scale = (sq / count.clamp(min=1)).sqrt() if mode_scale == "rms" else sq.sqrt()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    inv = (1.0 / scale).to(torch.float32)
    out_a = []
    for lab, ai, p in zip(labels, a, params):
        # int8 (the 8-bit encoding): float32 here, quantised per (tensor, mode) by ModeSpace
        dt = torch.float32 if coef_dtype == torch.int8 else coef_dtype
        out_a.append((ai * inv[lab.to(torch.int64)]).to(dt).to(p.device))
    a.clear()
    return ModeSpaceInit(labels=[lab.to(p.device) for lab, p in zip(labels, params)], a=out_a,
                         r_groups=votes.argmax(dim=1), r=(ref_now * scale).to(torch.float32),
                         reference_values=ref_now, scale=scale)


def _trajectory(rec: SnapshotBuffer, name: str, shape: Sequence[int]) -> Trajectory:
    data, steps = rec.raw()
    return Trajectory(data, ParamLayout([name], [tuple(shape)]), steps, rec.anchor)
