"""Peer methods implemented for side-by-side comparisons with CMD.

:class:`SubspaceOptimizer` - DLDR / P-SGD (Li et al., "Low dimensional trajectory hypothesis is
true: DNNs can be trained in tiny subspaces", 2022): after a recorded warm-up, the weights are
trained in the span of the top-``dim`` principal directions of the warm-up trajectory,
``w = w_switch + P c`` with ``P`` an orthonormal ``(N, dim)`` basis and ``c`` the ``dim`` trainable
coordinates. The projected gradient ``P^T dL/dw`` drives ``c``; the base optimizer steps ``c``.

Against CMD's ``M`` modes with disjoint support (memory O(N)), this dense basis costs
``4 * N * dim`` bytes and two ``N x dim`` products per step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from modeopt.optim.wrapping import SharesBaseOptimizer
from modeopt.utils.checks import check_int
from modeopt.trajectories.layout import ParamLayout
from modeopt.optim.param_groups import exclusion_predicate
from modeopt.trajectories.snapshots import SnapshotBuffer
from modeopt.trajectories.time_reduction import column_chunks, read_columns, time_factor

__all__ = ["SubspaceOptimizer", "pca_basis"]


def pca_basis(data: Tensor, dim: int, offset: Tensor | None = None, chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """Top-``dim`` principal directions of T samples of N weights, without an N x N matrix.

    Two passes over the columns: :func:`~modeopt.trajectories.time_reduction.time_factor` of the time-centred
    samples (``R``, ``T x T``), then the directions ``P = A V S^-1`` from the SVD ``R = U S V^T``.

    Args:
        data: ``(T, N)`` samples (rows), values ``data + offset``.
        dim: number of directions (``1 <= dim <= T - 1``).
        offset: ``(N,)`` baseline, or ``None``.
        chunk: columns per pass (default from ``CHUNK_ELEMENTS``).
    Returns:
        ``P`` ``(N, dim)`` float32 with orthonormal columns, and the singular values ``(dim,)``
        (float64) of the centred samples.
    Raises:
        ValueError: ``dim`` out of range, a warm-up that spans fewer than ``dim`` directions, NaN/inf
            samples (:class:`~modeopt.trajectories.time_reduction.NonFiniteValues`), or samples that do not move.
    """
    t, n = data.shape
    check_int("dim", dim, 1)
    if not dim <= t - 1:
        raise ValueError(f"dim={dim} needs 1 <= dim <= T - 1 = {t - 1} snapshots: record more snapshots or ask "
                         "for fewer directions")
    _, s, vh = torch.linalg.svd(time_factor(data, offset, centre=True, chunk=chunk))
    sv = s[:dim]
    # Directions below the data's rounding level are noise, not trajectory.
    tol = 100 * torch.finfo(data.dtype if data.is_floating_point() else torch.float32).eps
    if bool((sv <= tol * s[0].clamp(min=1e-300)).any()):
        raise ValueError(f"the warm-up trajectory spans fewer than dim={dim} directions: ask for fewer")
    u = vh[:dim].T / sv  # (T, dim): A u are the principal directions
    p = torch.empty(n, dim, dtype=torch.float32)
    for i0, i1 in column_chunks(t, [(0, n)], chunk):
        p[i0:i1] = (read_columns(data, offset, i0, i1, centre=True).T @ u).to(torch.float32)
    return p, sv


class SubspaceOptimizer(SharesBaseOptimizer):
    """DLDR / P-SGD: warm up with any optimizer, then train ``dim`` coordinates of a PCA subspace.

    Args:
        model: the model; base_optimizer: any ``torch.optim`` optimizer on its parameters.
        dim: subspace dimension d (``<= warmup_steps // snapshot_every - 1``).
        warmup_steps, snapshot_every: as in :class:`~modeopt.CMDOptimizer`.
        exclude: parameters kept out of the subspace (trained as usual): a predicate
            ``f(name, param)`` or ``fnmatch`` patterns.

    After the switch the subspace weights keep ``requires_grad`` (P-SGD needs their full gradient to
    project it); they are no longer in the optimizer's groups, whose first group trains ``c``.
    ``trainable_parameters()`` counts degrees of freedom: ``dim`` plus the excluded parameters.
    """

    def __init__(self, model: nn.Module, base_optimizer: torch.optim.Optimizer, *, dim: int = 10,
                 warmup_steps: int = 500, snapshot_every: int = 10,
                 exclude: Callable[[str, nn.Parameter], bool] | Sequence[str] | None = None):
        check_int("dim", dim, 1)
        check_int("warmup_steps", warmup_steps, 1)
        check_int("snapshot_every", snapshot_every, 1)
        if warmup_steps // snapshot_every - 1 < dim:
            raise ValueError(f"dim={dim} needs at least {dim + 1} warm-up snapshots, but warmup_steps={warmup_steps} "
                             f"with snapshot_every={snapshot_every} records {warmup_steps // snapshot_every}")
        self._init_shared(base_optimizer)
        self.model, self.dim = model, dim
        self.warmup_steps, self.snapshot_every = warmup_steps, snapshot_every
        names = {id(p): n for n, p in model.named_parameters()}
        excluded = exclusion_predicate(exclude)
        self._orig = [list(g["params"]) for g in base_optimizer.param_groups]
        emb = [(names[id(p)], p) for g in base_optimizer.param_groups for p in g["params"]
               if p.requires_grad and p.is_floating_point() and not excluded(names[id(p)], p)]
        if not emb:
            raise ValueError("nothing to train in a subspace: every parameter is frozen or excluded")
        self._names = [n for n, _ in emb]
        self._params = [p for _, p in emb]
        self._layout = ParamLayout.from_named_tensors(emb)
        self._buffer = SnapshotBuffer(self._layout.n, capacity=warmup_steps // snapshot_every)
        self.phase = "warmup"
        self._step = 0
        self.P: Tensor | None = None
        self.c: nn.Parameter | None = None
        self._c_applied: Tensor | None = None

    def trainable_parameters(self) -> int:
        """Degrees of freedom trained now: ``dim`` (after the switch) plus the parameters kept out."""
        emb = {id(p) for p in self._params}
        free = sum(p.numel() for p in self.model.parameters() if p.requires_grad and id(p) not in emb)
        return free + (self.dim if self.phase == "embedded" else sum(p.numel() for p in self._params))

    def step(self, closure=None):
        """One step of the base optimizer: on the weights in warm-up (recording a snapshot every
        ``snapshot_every`` steps, switching at ``warmup_steps``), on ``c`` after the switch."""
        if self.phase == "embedded":
            with torch.no_grad():
                g = torch.zeros(self.dim, dtype=torch.float64)
                for spec, p in zip(self._layout.specs, self._params):
                    if p.grad is not None:
                        g += self.P[spec.offset : spec.stop].T.double() @ p.grad.reshape(-1).double()
                        p.grad = None
                self.c.grad = g.to(self.c.dtype)
        loss = self.base.step() if closure is None else self.base.step(closure)
        self._step += 1
        if self.phase == "embedded":
            self._sync()
        else:
            if self._step % self.snapshot_every == 0:
                self._buffer.append(self._layout, self._params, self._step)
            if self._step >= self.warmup_steps:
                self._switch()
        return loss

    @torch.no_grad()
    def _sync(self) -> None:
        delta = (self.c.detach() - self._c_applied).to(torch.float32)
        for spec, p in zip(self._layout.specs, self._params):
            p.view(-1).add_(self.P[spec.offset : spec.stop] @ delta)
        self._c_applied.copy_(self.c.detach())

    @torch.no_grad()
    def _switch(self) -> None:
        data, _ = self._buffer.raw()
        self.P, self.singular_values = pca_basis(data, self.dim, self._buffer.anchor)
        self._switch_structures(torch.zeros(self.dim), torch.zeros(self.dim))
        for p in self._params:
            self.base.state.pop(p, None)
        self.phase = "embedded"

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the base optimizer's gradients and the subspace weights' (which leave its groups)."""
        super().zero_grad(set_to_none)
        for p in self._params:  # not in the groups after the switch, but they still get gradients
            p.grad = None

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state, the phase and step, the warm-up buffer or ``P`` and ``c``."""
        return {"base": self.base.state_dict(), "phase": self.phase, "step": self._step,
                "buffer": None if self._buffer is None else self._buffer.state_dict(),
                "P": self.P, "c": None if self.c is None else self.c.detach().clone(),
                "c_applied": self._c_applied}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (of an optimizer over the same model and settings)."""
        self._step, self.phase = int(sd["step"]), sd["phase"]
        if sd["phase"] == "embedded":
            self.P = sd["P"].clone()
            self._buffer = SnapshotBuffer(self._layout.n, capacity=1)
            self._switch_structures(sd["c"], sd["c_applied"])
        elif sd["buffer"] is not None:
            self._buffer.load_state_dict(sd["buffer"])
        self.base.load_state_dict(sd["base"])

    def _switch_structures(self, c: Tensor, c_applied: Tensor) -> None:
        self.c = nn.Parameter(c.clone())
        self._c_applied = c_applied.clone()
        emb = {id(p) for p in self._params}
        for gi, group in enumerate(self.base.param_groups):
            kept = [p for p in self._orig[gi] if id(p) not in emb]
            group["params"][:] = kept + ([self.c] if gi == 0 else [])
        self._buffer = None
