"""Correlation Mode Decomposition of a weight trajectory (CMD paper, Algorithms 1 and 2).

``decompose(W)`` samples K weights, clusters them by ``|corr|``, picks one reference weight
per mode, assigns every other weight to its most correlated reference and fits
``w_i(t) ~= a_i * w_ref(t) + b_i`` by least squares. The full pass over the N weights is
chunked: it costs O(N * M * T) time and never more than a few chunk-sized float64 buffers
beside the input and the ``(N,)`` outputs.

With ``device="cuda"`` (or weights already on a GPU) the two full passes run on that device:
chunks of a host-resident trajectory are streamed up through
:func:`~modeopt.trajectories.streaming.stream_cols` (pinned memory, ``non_blocking`` copies on a side stream,
double buffered), and the ``(N,)`` results are returned there. Sampling and clustering the K weights stay on the CPU (scipy).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from modeopt.utils import progress as _progress
from modeopt.utils.checks import check_int
from modeopt.utils.chunking import ASSIGN_CHUNK_ELEMENTS, CHUNK_ELEMENTS, DEVICE_CHUNK_ELEMENTS
from .clustering import cluster_samples
from modeopt.trajectories.layout import ParamLayout
from .sampling import sample_weights
from modeopt.trajectories.streaming import resolve_device, stream_cols
from modeopt.trajectories.trajectory import ModelsTrajectory, Trajectory, as_tensor

__all__ = ["decompose", "Decomposition", "scan_moving", "mode_order", "assign_and_fit", "assign_chunks", "NOTHING_MOVED"]


@dataclass
class Decomposition(ModelsTrajectory):
    """A CMD model of a trajectory: ``w_i(t) ~= a[i] * profiles[labels[i], t] + b[i]``.

    Attributes:
        labels: ``(N,)`` int64, mode of each weight, ``0..M-1``; modes are numbered by
            decreasing size.
        reference: ``(M,)`` int64, row index of each mode's reference weight.
        a, b: ``(N,)`` float32 affine coefficients (``a = 1, b = 0`` for references;
            ``a = 0, b = value`` for constant weights).
        profiles: ``(M, T)`` float64, the reference weights' values at the T samples.
        score: ``(N,)`` float32, ``|corr|`` of each weight with its reference (0 if constant).
        constant: ``(N,)`` bool, weights that did not move (their own exact fit).
        samples: ``(K,)`` int64 rows that were clustered; ``sample_labels`` their modes.
        sample_corr: ``(K, K)`` float32 centred correlations of the samples.
        linkage: ``(K-1, 4)`` scipy complete-linkage matrix of the samples.
        layout: the named tensors the rows belong to, when the input was a :class:`Trajectory`.
        steps: when each of the T samples was taken.
    """

    labels: Tensor
    reference: Tensor
    a: Tensor
    b: Tensor
    profiles: Tensor
    score: Tensor
    constant: Tensor
    samples: Tensor
    sample_labels: Tensor
    sample_corr: Tensor
    linkage: np.ndarray
    layout: ParamLayout | None = None
    steps: list[int] = field(default_factory=list)

    @property
    def n_modes(self) -> int:
        """M, the number of modes."""
        return int(self.reference.numel())

    @property
    def n_weights(self) -> int:
        """N, the number of weights modelled."""
        return int(self.labels.numel())

    @property
    def sizes(self) -> Tensor:
        """``(M,)`` number of weights in each mode (constant weights not counted)."""
        return torch.bincount(self.labels[~self.constant], minlength=self.n_modes)

    def __repr__(self) -> str:
        return (
            f"Decomposition(N={self.n_weights}, T={self.profiles.shape[1]}, n_modes={self.n_modes}, "
            f"constant={int(self.constant.sum())})"
        )

    def to(self, device: torch.device | str) -> Decomposition:
        """A copy with every tensor on ``device`` (``decompose`` returns them on its ``device``)."""
        moved = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()}
        return type(self)(**moved)

    # ------------------------------------------------------- reconstruction
    def reconstruct(self, t: int | None = None) -> Tensor:
        """The modelled weights: ``(N, T)`` float32, or ``(N,)`` at sample ``t`` only."""
        prof = self.profiles.to(torch.float32)
        if t is not None:
            return torch.addcmul(self.b, self.a, prof[:, t][self.labels])
        out = prof[self.labels]
        out.mul_(self.a[:, None]).add_(self.b[:, None])
        return out

    # -------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        """Tensors and plain values only (loadable with ``torch.load(weights_only=True)``)."""
        return {
            "labels": self.labels, "reference": self.reference, "a": self.a, "b": self.b,
            "profiles": self.profiles, "score": self.score, "constant": self.constant,
            "samples": self.samples, "sample_labels": self.sample_labels,
            "sample_corr": self.sample_corr, "linkage": torch.from_numpy(self.linkage),
            "layout": None if self.layout is None else self.layout.to_dict(), "steps": list(self.steps),
        }

    @classmethod
    def from_state_dict(cls, d: Mapping) -> Decomposition:
        """The decomposition :meth:`state_dict` described (tensors as saved, on their devices)."""
        d = dict(d)
        d["linkage"] = d["linkage"].numpy()
        d["layout"] = None if d["layout"] is None else ParamLayout.from_dict(d["layout"])
        return cls(**d)


def decompose(
    trajectory,
    *,
    n_modes: int | None = None,
    threshold: float | None = None,
    n_samples: int = 1000,
    seed: int | None = None,
    progress: bool | None = None,
    device: torch.device | str | None = None,
    chunk_rows: int | None = None,
) -> Decomposition:
    """Correlation Mode Decomposition of a weight trajectory.

    Args:
        trajectory: ``(N, T)`` tensor or array (rows = weights, columns = time samples), or a
            :class:`~modeopt.Trajectory` (its layers guide the sampling and its names let the
            reconstruction be loaded into a model).
        n_modes: number of modes M to cut the clustering into, **or**
        threshold: cophenetic distance ``t`` in ``1 - |corr|`` units (``0 <= t``) at which to cut;
            M is then found by the data. Give exactly one of the two.
        n_samples: K, the number of weights clustered (the paper uses 1000; ~30*M is enough).
        seed: seed of the sampling; ``None`` draws a fresh one.
        progress: show a progress bar (``None``: only on a terminal).
        device: where the two full passes (scan, assignment and fit) run and where the
            result's tensors live. ``None``: the device of the trajectory's data (the CPU for
            host data, arrays and memory maps). A CUDA device with host data streams chunks up
            (the recording is never copied whole to the GPU). Results on the CPU do not depend
            on this argument's presence.
        chunk_rows: weights per chunk of the full passes; ``None`` sizes chunks to
            :data:`CHUNK_ELEMENTS` (CPU) or :data:`DEVICE_CHUNK_ELEMENTS` (GPU) values. Only
            memory and speed depend on it.

    Returns:
        A :class:`Decomposition` whose tensors are on ``device``.

    Raises:
        ValueError: with what to change, for bad arguments, fewer than 3 samples, NaN/inf
            values (naming the tensor), non-floating data, an empty or wholly constant trajectory.
    """
    if (n_modes is None) == (threshold is None):
        got = "neither" if n_modes is None else f"both (n_modes={n_modes}, threshold={threshold})"
        raise ValueError(f"give exactly one of n_modes=M or threshold=t, got {got}")
    n_modes, n_samples, chunk_rows = (int(v) if isinstance(v, np.integer) else v
                                      for v in (n_modes, n_samples, chunk_rows))
    if n_modes is not None:
        check_int("n_modes", n_modes, 1)
    if threshold is not None and not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"threshold must be a finite number >= 0 (a distance 1 - |corr|), got {threshold!r}")
    check_int("n_samples", n_samples, 1)
    if n_modes is not None and n_modes > n_samples:
        raise ValueError(f"n_modes={n_modes} > n_samples={n_samples}: ask for fewer modes or sample more "
                         f"weights (n_samples >= 30 * n_modes is a good rule)")

    if not isinstance(trajectory, Trajectory):
        w = as_tensor(trajectory)
        if w.dim() != 2:
            raise ValueError(f"trajectory must be a 2-D (N, T) matrix, got shape {tuple(w.shape)}")
        trajectory = Trajectory(w.T)
    layout, steps = trajectory.layout, list(trajectory.steps)
    if not trajectory.data.is_floating_point():
        raise ValueError(f"trajectory must hold floating-point values, got {trajectory.data.dtype}: "
                         "cast it with .float()")
    t, n = trajectory.data.shape
    if n == 0:
        raise ValueError("empty trajectory: there are no weights (does the model have trainable "
                         "floating-point parameters?)")
    if t < 3:
        raise ValueError(f"trajectory has T={t} time samples; CMD needs at least 3: record more snapshots")
    if chunk_rows is not None:
        check_int("chunk_rows", chunk_rows, 1)
    dev = resolve_device(device, trajectory.data)
    budget = CHUNK_ELEMENTS if dev.type == "cpu" else DEVICE_CHUNK_ELEMENTS

    moving_dev = scan_moving(trajectory, dev, chunk_rows=chunk_rows, progress=progress)
    moving = moving_dev.cpu()
    n_moving = int(moving.sum())
    if n_moving == 0:
        raise ValueError(NOTHING_MOVED)

    rng = np.random.default_rng(seed)
    layers = layout.numels if layout is not None else [n]
    samples = sample_weights(moving, layers, int(n_samples), rng)
    k = samples.numel()
    if n_modes is not None and n_modes > k:
        raise ValueError(f"n_modes={n_modes} > the {k} weights that move and could be sampled: "
                         f"ask for at most {k} modes")
    sample_prof = trajectory.take(samples, torch.float64)
    clustering = cluster_samples(sample_prof, n_modes=n_modes, threshold=threshold)
    m = clustering.n_modes
    reference = samples[clustering.reference]
    profiles = sample_prof[clustering.reference]  # (M, T)

    assign_budget = ASSIGN_CHUNK_ELEMENTS if dev.type == "cpu" else budget
    chunk = chunk_rows or max(1024, assign_budget // (t + m))  # the (M, chunk) scores count too
    bounds = [(i, min(i + chunk, n)) for i in range(0, n, chunk)]
    labels, a, b, score = assign_and_fit(
        trajectory, profiles, samples, clustering.labels, moving_dev, bounds, progress=progress, device=dev
    )
    # Number modes by their final size, largest first.
    order_t = mode_order(torch.bincount(labels[moving_dev], minlength=m), reference)
    relabel = torch.empty(m, dtype=torch.int64)
    relabel[order_t] = torch.arange(m)
    labels = relabel.to(dev)[labels]
    labels.masked_fill_(~moving_dev, 0)
    reference, profiles = reference[order_t], profiles[order_t]
    ref_dev = reference.to(dev)
    a[ref_dev], b[ref_dev], score[ref_dev] = 1.0, 0.0, 1.0
    return Decomposition(
        labels=labels, reference=ref_dev, a=a, b=b, profiles=profiles.to(dev), score=score,
        constant=~moving_dev, samples=samples.to(dev), sample_labels=relabel[clustering.labels].to(dev),
        sample_corr=clustering.corr.to(device=dev, dtype=torch.float32), linkage=clustering.linkage,
        layout=layout, steps=steps,
    )


#: What :func:`decompose` (and the sharded switch) say when no weight moved.
NOTHING_MOVED = ("every weight is constant over the trajectory: nothing moved between the samples "
                 "(record snapshots while the model trains)")


def scan_moving(trajectory: Trajectory, dev: torch.device, *, chunk_rows: int | None = None,
                progress: bool | None = None) -> Tensor:
    """Pass 1 of :func:`decompose`: ``(N,)`` bool on ``dev``, which rows move over the T samples.

    Raises ``ValueError`` naming the first NaN/inf. Per row, so a trajectory of some of the rows
    (one rank's shards) gives exactly those rows' verdicts.
    """
    t, n = trajectory.data.shape
    on_host = dev.type == "cpu"
    budget = CHUNK_ELEMENTS if on_host else DEVICE_CHUNK_ELEMENTS
    layout, steps = trajectory.layout, list(trajectory.steps)
    chunk = chunk_rows or max(1024, budget // t)
    bounds = [(i, min(i + chunk, n)) for i in range(0, n, chunk)]
    eps = torch.finfo(trajectory.value_dtype).eps

    # Pass 1: finiteness and which weights move (time-major chunks: no transposing copies).
    # On a GPU the finiteness verdict is accumulated on the device (no host sync per chunk) and
    # the offending value is located on the host only if there is one.
    moving = torch.empty(n, dtype=torch.bool, device=dev)
    nonfinite = None if on_host else torch.zeros((), dtype=torch.bool, device=dev)
    chunks = stream_cols(trajectory, bounds, dev)
    for i0, i1, x in tqdm(chunks, total=len(bounds), desc="CMD scan", disable=_progress.disable(progress, len(bounds), 4), leave=False):
        hi, lo = x.amax(dim=0), x.amin(dim=0)  # NaN and inf show up here: no full isfinite pass
        if nonfinite is None:
            if not bool(torch.isfinite(hi).all() and torch.isfinite(lo).all()):
                _raise_nonfinite(x, i0, layout, steps)
        else:
            nonfinite |= ~(torch.isfinite(hi).all() & torch.isfinite(lo).all())
        moving[i0:i1] = (hi - lo) > 4 * eps * torch.maximum(hi.abs(), lo.abs())
    if nonfinite is not None and bool(nonfinite):
        for i0, i1 in bounds:
            x = trajectory.cols(i0, i1)
            if not bool(torch.isfinite(x).all()):
                _raise_nonfinite(x, i0, layout, steps)
    return moving


def mode_order(sizes: Tensor, reference: Tensor) -> Tensor:
    """``(M,)`` int64: the modes by decreasing final size (ties: by reference row), as :func:`decompose` numbers them."""
    sizes = sizes.tolist()
    order = sorted(range(len(sizes)), key=lambda j: (-sizes[j], int(reference[j])))
    return torch.tensor(order, dtype=torch.int64)


def _raise_nonfinite(x: Tensor, i0: int, layout: ParamLayout | None, steps: list[int]) -> None:
    """Name the first NaN/inf of the time-major chunk ``x`` whose first column is row ``i0``."""
    bad = torch.nonzero(~torch.isfinite(x))[0]
    row, col = i0 + int(bad[1]), int(bad[0])
    where = f"row {row}" if layout is None else "parameter {!r} at index {}".format(*layout.locate(row))
    raise ValueError(f"trajectory has NaN/inf in {where}, sample {col} (step {steps[col]}): "
                     "CMD cannot model diverged weights; drop that snapshot or fix the training")


def assign_and_fit(
    trajectory: Trajectory,
    profiles: Tensor,
    samples: Tensor,
    sample_labels: Tensor,
    moving: Tensor,
    bounds: list[tuple[int, int]],
    *,
    progress: bool | None = None,
    device: torch.device | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Assign each weight to its most ``|corr|``-related reference and fit ``a, b`` (Algorithm 2).

    Sampled weights keep the mode they were clustered into. Constant weights get
    ``a = 0``, ``b = value``. Works on time-major ``(T, chunk)`` blocks in float64, centred before
    any product (no large sums are subtracted), on ``device`` (default: the data's; host data
    is streamed to a GPU by :func:`~modeopt.trajectories.streaming.stream_cols`). No host synchronisation per chunk.

    Returns:
        ``labels`` (N,) int64, ``a`` (N,) float32, ``b`` (N,) float32, ``score`` (N,) float32,
        on ``device``.
    """
    n = trajectory.n_weights
    dev = resolve_device(device, trajectory.data)
    labels = torch.empty(n, dtype=torch.int64, device=dev)
    a = torch.empty(n, dtype=torch.float32, device=dev)
    b = torch.empty(n, dtype=torch.float32, device=dev)
    score = torch.empty(n, dtype=torch.float32, device=dev)
    for i0, i1, lab, ai, bi, sc in assign_chunks(trajectory, profiles, samples, sample_labels, moving, bounds,
                                                 progress=progress, device=dev):
        labels[i0:i1] = lab
        a[i0:i1] = ai
        b[i0:i1] = bi
        score[i0:i1] = sc
    return labels, a, b, score


def assign_chunks(
    trajectory: Trajectory,
    profiles: Tensor,
    samples: Tensor,
    sample_labels: Tensor,
    moving: Tensor,
    bounds: list[tuple[int, int]],
    *,
    progress: bool | None = None,
    device: torch.device | None = None,
) -> Iterator[tuple[int, int, Tensor, Tensor, Tensor, Tensor]]:
    """:func:`assign_and_fit` one chunk of ``bounds`` at a time, for callers that keep less than its
    N-sized outputs (the switch keeps compact labels and ``a`` only).

    Yields:
        ``(i0, i1, labels, a, b, score)`` for rows ``i0:i1``: int64 labels and float32 ``a``, ``b``,
        ``score``, new tensors on ``device`` (the same values :func:`assign_and_fit` stores).
    """
    dev = resolve_device(device, trajectory.data)
    samples_host = samples.cpu()
    samples_dev, sample_labels = samples_host.to(dev), sample_labels.to(dev)
    moving = moving.to(dev)
    profiles = profiles.to(dev)
    ref_mean = profiles.mean(dim=1)
    ref_c = profiles - ref_mean[:, None]  # (M, T)
    ref_var = (ref_c * ref_c).sum(dim=1)  # (M,), > 0: references move
    ref_norm = ref_var.sqrt()
    chunks = stream_cols(trajectory, bounds, dev)
    for i0, i1, x in tqdm(chunks, total=len(bounds), desc="CMD assign", disable=_progress.disable(progress, len(bounds), 4), leave=False):
        # (T, c), contiguous float64, always a copy: the input is never written (a float64 view
        # of the caller's data was centred in place here before).
        x = x.to(torch.float64, copy=True)
        mean = x.mean(dim=0)
        x -= mean
        # (M, c) = T * cov(w_ref_m, w_i): mode-major, so the argmax over the M modes below is M
        # vectorised passes over c contiguous values (torch's argmax across the short dimension of a
        # (c, M) matrix, or down the rows of this one, was 5-30x slower); chunks are sized to stay in cache.
        dots = ref_c @ x
        lab = _argmax_rows(dots, ref_norm)
        lo, hi = (int(v) for v in torch.searchsorted(samples_host, torch.tensor([i0, i1])))  # host only
        if hi > lo:
            lab[samples_dev[lo:hi] - i0] = sample_labels[lo:hi]
        d = dots.gather(0, lab[None, :])[0]
        ai = d / ref_var[lab]
        bi = mean - ai * ref_mean[lab]
        xnorm = x.mul(x).sum(dim=0).sqrt_()
        sc = d.abs() / (torch.where(xnorm > 0, xnorm, torch.ones_like(xnorm)) * ref_norm[lab])
        still = ~moving[i0:i1]  # where(), not mask assignment: no nonzero() and no device sync
        ai = torch.where(still, 0.0, ai)
        bi = torch.where(still, mean, bi)
        sc = torch.where(still, 0.0, sc)
        del x, dots
        yield i0, i1, lab, ai.to(torch.float32), bi.to(torch.float32), sc.to(torch.float32)


def _argmax_rows(dots: Tensor, ref_norm: Tensor) -> Tensor:
    """``(c,)`` int64: for each column of ``dots`` ``(M, c)``, the first ``m`` maximising ``|dots[m]| / ref_norm[m]``
    (``argmax`` over the modes, ties to the lowest index as ``torch.argmax``; the values are finite)."""
    best = dots[0].abs() / ref_norm[0]
    idx = torch.zeros(dots.shape[1], dtype=torch.int64, device=dots.device)
    for m in range(1, dots.shape[0]):
        score = dots[m].abs() / ref_norm[m]
        idx.masked_fill_(score > best, m)
        torch.maximum(best, score, out=best)
    return idx
