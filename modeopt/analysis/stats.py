"""The data behind the report's figures, computed without any plotting (tests assert on these).

Every function streams over the weights in chunks where it touches all N of them; nothing of
size ``N x N`` or ``N x T`` beyond the input is formed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.cluster.hierarchy import leaves_list
from torch import Tensor
from tqdm.auto import tqdm

from modeopt.utils import progress as _progress
from modeopt.utils.chunking import CHUNK_ELEMENTS
from modeopt.decomposition.algorithm import Decomposition
from modeopt.trajectories.trajectory import Trajectory
from .dmd import DMD

__all__ = [
    "CorrelationData", "correlation_data",
    "ProfileBands", "profile_bands",
    "LayerDistribution", "layer_distribution",
    "ReconstructionErrors", "reconstruction_errors",
    "WeightExamples", "weight_examples",
    "model_cols",
]



# ------------------------------------------------------------ correlation
@dataclass
class CorrelationData:
    """The sampled weights' ``|corr|`` matrix, ordered so that each mode is one contiguous block.

    Attributes:
        abs_corr: ``(K, K)`` float32 ``|corr|`` in the display order.
        order: ``(K,)`` positions (into ``Decomposition.samples``) of the display order: modes
            0, 1, ... in turn, each in its dendrogram leaf order.
        labels: ``(K,)`` mode of each displayed sample (non-decreasing).
        bounds: ``(M + 1,)`` mode ``m`` occupies ``bounds[m]:bounds[m + 1]``.
        within: ``(M,)`` mean ``|corr|`` between members of each mode (off-diagonal).
        between: mean ``|corr|`` between samples of different modes (NaN with one mode).
    """

    abs_corr: np.ndarray
    order: np.ndarray
    labels: np.ndarray
    bounds: np.ndarray
    within: np.ndarray
    between: float


def correlation_data(dec: Decomposition) -> CorrelationData:
    """Order the samples' correlation matrix by mode (then by the clustering's dendrogram)."""
    k = dec.samples.numel()
    leaves = leaves_list(dec.linkage) if k > 1 else np.zeros(1, dtype=np.int64)
    lab = dec.sample_labels.numpy()
    order = np.asarray(sorted(leaves, key=lambda i: lab[i]), dtype=np.int64)  # stable: leaf order in a mode
    abs_corr = np.abs(dec.sample_corr.numpy()).astype(np.float32)[np.ix_(order, order)]
    labels = lab[order]
    m = dec.n_modes
    bounds = np.searchsorted(labels, np.arange(m + 1), side="left")
    within = np.empty(m)
    for j in range(m):
        blk = abs_corr[bounds[j] : bounds[j + 1], bounds[j] : bounds[j + 1]]
        c = blk.shape[0]
        within[j] = 1.0 if c < 2 else (blk.sum() - np.trace(blk)) / (c * c - c)
    off = labels[:, None] != labels[None, :]
    between = float(abs_corr[off].mean()) if off.any() else float("nan")
    return CorrelationData(abs_corr=abs_corr, order=order, labels=labels, bounds=bounds, within=within,
                           between=between)


# ---------------------------------------------------------- profile bands
@dataclass
class ProfileBands:
    """Each mode's normalised reference profile and the band holding ``level`` of its members.

    Profiles are normalised as in the CMD paper: centred, scaled to unit standard deviation over
    time, and sign-flipped where a member is anti-correlated with its reference (``a < 0``).

    Attributes:
        steps: ``(T,)`` when the samples were taken.
        reference: ``(M, T)`` the normalised reference profiles.
        lower, upper: ``(M, T)`` the ``(1-level)/2`` and ``(1+level)/2`` quantiles of the members.
        median: ``(M, T)`` the members' median.
        n_members: ``(M,)`` members used (all, or a random ``max_members`` of them).
        sizes: ``(M,)`` members in each mode (constant weights not counted).
        level: the band's coverage (0.95).
    """

    steps: np.ndarray
    reference: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    median: np.ndarray
    n_members: np.ndarray
    sizes: np.ndarray
    level: float

    @property
    def width(self) -> np.ndarray:
        """``upper - lower``, the band's width at each sample."""
        return self.upper - self.lower


def _normalise(x: Tensor) -> Tensor:
    """Rows centred and scaled to unit (population) standard deviation; constant rows -> 0."""
    x = x - x.mean(dim=1, keepdim=True)
    sd = x.pow(2).mean(dim=1, keepdim=True).sqrt()
    return x / torch.where(sd > 0, sd, torch.ones_like(sd))


def profile_bands(trajectory: Trajectory, dec: Decomposition, *, max_members: int = 2000, level: float = 0.95,
                  seed: int = 0) -> ProfileBands:
    """Normalised reference profiles and the ``level`` band of their members (CMD paper, Fig. 3)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    m, T = dec.profiles.shape
    g = torch.Generator().manual_seed(seed)
    ref = _normalise(dec.profiles.to(torch.float64))
    lower, upper, median = (np.empty((m, T)) for _ in range(3))
    n_members = np.zeros(m, dtype=np.int64)
    moving = ~dec.constant
    q = torch.tensor([(1 - level) / 2, 0.5, (1 + level) / 2], dtype=torch.float64)
    for j in range(m):
        idx = torch.nonzero((dec.labels == j) & moving).flatten()
        if idx.numel() > max_members:
            idx = idx[torch.randperm(idx.numel(), generator=g)[:max_members]].sort().values
        z = _normalise(trajectory.take(idx, torch.float64))
        sign = torch.where(dec.a[idx] < 0, -1.0, 1.0).to(torch.float64)
        z *= sign[:, None]
        lo, mid, hi = torch.quantile(z, q, dim=0)
        lower[j], median[j], upper[j] = lo.numpy(), mid.numpy(), hi.numpy()
        n_members[j] = idx.numel()
    return ProfileBands(steps=np.asarray(dec.steps or range(T)), reference=ref.numpy(), lower=lower, upper=upper,
                        median=median, n_members=n_members, sizes=dec.sizes.numpy(), level=level)


# ------------------------------------------------------------ layers
@dataclass
class LayerDistribution:
    """How many weights of each named tensor (layer) fall in each mode.

    Attributes:
        names: ``L`` tensor names (one ``"weights"`` entry for a bare matrix).
        sizes: ``(L,)`` weights per tensor.
        counts: ``(L, M)`` weights of tensor ``l`` in mode ``m`` (moving weights).
        constant: ``(L,)`` weights of each tensor that never moved (in no mode).
    """

    names: list[str]
    sizes: np.ndarray
    counts: np.ndarray
    constant: np.ndarray

    @property
    def mode_sizes(self) -> np.ndarray:
        """``(M,)`` members of each mode, over all tensors."""
        return self.counts.sum(axis=0)

    @property
    def fractions(self) -> np.ndarray:
        """``(L, M)`` share of each tensor's weights in each mode."""
        return self.counts / np.maximum(self.sizes, 1)[:, None]


def layer_distribution(dec: Decomposition) -> LayerDistribution:
    """Mode membership counted per named tensor (CMD paper, Fig. 4b: modes spread over all layers)."""
    m = dec.n_modes
    if dec.layout is None:
        spans = [("weights", 0, dec.n_weights)]
    else:
        spans = [(s.name, s.offset, s.stop) for s in dec.layout.specs]
    counts = np.zeros((len(spans), m), dtype=np.int64)
    constant = np.zeros(len(spans), dtype=np.int64)
    for i, (_, a, b) in enumerate(spans):
        const = dec.constant[a:b]
        counts[i] = torch.bincount(dec.labels[a:b][~const], minlength=m).numpy()
        constant[i] = int(const.sum())
    return LayerDistribution(names=[s[0] for s in spans], sizes=np.asarray([b - a for _, a, b in spans]),
                             counts=counts, constant=constant)


# ------------------------------------------------------------ errors
def model_cols(model, start: int, stop: int) -> Tensor:
    """Modelled values of weights ``start:stop``, time-major ``(T, stop - start)`` float64."""
    if isinstance(model, DMD):
        return model.cols(start, stop)
    if isinstance(model, Decomposition):
        lab = model.labels[start:stop]
        return model.profiles.T[:, lab] * model.a[start:stop].double() + model.b[start:stop].double()
    if isinstance(model, Trajectory):
        return model.cols(start, stop, torch.float64)
    raise TypeError(f"expected a Decomposition, DMD or Trajectory, got {type(model).__name__}")


@dataclass
class ReconstructionErrors:
    """How well a model reproduces the trajectory, per weight, per time sample and per layer.

    Relative errors divide by the weights' own movement (standard deviation over time), so 0 is
    exact and 1 is no better than holding each weight at its mean. For CMD, a weight's relative
    error is ``sqrt(1 - corr^2)`` with its reference.

    Attributes:
        name: the model's label ("CMD, M = 10").
        rmse: ``(N,)`` float32 RMS error of each weight over time.
        spread: ``(N,)`` float32 standard deviation of each weight over time.
        time_rmse: ``(T,)`` RMS error over all weights at each sample.
        time_rel: ``(T,)`` ``||x_hat_t - x_t|| / RMS_t ||x_t - mean||``.
        layer_rel: ``(L,)`` relative error of each named tensor (``||E|| / ||X - mean||``).
        total_rel: the whole trajectory's relative error.
    """

    name: str
    rmse: np.ndarray
    spread: np.ndarray
    time_rmse: np.ndarray
    time_rel: np.ndarray
    layer_rel: np.ndarray
    total_rel: float

    @property
    def rel(self) -> np.ndarray:
        """``(N,)`` per-weight relative error (NaN for weights that never moved)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.spread > 0, self.rmse / self.spread, np.nan)


def reconstruction_errors(trajectory: Trajectory, model, *, name: str = "", progress: bool | None = None
                          ) -> ReconstructionErrors:
    """Compare ``model`` (a :class:`Decomposition` or :class:`DMD`) with the trajectory, chunk by chunk."""
    T, n = trajectory.data.shape
    rmse = np.empty(n, dtype=np.float32)
    spread = np.empty(n, dtype=np.float32)
    time_sq = torch.zeros(T, dtype=torch.float64)
    chunk = max(1024, CHUNK_ELEMENTS // T)
    bounds = [(i, min(i + chunk, n)) for i in range(0, n, chunk)]
    hide = _progress.disable(progress, len(bounds), 4)
    for i0, i1 in tqdm(bounds, desc=f"errors {name}".strip(), disable=hide, leave=False):
        x = trajectory.cols(i0, i1, torch.float64)
        e = model_cols(model, i0, i1) - x
        e2 = e * e
        time_sq += e2.sum(dim=1)
        rmse[i0:i1] = e2.mean(dim=0).sqrt().numpy()
        spread[i0:i1] = (x - x.mean(dim=0)).pow(2).mean(dim=0).sqrt().numpy()
    spans = [(0, n)] if trajectory.layout is None else [(s.offset, s.stop) for s in trajectory.layout.specs]
    e_sq, s_sq = rmse.astype(np.float64) ** 2, spread.astype(np.float64) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        layer_rel = np.array([np.sqrt(e_sq[a:b].sum() / s_sq[a:b].sum()) if s_sq[a:b].sum() > 0 else 0.0
                              for a, b in spans])
        move = np.sqrt(s_sq.sum())  # = RMS over time of ||x_t - mean||
        total = float(np.sqrt(e_sq.sum()) / move) if move > 0 else 0.0
        time_rel = time_sq.sqrt().numpy() / move if move > 0 else np.zeros(T)
    return ReconstructionErrors(name=name, rmse=rmse, spread=spread, time_rmse=(time_sq / n).sqrt().numpy(),
                                time_rel=time_rel, layer_rel=layer_rel, total_rel=total)


# ------------------------------------------------------------ examples
@dataclass
class WeightExamples:
    """A few weights' recorded values next to their CMD and DMD reconstructions (paper, Fig. 1).

    Attributes:
        rows: ``(n,)`` flat indices; ``names``: where they live (``"fc1.weight[3, 7]"``);
        modes: ``(n,)`` their CMD modes; ``raw``, ``cmd``, ``dmd``: ``(n, T)`` values.
    """

    rows: np.ndarray
    names: list[str]
    modes: np.ndarray
    raw: np.ndarray
    cmd: np.ndarray
    dmd: np.ndarray | None = field(default=None)
    dmd_name: str = "DMD"


def weight_examples(trajectory: Trajectory, dec: Decomposition, dmd_model: DMD | None = None, *, n: int = 3,
                    seed: int = 0, dmd_name: str = "DMD") -> WeightExamples:
    """One random moving, non-reference weight from each of the ``n`` largest modes (repeats mode 0
    when there are fewer modes)."""
    g = torch.Generator().manual_seed(seed)
    eligible = ~dec.constant.clone()
    eligible[dec.reference] = False
    rows = []
    for j in range(n):
        mode = j if j < dec.n_modes else 0
        idx = torch.nonzero(eligible & (dec.labels == mode)).flatten()
        if idx.numel() == 0:
            idx = torch.nonzero(eligible).flatten()
        if idx.numel() == 0:
            break
        pick = int(idx[torch.randint(idx.numel(), (1,), generator=g)])
        eligible[pick] = False
        rows.append(pick)
    rows_t = torch.tensor(rows, dtype=torch.int64)
    names = []
    for r in rows:
        if dec.layout is None:
            names.append(f"w[{r}]")
        else:
            nm, ix = dec.layout.locate(r)
            names.append(f"{nm}[{', '.join(map(str, ix))}]")
    raw = trajectory.take(rows_t, torch.float64).numpy()
    cmd = np.stack([model_cols(dec, r, r + 1)[:, 0].numpy() for r in rows]) if rows else np.zeros((0, raw.shape[1]))
    dmd_v = None
    if dmd_model is not None:
        dmd_v = np.stack([dmd_model.cols(r, r + 1)[:, 0].numpy() for r in rows]) if rows else np.zeros_like(cmd)
    return WeightExamples(rows=rows_t.numpy(), names=names, modes=dec.labels[rows_t].numpy(), raw=raw, cmd=cmd,
                          dmd=dmd_v, dmd_name=dmd_name)
