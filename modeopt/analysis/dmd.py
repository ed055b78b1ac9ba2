"""Exact Dynamic Mode Decomposition (DMD) of a weight trajectory: the CMD paper's baseline.

Exact DMD (Tu et al. 2014) at rank r fits one linear map to consecutive snapshots,
``x_{k+1} ~= A x_k``, on the rank-r subspace of ``X = [x_0 .. x_{T-2}]``, and models the weights as
``x_k ~= Phi diag(lambda)^k b`` with r DMD modes ``Phi``, eigenvalues ``lambda`` and amplitudes ``b``
(the paper's Eq. 1).

Memory: one pass over the weights in chunks computes the ``T x T`` triangular factor ``R`` of a
thin QR of ``W (N x T)`` (:func:`modeopt.trajectories.time_reduction.time_factor`), so nothing of size
``N x N`` or ``N x r`` is formed and the SVD keeps full float64 accuracy. Since the modes are ``Phi = Y C`` with
``Y = [x_1 .. x_{T-1}]`` and a ``(T-1) x r`` matrix ``C``, every reconstructed snapshot is a
combination of the recorded ones, ``x_hat_t = Y coef[:, t]``: :class:`DMD` keeps the trajectory
(not a copy) and the ``(T-1, T)`` coefficients, and reconstructs chunk by chunk on demand.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from modeopt.utils.checks import check_int
from modeopt.trajectories.layout import ParamLayout
from modeopt.trajectories.time_reduction import column_chunks, read_columns
from modeopt.trajectories.trajectory import Trajectory, as_tensor, load_named_into
from .factor import trajectory_factor, warn_uneven_steps

__all__ = ["DMD", "dmd"]


@dataclass
class DMD:
    """An exact-DMD model of a trajectory: ``x_t ~= Re(Phi diag(eigenvalues)^t amplitudes)``.

    Attributes:
        rank: r, the number of DMD modes kept.
        eigenvalues: ``(r,)`` complex128 DMD eigenvalues (per sample interval).
        amplitudes: ``(r,)`` complex128 amplitudes, the least-squares fit of the first sample.
        singular_values: ``(T-1,)`` float64 singular values of ``X`` (all of them: the rank choice).
        coef: ``(T-1, T)`` float64: sample ``t`` is modelled as ``W[:, 1:] @ coef[:, t]``.
        mode_coef: ``(T-1, r)`` complex128: the modes are ``Phi = W[:, 1:] @ mode_coef``.
        trajectory: the trajectory that was decomposed (kept, not copied).
        layout, steps: as the trajectory's.
    """

    rank: int
    eigenvalues: Tensor
    amplitudes: Tensor
    singular_values: Tensor
    coef: Tensor
    mode_coef: Tensor
    trajectory: Trajectory = field(repr=False)
    layout: ParamLayout | None = None
    steps: list[int] = field(default_factory=list)

    @property
    def n_weights(self) -> int:
        """N, the number of weights."""
        return self.trajectory.n_weights

    @property
    def n_samples(self) -> int:
        """T, the number of samples."""
        return self.coef.shape[1]

    def __repr__(self) -> str:
        return f"DMD(N={self.n_weights}, T={self.n_samples}, rank={self.rank})"

    # ------------------------------------------------------- reconstruction
    def _recorded(self, start: int, stop: int) -> Tensor:
        """``Y`` = samples 1..T-1 of weights ``start:stop``, ``(T-1, c)`` float64."""
        return read_columns(self.trajectory.data, self.trajectory.offset, start, stop)[1:]

    def cols(self, start: int, stop: int, t: int | None = None) -> Tensor:
        """Modelled weights ``start:stop``, time-major ``(T, stop - start)`` float64 (``(c,)`` at ``t``)."""
        y = self._recorded(start, stop)
        return self.coef.T @ y if t is None else self.coef[:, t] @ y

    def reconstruct(self, t: int | None = None) -> Tensor:
        """The modelled weights: ``(N, T)`` float32, or ``(N,)`` at sample ``t`` only."""
        out = torch.empty((self.n_weights,) if t is not None else (self.n_weights, self.n_samples),
                          dtype=torch.float32)
        for i0, i1 in column_chunks(self.n_samples, [(0, self.n_weights)]):
            out[i0:i1] = self.cols(i0, i1, t) if t is not None else self.cols(i0, i1).T
        return out

    def state_dict_at(self, t: int = -1) -> dict[str, Tensor]:
        """The modelled weights at sample ``t`` as named tensors (needs a layout: a DMD of a
        Trajectory, not of a bare matrix)."""
        return Trajectory(self.reconstruct(t)[None], self.layout).state_dict_at(0)

    def load_into(self, model: nn.Module, t: int = -1) -> None:
        """Write the modelled weights at sample ``t`` into the model, in place."""
        load_named_into(model, self.state_dict_at(t))

    def modes(self) -> Tensor:
        """The DMD modes ``Phi``, ``(N, r)`` complex64 (this one is ``N x r``: mind the memory)."""
        y = self._recorded(0, self.n_weights)
        return (y.T.to(torch.complex128) @ self.mode_coef).to(torch.complex64)


def dmd(trajectory, rank: int, *, progress: bool | None = None, rtol: float = 1e-10) -> DMD:
    """Exact DMD of a trajectory at rank ``rank`` (memory O(T^2) beyond the input, see module doc).

    Args:
        trajectory: a :class:`~modeopt.Trajectory` or an ``(N, T)`` tensor/array.
        rank: r, ``1 <= r <= T - 1``. Directions of ``X`` with singular value below
            ``rtol * sigma_max`` are dropped even if that leaves fewer than r (they carry no data).
        progress: show a progress bar (``None``: only on a terminal).

    DMD assumes evenly spaced samples; a warning says when the steps are not.
    """
    if not isinstance(trajectory, Trajectory):
        w = as_tensor(trajectory)
        if w.dim() != 2:
            raise ValueError(f"trajectory must be a 2-D (N, T) matrix, got shape {tuple(w.shape)}")
        trajectory = Trajectory(w.T)
    T, n = trajectory.data.shape
    if T < 3:
        raise ValueError(f"DMD needs at least 3 samples, the trajectory has {T}")
    check_int("rank", rank, 1, T - 1)
    steps = list(trajectory.steps)
    warn_uneven_steps(steps, stacklevel=2)

    # W = Q R with orthonormal Q (never formed), R is T x T.
    r_fac = trajectory_factor(trajectory, centre=False, progress=progress, what="the trajectory", desc="DMD factor")
    rx, ry = r_fac[:, :-1], r_fac[:, 1:]  # X = Q rx, Y = Q ry

    u, s, vh = torch.linalg.svd(rx, full_matrices=False)
    keep = int((s > rtol * s[0]).sum()) if float(s[0]) > 0 else 0
    r = min(rank, keep)
    if r < 1:
        raise ValueError("the trajectory does not move (all snapshots are zero): nothing for DMD to model")
    u_r, s_r, v_r = u[:, :r], s[:r], vh[:r].T
    a_tilde = u_r.T @ ry @ v_r / s_r  # (r, r): U^T Y V S^-1
    lam, w_eig = torch.linalg.eig(a_tilde)
    c = (v_r / s_r).to(torch.complex128) @ w_eig  # (T-1, r): Phi = Y C
    phi_q = ry.to(torch.complex128) @ c  # Phi in Q coordinates (T, r)
    x0_q = r_fac[:, 0].to(torch.complex128)
    amp = torch.linalg.lstsq(phi_q, x0_q[:, None]).solution[:, 0]  # (r,)
    t_idx = torch.arange(T, dtype=torch.float64)
    powers = lam[None, :] ** t_idx[:, None].to(torch.complex128)  # (T, r)
    coef = (c @ (powers * amp[None, :]).T).real.contiguous()  # (T-1, T)
    return DMD(rank=r, eigenvalues=lam, amplitudes=amp, singular_values=s, coef=coef, mode_coef=c,
               trajectory=trajectory, layout=trajectory.layout, steps=steps)
