"""The mechanism: put a model's weights into mode space and take them out again.

In mode space every embedded weight is ``w_i = a_i * r[m(i)] + b_i`` and only the M scalars
``r`` are trainable. The weights are *maintained in place*: each keeps its value in its own
``nn.Parameter`` (``requires_grad=False``), so checkpoints, evaluation and export see plain
tensors. Gradients reach ``r`` through a custom autograd function:

* forward - returns the stored weight itself (a view, no copy, no arithmetic);
* backward - reduces the weight's gradient to ``dL/dr_m = sum_{i in m} a_i dL/dw_i`` with a
  deterministic float64 segment sum, so no N-sized gradient outlives the layer's backward.

After the optimizer changes ``r``, :meth:`ModeSpace.sync` writes ``w += a * dr[m]`` in place.

Which tensor a module's forward reads is switched by forward hooks: while a module that owns
embedded weights (or the root model) runs, its ``_parameters[name]`` entry holds the function's
output instead of the bare parameter, and it is restored afterwards (also when forward raises).

The mode scalars are registered as parameters of the root model (``modeopt_r0``, one per param
group), not as a child module: containers such as ``nn.Sequential`` run every child in their
forward. They appear in ``model.parameters()`` (so ``model.zero_grad()``, gradient clipping and
trainable-parameter counts see them) but never in ``model.state_dict()``: a state-dict hook drops
them, so the model's checkpoints keep exactly the keys of the original model class, and the
optimizer's ``state_dict`` carries ``r``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["ModeSpace", "segment_sum"]


def segment_sum(values: Tensor, labels: Tensor, n: int) -> Tensor:
    """``out[m] = sum(values[labels == m])`` as float64, deterministic.

    Args:
        values: ``(k,)`` floating tensor.
        labels: ``(k,)`` integer tensor with entries in ``[0, n)``.
    Returns:
        ``(n,)`` float64.
    """
    if values.device.type == "cpu":
        # A sequential loop on CPU: deterministic. float64 weights make it accumulate in float64.
        return torch.bincount(labels, weights=values.to(torch.float64), minlength=n)
    # Scatter-add is atomic (order-dependent) on accelerators; a sort makes the order fixed.
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels, minlength=n)
    return torch.segment_reduce(values.to(torch.float64)[order], "sum", lengths=counts)


class _ReadThrough(torch.autograd.Function):
    """Forward: the stored weight. Backward: its gradient reduced onto the mode scalars."""

    @staticmethod
    def forward(ctx, r: Tensor, weight: Tensor, a: Tensor, labels: Tensor) -> Tensor:  # noqa: D401
        ctx.a, ctx.labels, ctx.n = a, labels, r.shape[0]
        ctx.r_dtype = r.dtype
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: Tensor):
        g = grad.reshape(-1) * ctx.a  # (numel,) float32: a_i dL/dw_i
        return segment_sum(g, ctx.labels, ctx.n).to(ctx.r_dtype), None, None, None


class ModeSpace:
    """The model in mode space: which weights are embedded, their ``a`` and modes, and ``r``.

    Args:
        model: the model (its modules get forward hooks; it gets ``modeopt_r*`` parameters).
        params: the embedded parameters, ``(name, param)``.
        labels: per parameter, the mode of each element (any integer dtype, flat).
        a: per parameter, the coefficient of each element (flat).
        r_groups: which param group each mode's scalar belongs to: ``(M,)`` int.
        r_init: ``(M,)`` initial mode values.
        n_groups: number of param groups (one ``r`` tensor per group that has modes).

    Modes are ordered so that group ``g`` holds the modes ``r_groups == g`` in increasing order.
    """

    PREFIX = "modeopt_r"

    def __init__(
        self,
        model: nn.Module,
        params: Sequence[tuple[str, nn.Parameter]],
        labels: Sequence[Tensor],
        a: Sequence[Tensor],
        r_groups: Tensor,
        r_init: Tensor,
    ):
        if any(n.startswith(self.PREFIX) for n, _ in model.named_parameters(recurse=False)):
            raise RuntimeError("the model is already in mode space (it has modeopt_r* parameters)")
        self.model = model
        self.names = [n for n, _ in params]
        self.params = [p for _, p in params]
        self.labels = [l.reshape(-1).to(torch.int64) for l in labels]
        self.a = [x.reshape(-1).to(p.dtype) for x, p in zip(a, self.params)]
        self.n_modes = int(r_init.numel())
        self.r_groups = r_groups.to(torch.int64)
        self.groups = sorted(set(self.r_groups.tolist()))
        # position of mode m inside the concatenation of the group tensors
        order = torch.cat([torch.nonzero(self.r_groups == g).flatten() for g in self.groups])
        self._gather = torch.empty_like(order)
        self._gather[order] = torch.arange(self.n_modes)
        device = self.params[0].device
        self.r_params: list[nn.Parameter] = [
            nn.Parameter(r_init[self.r_groups == g].detach().clone().to(device)) for g in self.groups
        ]
        self.r_names = [f"{self.PREFIX}{j}" for j in range(len(self.r_params))]
        self.applied = self.r_full().detach().clone()  # the r the weights currently reflect
        self._scratch: Tensor | None = None
        self.requires_grad_before = [p.requires_grad for p in self.params]
        self._owners = self._find_owners(model)
        self._active = False
        self._swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
        self._handles: list = []
        self.grad_seen = False
        self._install()

    # ---------------------------------------------------------- structure
    def _find_owners(self, model: nn.Module) -> dict[nn.Module, list[tuple[str, int]]]:
        """Every (module, attribute) through which an embedded parameter is reachable."""
        idx = {id(p): i for i, p in enumerate(self.params)}
        owners: dict[nn.Module, list[tuple[str, int]]] = {}
        for mod in model.modules():
            for attr, p in mod._parameters.items():
                if p is not None and id(p) in idx:
                    owners.setdefault(mod, []).append((attr, idx[id(p)]))
        return owners

    def _install(self) -> None:
        for name, r in zip(self.r_names, self.r_params):
            self.model.register_parameter(name, r)
        # Plain functions: torch tags state-dict hooks with attributes, which bound methods refuse.
        self._handles.append(self.model.register_state_dict_post_hook(
            lambda mod, sd, prefix, meta: self._drop_from_state_dict(sd, prefix)))
        self._handles.append(self.model.register_load_state_dict_post_hook(
            lambda mod, keys: self._not_missing(keys)))
        for p in self.params:
            p.requires_grad_(False)
            p.grad = None
        self._handles.append(self.model.register_forward_pre_hook(self._root_pre))
        self._handles.append(self.model.register_forward_hook(self._root_post, always_call=True))
        for mod in self._owners:
            if mod is self.model:
                continue
            self._handles.append(mod.register_forward_pre_hook(self._owner_pre))
            self._handles.append(mod.register_forward_hook(self._owner_post, always_call=True))

    def remove(self) -> None:
        """Leave mode space: hooks and ``modeopt_r*`` removed, ``requires_grad`` restored."""
        self._restore()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for name in self.r_names:
            if self.model._parameters.get(name) is not None:
                del self.model._parameters[name]
        for p, rg in zip(self.params, self.requires_grad_before):
            p.requires_grad_(rg)

    # -------------------------------------------------------------- hooks
    def _drop_from_state_dict(self, state_dict, prefix: str) -> None:
        for name in self.r_names:
            state_dict.pop(prefix + name, None)

    def _not_missing(self, incompatible_keys) -> None:
        # Checkpoints never hold r (see _drop_from_state_dict): a strict load must not ask for it.
        keep = [k for k in incompatible_keys.missing_keys
                if not any(k == n or k.endswith("." + n) for n in self.r_names)]
        incompatible_keys.missing_keys[:] = keep

    def r_full(self) -> Tensor:
        """``(M,)`` the mode scalars in mode order (differentiable w.r.t. the group tensors)."""
        if len(self.r_params) == 1:
            return self.r_params[0]
        return torch.cat(list(self.r_params))[self._gather]

    def _swap(self, modules) -> None:
        r = self.r_full()
        outs: dict[int, Tensor] = {}
        for mod in modules:
            for attr, i in self._owners[mod]:
                if i not in outs:  # a shared parameter gets one node, read by all its owners
                    outs[i] = _ReadThrough.apply(r, self.params[i], self.a[i], self.labels[i])
                mod._parameters[attr] = outs[i]
                self._swapped.append((mod, attr, self.params[i]))
        self._active = True

    def _restore(self) -> None:
        for mod, attr, p in self._swapped:
            mod._parameters[attr] = p
        self._swapped.clear()
        self._active = False

    def _root_pre(self, module, args):
        if not self._active and torch.is_grad_enabled():
            self._swap(self._owners)
            self._root_owned = True
        else:
            self._root_owned = False

    def _root_post(self, module, args, output):
        if self._root_owned:
            self._restore()
            self._root_owned = False

    def _owner_pre(self, module, args):
        # Runs when a submodule is called on its own (or re-run by activation checkpointing).
        if not self._active and torch.is_grad_enabled():
            self._swap([module])
            module._modeopt_owned = True

    def _owner_post(self, module, args, output):
        if getattr(module, "_modeopt_owned", False):
            self._restore()
            module._modeopt_owned = False

    # ------------------------------------------------------------- update
    @torch.no_grad()
    def sync(self) -> bool:
        """Write ``w += a * (r - r_applied)[m]`` into every embedded weight. Returns whether r moved."""
        r = self.r_full().detach()
        delta = r - self.applied
        if not bool(delta.any()):
            return False
        delta = delta.to(self.params[0].dtype)
        biggest = max(p.numel() for p in self.params)
        if self._scratch is None or self._scratch.numel() < biggest or self._scratch.dtype != delta.dtype:
            self._scratch = torch.empty(biggest, dtype=delta.dtype, device=delta.device)
        for p, a, lab in zip(self.params, self.a, self.labels):
            buf = self._scratch[: p.numel()]
            torch.index_select(delta, 0, lab, out=buf)
            p.view(-1).addcmul_(buf, a)
        self.applied.copy_(r)
        return True

    @torch.no_grad()
    def set_weights(self, values: Sequence[Tensor]) -> None:
        for p, v in zip(self.params, values):
            p.copy_(v.reshape(p.shape))

    def has_grad(self) -> bool:
        return any(p.grad is not None for p in self.r_params)
