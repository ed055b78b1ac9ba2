"""The mechanism: put a model's weights into mode space and take them out again.

In mode space every embedded weight is ``w_i = a_i * r[m(i)] + b_i`` and only the M scalars
``r`` are trainable. The weights are *maintained in place*: each keeps its value in its own
``nn.Parameter`` (``requires_grad=False``), so checkpoints, evaluation and export see plain
tensors. Gradients reach ``r`` through a custom autograd function:

* forward - returns the stored weight itself (a view, no copy, no arithmetic);
* backward - reduces the weight's gradient to ``dL/dr_m = sum_{i in m} a_i dL/dw_i`` with a
  deterministic float64 segment sum (``torch.ops.modeopt.mode_reduce``), so no N-sized gradient
  outlives the layer's backward.

After the optimizer changes ``r``, :meth:`ModeSpace.sync` writes ``w += a * dr[m]`` in place
(``torch.ops.modeopt.mode_update``), without a host synchronisation.

**Half-precision weights** (bfloat16, float16) are not updated in place: rounding every step's
change to 8 (bf16) or 11 (fp16) significant bits loses the small changes and accumulates the
rest's rounding (``benchmarks/half_precision_drift.py``). Their parameter keeps its value at the
switch, frozen (the *base*, with ``r_base``, the ``r`` it holds), and every forward that reads it
gets the weight formed out of place, ``w = round(base + a * (r_in_weights - r_base)[m])`` - summed
in float32 and rounded once to the weight's dtype (``torch.ops.modeopt.mode_form``) - like LoRA's
frozen base, so each weight is within half an ulp of its exact mode-space value after any number
of steps. No byte more per weight is kept: the formed tensors live only during a forward. Autograd
does not keep them for backward either: while the root forward runs, a saved-tensor hook stores a
formed weight (or a view of it) saved by an operation as a small token and forms it again when the
backward unpacks it. ``model.state_dict()`` gives the formed (current) values under the original
keys; ``load_state_dict`` and :meth:`ModeSpace.set_weights` take current values (an exact re-base:
``base = value``, ``r_base = r_in_weights``); :meth:`ModeSpace.remove` writes the formed values into
the parameters. Reading a half-precision ``module.weight`` outside the model's (or its module's)
forward gives the frozen base: use ``model.state_dict()`` or :meth:`ModeSpace.current` for values.

Device-generic: ``a`` (``coef_dtype``) and the compact labels (:func:`modeopt.modespace.kernels.label_dtype`)
live on each weight's device; ``r`` and ``r_in_weights`` on the first embedded weight's device.
The autograd function takes only tensors and ints, so ``torch.compile(model, fullgraph=True)``
traces the hooks, the swap and the backward (the operator is opaque to it).

Which tensor a module's forward reads is switched by forward hooks: while a module that owns
embedded weights (or the root model) runs, its ``_parameters[name]`` entry holds the function's
output instead of the bare parameter, and it is restored afterwards (also when forward raises).
The entry is written directly, as ``torch.nn.utils.parametrize`` does: ``register_parameter`` and
``setattr`` accept only ``nn.Parameter`` (the output is a non-leaf tensor), and this runs at every
forward, where a parametrization's wrapper class would cost a property call per weight access.

The mode scalars are registered as parameters of the model (``modeopt_r0``, one per param group) on
the *last* module in ``model.modules()`` order (the root itself for a model without children), not
as a new child module (containers such as ``nn.Sequential`` run every child in their forward) and
not on the root (the root's own parameters come first in ``model.parameters()``). So they come
after every original parameter: what pairs parameters by position (``AveragedModel`` built before
the switch, EMA helpers zipping two parameter lists) or reads the first one (HF ``model.dtype``)
sees the original parameters first, while ``model.zero_grad()``, gradient clipping over
``model.parameters()``, DDP's reducer and trainable-parameter counts still see them. They never
appear in ``model.state_dict()``: a state-dict hook drops them, so the model's checkpoints keep
exactly the keys of the original model class, and the optimizer's ``state_dict`` carries ``r``.

``r`` keeps the dtype it is given (float32 from :class:`~modeopt.CMDOptimizer`) whatever the
weights' dtype: it is the only trained state, like an fp32 master copy, and a bf16 ``r`` could not
resolve an Adam step of ``lr = 1e-3`` on a scalar of size ~1 (bf16 spacing there is 2^-7 ~ 0.008).

Hooks are bound methods of the ModeSpace and ``functools.partial`` objects of module-level
functions, so a model in mode space pickles (``torch.save(model)``) and deep-copies as a whole.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from modeopt.modespace import kernels

__all__ = ["ModeSpace", "HALF_DTYPES", "check_base_state"]

#: Weight dtypes kept as a frozen base and formed in each forward (module docstring).
HALF_DTYPES = (torch.bfloat16, torch.float16)


class _ReadThrough(torch.autograd.Function):
    """Forward: the stored weights themselves. Backward: their gradients reduced onto the modes.

    One node serves a group of consecutive weights on one device (see ``ModeSpace.GROUP_ELEMENTS``):
    one fused reduction call per group rather than per tensor, while at most one group's weight
    gradients wait for their reduction at any time.

    Under ``torch.compile`` the inputs are tensors and ints only (``r, n_modes, None, *weights, *a,
    *labels``) and the backward is one call of the ``modeopt::mode_reduce`` operator, so Dynamo traces
    it (the operator is opaque to the compiler, with a fake implementation for shapes). In eager
    mode ``a`` and the labels come as one non-tensor argument (``stash``): fewer inputs, a cheaper
    ``apply``; the backward then calls :func:`modeopt.modespace.kernels.reduce` (the same implementations).
    """

    @staticmethod
    def forward(ctx, r: Tensor, n_modes: int, stash: tuple | None, *tensors: Tensor):  # noqa: D401
        if stash is None:  # traced by torch.compile: tensors = weights, a, labels (n each)
            n = len(tensors) // 3
            weights = tensors[:n]
            ctx.save_for_backward(*tensors[n:])
        else:
            # Eager: ``stash = (a, labels)`` of the group, long-lived tensors that are never modified,
            # so plain references do; fewer inputs keep apply() cheap. (Saved tensors would also go
            # through saved-tensor hooks: non-reentrant activation checkpointing re-runs a
            # submodule's swap in backward and would count them as extra saved tensors.)
            weights = tensors
        ctx.stash, ctx.n_inputs = stash, len(tensors)
        ctx.n_modes, ctx.r_dtype, ctx.r_device = n_modes, r.dtype, r.device
        ctx.set_materialize_grads(False)  # a weight the forward did not use gets None, not zeros
        return tuple(w.view_as(w) for w in weights)

    @staticmethod
    def backward(ctx, *grads: Tensor | None):
        none = (None,) * ctx.n_inputs
        if ctx.stash is None:  # compiled: dense gradients (Dynamo refuses to read .layout here)
            saved = ctx.saved_tensors
            n = len(saved) // 2
            g_r = torch.ops.modeopt.mode_reduce(list(grads), list(saved[:n]), list(saved[n:]), ctx.n_modes)
            return (g_r.to(device=ctx.r_device, dtype=ctx.r_dtype), None, None) + none
        # A sparse gradient (nn.Embedding(sparse=True)) is densified: the reduction reads every row.
        grads = [g.to_dense() if g is not None and g.layout != torch.strided else g for g in grads]
        ctx.stash[2]._notice_copy_trained()
        g_r = kernels.reduce(grads, ctx.stash[0], ctx.stash[1], ctx.n_modes)
        return (g_r.to(device=ctx.r_device, dtype=ctx.r_dtype), None, None) + none


class ModeSpace:
    """The model in mode space: which weights are embedded, their ``a`` and modes, and ``r``.

    Args:
        model: the model (its modules get forward hooks; its last module gets ``modeopt_r*`` parameters).
        params: the embedded parameters, ``(name, param)``.
        labels: per parameter, the mode of each element (any integer dtype, flat), in ``[0, M)``.
        a: per parameter, the coefficient of each element (flat).
        r_groups: which param group each mode's scalar belongs to: ``(M,)`` int.
        r_init: ``(M,)`` initial mode values.
        coef_dtype: storage of ``a`` (float32, or bfloat16: the model is then exactly ``a_bf16 * r + b``).
        r_prefix: name of the ``r`` parameters (``<r_prefix><j>``); mode spaces with different prefixes
            may hold disjoint parameters of one model at the same time (one per block, see
            :class:`~modeopt.BlockwiseCMD`).

    Attributes:
        names, params: the embedded parameters (``requires_grad=False`` while in mode space).
        labels: per parameter, ``(numel,)`` compact mode labels on its device (:meth:`mode_index` gives int64).
        a: per parameter, ``(numel,)`` coefficients in ``coef_dtype`` on its device.
        n_modes: M. ``r_groups``: ``(M,)`` int64 on the CPU. ``groups``: the param groups that hold modes.
        r_params, r_names: one ``modeopt_r<j>`` parameter per group in ``groups``, holding that group's
            modes ``r_groups == g`` in increasing order; :meth:`r_full` is ``(M,)`` in mode order.
        r_owner, r_owner_name: the module that holds them (the model's last module, or the root).
        r_in_weights: ``(M,)`` the ``r`` the weights currently hold (see :meth:`sync`): the stored float32
            weights, and the formed half-precision ones (what the model computes with, what
            ``model.state_dict()`` gives).
        r_base: ``(M,)`` the ``r`` the frozen bases of the half-precision weights hold (their value at the
            switch, or at the last re-base); equal to ``r_in_weights`` in a space without them.
        half: the indices of the half-precision (bfloat16/float16) embedded weights.
        requires_grad_before: per parameter, its ``requires_grad`` before, restored by :meth:`remove`.
    """

    PREFIX = "modeopt_r"
    #: weights per autograd node of the root swap (the extra gradient memory it may hold).
    GROUP_ELEMENTS = 1 << 21

    def __init__(
        self,
        model: nn.Module,
        params: Sequence[tuple[str, nn.Parameter]],
        labels: Sequence[Tensor],
        a: Sequence[Tensor],
        r_groups: Tensor,
        r_init: Tensor,
        coef_dtype: torch.dtype = torch.float32,
        r_prefix: str = PREFIX,
    ):
        # coef_dtype: storage of a; bf16 halves it. The rounded a is used both by the backward and
        # by the weight update, so the model stays exactly w = a_rounded * r + b.
        if any(n.rsplit(".", 1)[-1].startswith(r_prefix) for n, _ in model.named_parameters()):
            raise RuntimeError(f"the model is already in mode space (it has {r_prefix}* parameters)")
        self.r_prefix = r_prefix
        self.model = model
        self.names = [n for n, _ in params]
        self.params = [p for _, p in params]
        self.n_modes = int(r_init.numel())
        if not (len(labels) == len(a) == len(self.params)):
            raise ValueError(f"ModeSpace: {len(self.params)} parameters, {len(labels)} label tensors and {len(a)} "
                             "coefficient tensors; they must agree")
        for name, p, lab, x in zip(self.names, self.params, labels, a):
            if not (lab.numel() == x.numel() == p.numel()):
                raise ValueError(f"ModeSpace: {name} has {p.numel()} elements but {lab.numel()} labels and "
                                 f"{x.numel()} coefficients")
        if r_groups.numel() != self.n_modes:
            raise ValueError(f"ModeSpace: r_groups has {r_groups.numel()} entries for {self.n_modes} modes")
        # Once, here (one host sync): the fused kernels index per-mode arrays by label unchecked.
        kernels.check_labels([lab.reshape(-1) for lab in labels], self.n_modes, what="ModeSpace labels")
        # Compact labels on every device and path (1 byte for M <= 256, 2 up to 65,536; see
        # kernels.label_dtype), and a in coef_dtype, each on its weight's device.
        ldt = kernels.label_dtype(self.n_modes)
        self.labels = [lab.reshape(-1).to(ldt).to(p.device).contiguous() for lab, p in zip(labels, self.params)]
        self.a = [x.reshape(-1).to(device=p.device, dtype=coef_dtype).contiguous() for x, p in zip(a, self.params)]
        self.r_groups = r_groups.detach().to(device="cpu", dtype=torch.int64)
        self.groups = sorted(set(self.r_groups.tolist()))
        # r (and r_in_weights) live on the first embedded weight's device; deltas are copied per device.
        device = self.params[0].device
        # position of mode m inside the concatenation of the group tensors
        order = torch.cat([torch.nonzero(self.r_groups == g).flatten() for g in self.groups])
        gather = torch.empty_like(order)
        gather[order] = torch.arange(self.n_modes)
        self._gather = gather.to(device)
        #: per group (in ``groups`` order), the modes it holds, on r's device
        self._group_modes = [torch.nonzero(self.r_groups == g).flatten().to(device) for g in self.groups]
        self.r_params: list[nn.Parameter] = [
            nn.Parameter(r_init[self.r_groups == g].detach().clone().to(device)) for g in self.groups
        ]
        self.r_names = [f"{r_prefix}{j}" for j in range(len(self.r_params))]
        # The last module in named_modules() order: its parameters come last in model.parameters().
        self.r_owner_name, self.r_owner = list(model.named_modules())[-1]
        #: ``(M,)`` the value of ``r`` the weights currently hold (``w = a * r_in_weights[m] + b``);
        #: :meth:`sync` writes ``a * (r - r_in_weights)[m]`` into them and sets it to ``r``.
        self.r_in_weights = self.r_full().detach().clone()
        #: ``(M,)`` the ``r`` the frozen half-precision bases hold (float32, on r's device)
        self.r_base = self.r_in_weights.clone()
        self.half = [i for i, p in enumerate(self.params) if p.dtype in HALF_DTYPES]
        self._is_half = [p.dtype in HALF_DTYPES for p in self.params]
        # the in-place (float32) tensors by device (update calls, one per device); the half ones too
        by_dev: dict[torch.device, list[int]] = {}
        half_dev: dict[torch.device, list[int]] = {}
        for i, p in enumerate(self.params):
            (half_dev if self._is_half[i] else by_dev).setdefault(p.device, []).append(i)
        self._by_device = list(by_dev.items())
        self._half_by_device = list(half_dev.items())
        self._saving = None  # the saved-tensor hooks while a forward runs (see _enter_saving)
        self._formed_at: dict[int, int] = {}  # storage address of a formed weight -> its index, in a forward
        self.requires_grad_before = [p.requires_grad for p in self.params]
        self._owners = self._find_owners(model)
        self._groups = self._group(range(len(self.params)))
        self._active = False
        self._swapped_by: nn.Module | None = None  # the submodule whose own forward swapped (see _owner_pre)
        self._swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
        self._handles: list = []
        self._install()

    def mode_index(self) -> list[Tensor]:
        """Per embedded tensor, the mode of each element as int64 (``labels`` may be stored compactly)."""
        return [kernels.as_index(lab).to(torch.int64) for lab in self.labels]

    # ---------------------------------------------------------- structure
    def _find_owners(self, model: nn.Module) -> dict[nn.Module, list[tuple[str, int]]]:
        """Every (module, attribute) through which an embedded parameter is reachable."""
        idx = {id(p): i for i, p in enumerate(self.params)}
        owners: dict[nn.Module, list[tuple[str, int]]] = {}
        for mod in model.modules():
            for attr, p in mod.named_parameters(recurse=False, remove_duplicate=False):
                if id(p) in idx:
                    owners.setdefault(mod, []).append((attr, idx[id(p)]))
        return owners

    def _group(self, index) -> list[tuple[int, ...]]:
        """Consecutive tensors (registration order ~ forward order) packed up to GROUP_ELEMENTS, one
        device per group (one reduction call per group, on that device)."""
        groups, cur, size = [], [], 0
        for i in index:
            n = self.params[i].numel()
            if cur and (size + n > self.GROUP_ELEMENTS or self.params[i].device != self.params[cur[0]].device):
                groups.append(tuple(cur))
                cur, size = [], 0
            cur.append(i)
            size += n
        if cur:
            groups.append(tuple(cur))
        return groups

    def _install(self) -> None:
        try:
            for name, r in zip(self.r_names, self.r_params):
                self.r_owner.register_parameter(name, r)
        except Exception:  # noqa: BLE001 - a module refusing new parameters (e.g. scripted): use the root
            self._unregister_r()
            self.r_owner_name, self.r_owner = "", self.model
            for name, r in zip(self.r_names, self.r_params):
                self.model.register_parameter(name, r)
        # functools.partial of module-level functions: picklable (torch.save(model)), deep-copyable,
        # and torch may tag them with attributes (``_from_public_api``), which bound methods refuse.
        self._handles.append(self.r_owner.register_state_dict_post_hook(functools.partial(_drop_r, self)))
        self._handles.append(self.r_owner.register_load_state_dict_post_hook(functools.partial(_r_not_missing, self)))
        for p in self.params:
            p.requires_grad_(False)
            p.grad = None
        for mod, entries in self._owners.items():
            if any(self._is_half[i] for _, i in entries):
                # state_dict gives, and load_state_dict takes, the current values of the half weights
                self._handles.append(mod.register_state_dict_post_hook(functools.partial(_current_values, self)))
                self._handles.append(mod.register_load_state_dict_pre_hook(
                    functools.partial(_load_current_values, self)))
        self._handles.append(self.model.register_forward_pre_hook(self._root_pre))
        self._handles.append(self.model.register_forward_hook(self._root_post, always_call=True))
        for mod in self._owners:
            if mod is self.model:
                continue
            self._handles.append(mod.register_forward_pre_hook(self._owner_pre))
            self._handles.append(mod.register_forward_hook(self._owner_post, always_call=True))

    def remove(self) -> None:
        """Leave mode space: hooks and ``modeopt_r*`` removed, ``requires_grad`` restored; the
        half-precision parameters get their current (formed) values."""
        self._restore()
        self.rebase()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._unregister_r()
        for p, rg in zip(self.params, self.requires_grad_before):
            p.requires_grad_(rg)

    def _unregister_r(self) -> None:
        registered = dict(self.r_owner.named_parameters(recurse=False))
        for name in self.r_names:
            if name in registered:
                delattr(self.r_owner, name)

    # -------------------------------------------------------------- hooks
    @property
    def r_qualified_names(self) -> list[str]:
        """The names of the mode scalars in ``model.named_parameters()`` (e.g. ``fc2.modeopt_r0``)."""
        return [f"{self.r_owner_name}.{n}" if self.r_owner_name else n for n in self.r_names]

    def r_full(self) -> Tensor:
        """``(M,)`` the mode scalars in mode order (differentiable w.r.t. the group tensors)."""
        if len(self.r_params) == 1:
            return self.r_params[0]
        return torch.cat(list(self.r_params))[self._gather]

    def _swap(self, modules, groups=None) -> None:
        if groups is None:
            groups = self._group(sorted({i for mod in modules for _, i in self._owners[mod]}))
        grad = torch.is_grad_enabled()
        compiling = torch.compiler.is_compiling()
        # half-precision weights: formed from their frozen base, one rounding (module docstring)
        formed = self._form([i for index in groups for i in index if self._is_half[i]])
        if grad and formed and not compiling:
            self._enter_saving(formed)
        out_of: dict[int, Tensor] = {}  # a shared parameter gets one output, read by all its owners
        if grad:
            r = self.r_full()
            for index in groups:
                weights = [formed.get(i, self.params[i]) for i in index]
                if compiling:  # tensors only, for Dynamo
                    outs = _ReadThrough.apply(r, self.n_modes, None, *weights,
                                              *(self.a[i] for i in index), *(self.labels[i] for i in index))
                else:
                    stash = ([self.a[i] for i in index], [self.labels[i] for i in index], self)
                    outs = _ReadThrough.apply(r, self.n_modes, stash, *weights)
                out_of.update(zip(index, outs))
        else:  # no autograd: only the half-precision weights need another tensor
            out_of = formed
        for mod in modules:
            for attr, i in self._owners[mod]:
                if i in out_of:
                    # direct entry, as torch.nn.utils.parametrize: setattr takes only nn.Parameter (module docstring)
                    mod._parameters[attr] = out_of[i]
                    self._swapped.append((mod, attr, self.params[i]))
        self._active = True

    def _delta(self, device: torch.device) -> Tensor:
        """``(M,)`` float32 ``r_in_weights - r_base`` on ``device``: what the half-precision bases lack."""
        d = (self.r_in_weights - self.r_base).to(torch.float32)
        return d if d.device == device else d.to(device, non_blocking=device.type != "cpu")

    @torch.no_grad()
    def _form(self, index: Sequence[int], delta: Tensor | None = None) -> dict[int, Tensor]:
        """The current values of the half-precision weights ``index``: ``{i: round(base_i + a_i * delta[m])}``
        (new tensors, the parameters' shapes), one fused call per device."""
        out: dict[int, Tensor] = {}
        if not index:
            return out
        by_dev: dict[torch.device, list[int]] = {}
        for i in index:
            by_dev.setdefault(self.params[i].device, []).append(i)
        for device, idx in by_dev.items():
            d = self._delta(device) if delta is None else delta.to(device)
            if torch.compiler.is_compiling():
                ws = torch.ops.modeopt.mode_form([self.params[i] for i in idx], [self.a[i] for i in idx],
                                                 [self.labels[i] for i in idx], d)
            else:
                ws = kernels.form([self.params[i] for i in idx], [self.a[i] for i in idx],
                                  [self.labels[i] for i in idx], d)
            out.update(zip(idx, ws))
        return out

    def current(self) -> list[Tensor]:
        """Per embedded parameter, the values the model computes with now (``names`` order): the stored
        tensor itself for a float32 weight, a new formed tensor for a half-precision one."""
        formed = self._form(self.half)
        return [formed.get(i, p.detach()) for i, p in enumerate(self.params)]

    # ------------------------------------------------ saved tensors of a forward (half precision)
    def _enter_saving(self, formed: dict[int, Tensor]) -> None:
        """Until :meth:`_exit_saving`: an operation that saves a formed weight (or a view of it) for
        backward saves a token instead, and the backward forms the weight again (no second copy of the
        weights outlives the forward). Chains to saved-tensor hooks already active (e.g. save_on_cpu)."""
        if self._saving is not None:  # nested forward (a submodule called by hand inside the root's)
            self._formed_at.update({w.untyped_storage().data_ptr(): i for i, w in formed.items()})
            return
        if torch._C._current_graph_task_id() != -1:
            return  # in backward (activation checkpointing re-runs a forward): its own hooks are in charge
        self._formed_at = {w.untyped_storage().data_ptr(): i for i, w in formed.items()}
        delta = {w.device: self._delta(w.device) for w in formed.values()}
        outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
        ctx = torch.autograd.graph.saved_tensors_hooks(functools.partial(_pack, self, delta, outer),
                                                       functools.partial(_unpack, self, outer))
        ctx.__enter__()
        self._saving = ctx

    def _exit_saving(self) -> None:
        if self._saving is not None:
            ctx, self._saving = self._saving, None
            ctx.__exit__(None, None, None)
        self._formed_at = {}

    def _restore(self) -> None:
        for mod, attr, p in self._swapped:
            mod._parameters[attr] = p
        self._swapped.clear()
        self._active = False
        self._exit_saving()

    def _root_pre(self, module, args):
        if not self._active and (self.half or torch.is_grad_enabled()):
            self._swap(self._owners, self._groups)
            self._root_owned = True
        else:
            self._root_owned = False

    def _root_post(self, module, args, output):
        if self._root_owned:
            self._restore()
            self._root_owned = False

    def _owner_pre(self, module, args):
        # Runs when a submodule is called on its own (or re-run by activation checkpointing).
        if not self._active and (self.half or torch.is_grad_enabled()):
            self._swap([module])
            self._swapped_by = module

    def _owner_post(self, module, args, output):
        if self._swapped_by is module:
            self._restore()
            self._swapped_by = None

    # ------------------------------------------------------------- update
    @torch.no_grad()
    def sync(self, finite_only: bool = False) -> bool:
        """Write ``w += a * (r - r_in_weights)[m]`` into every float32 embedded weight (one pass per
        device), and set ``r_in_weights`` to ``r``: the half-precision weights, formed from their
        frozen base in each forward, then follow it without a pass (module docstring).

        Never synchronises with the host: it does not test whether ``r`` moved (a zero change is a
        pass that writes the values the weights already hold). Returns True (a pass ran).

        Args:
            finite_only: apply the change only if every element of ``r`` is finite, decided on r's
                device (M-sized ``torch.where``, no host sync): otherwise the weights and
                ``r_in_weights`` stay as they are. Used before each closure evaluation of a step, where a
                non-finite ``r`` is only undone after the base step returns.
        """
        r = self.r_full().detach()
        if finite_only:
            ok = torch.isfinite(r).all()
            r = torch.where(ok, r, self.r_in_weights)
        delta = r - self.r_in_weights
        for device, index in self._by_device:
            # non_blocking only towards an accelerator: a CPU kernel must not read a copy in flight
            d = delta if device == delta.device else delta.to(device, non_blocking=device.type != "cpu")
            kernels.update([self.params[i] for i in index], [self.a[i] for i in index],
                           [self.labels[i] for i in index], d)
        self.r_in_weights.copy_(r)
        return True

    def group_values(self, full: Tensor) -> list[Tensor]:
        """Split an ``(M,)`` tensor in mode order into the group tensors' order (like ``r_params``)."""
        return [full[idx] for idx in self._group_modes]

    @torch.no_grad()
    def set_weights(self, values: Sequence[Tensor]) -> None:
        """Copy ``values`` (one tensor per embedded parameter, in ``names`` order, any shape with the
        parameter's number of elements) into the embedded weights, in place.

        Only the stored weights change: ``a``, the modes, ``r`` and ``r_in_weights`` do not, so the
        weights are then no longer ``a * r_in_weights[m] + b`` for the old ``b`` - their ``b`` is
        whatever the new values imply, and later :meth:`sync` calls move them from there. The
        half-precision weights are re-based first (:meth:`rebase`), so their new values are exact.
        """
        values = list(values)
        if self.half:
            self.rebase()
        for p, v in zip(self.params, values):
            p.copy_(v.reshape(p.shape))

    @torch.no_grad()
    def rebase(self) -> None:
        """Write the current values of the half-precision weights into their parameters and set
        ``r_base = r_in_weights``: the model computes the same function (their formed value is then
        their base itself), but later steps are measured from here (each re-base rounds once more)."""
        if not self.half:
            return
        for device, idx in self._half_by_device:
            formed = self._form(idx)
            for i in idx:
                self.params[i].copy_(formed[i])
        self.r_base.copy_(self.r_in_weights)

    # --------------------------------------------- checkpoint entries of the half-precision bases
    def base_state(self) -> dict[str, Any]:
        """What a checkpoint needs beyond ``model.state_dict()`` (current values) to resume bit for bit:
        ``{"r_base": (M,) copy, "base": {index: the frozen parameter itself (no copy)}}``."""
        return {"r_base": self.r_base.clone(), "base": {i: self.params[i].detach() for i in self.half}}

    def check_base_state(self, saved: Any, what: str = "the checkpoint") -> None:
        """Raise ``ValueError`` unless ``saved`` (from :meth:`base_state`) fits this space; changes nothing."""
        check_base_state(saved, self.names, self.params, self.n_modes, what)

    @torch.no_grad()
    def load_base_state(self, saved: Mapping[str, Any] | None) -> None:
        """Take :meth:`base_state` (checked by :meth:`check_base_state`); ``None`` (a checkpoint written
        before half-precision weights had bases) means the parameters hold ``r_in_weights``."""
        if saved is None:
            self.r_base.copy_(self.r_in_weights)
            return
        self.r_base.copy_(saved["r_base"].to(self.r_base.device))
        for i, t in saved["base"].items():
            self.params[i].copy_(t)

    def has_grad(self) -> bool:
        """Whether any of the mode scalars ``r`` holds a gradient now (``.grad`` not None): False
        after ``zero_grad(set_to_none=True)`` or when no backward reached them since."""
        return any(p.grad is not None for p in self.r_params)

    # A copy of a model in mode space (copy.deepcopy, torch.save + torch.load of the whole module)
    # carries a copy of its mode space: same weights, same function. Nothing drives it, though: only
    # CMDOptimizer.step() writes a change of r into the weights, so another optimizer training the
    # copy's r would move nothing. Say so once, at the first backward that reaches the copy's r.
    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__dict__["_copied"] = True

    def _notice_copy_trained(self) -> None:
        if self.__dict__.get("_copied") and not self.__dict__.get("_warned_copy"):
            self._warned_copy = True
            warnings.warn(
                "modeopt: a gradient reached the mode scalars r of a *copy* of a model in mode space "
                "(copy.deepcopy or a pickled module). The copy computes the same function, but its weights "
                "follow r only through CMDOptimizer.step() of the optimizer that embedded them: training the "
                "copy's r with another optimizer changes nothing. To train a copy, call opt.export() first (or "
                "load the copy's state_dict() into a fresh model) and give it its own optimizer", stacklevel=2)


def check_base_state(saved: Any, names: Sequence[str], params: Sequence[Tensor], n_modes: int,
                     what: str = "the checkpoint") -> None:
    """Raise ``ValueError`` unless ``saved`` (:meth:`ModeSpace.base_state`) fits the embedded ``params``
    (their half-precision ones hold the bases) and ``n_modes``; changes nothing."""
    half = [i for i, p in enumerate(params) if p.dtype in HALF_DTYPES]
    if not isinstance(saved, Mapping) or not {"r_base", "base"} <= set(saved):
        raise ValueError(f"{what}'s half-precision base entry is not a dict with 'r_base' and 'base': damaged")
    rb = saved["r_base"]
    if (not isinstance(rb, Tensor) or tuple(rb.shape) != (n_modes,) or not rb.is_floating_point()
            or not bool(torch.isfinite(rb).all())):
        raise ValueError(f"{what}'s r_base is not a finite floating-point ({n_modes},) tensor: damaged")
    base = saved["base"]
    if not isinstance(base, Mapping) or sorted(base) != half:
        got = sorted(base) if isinstance(base, Mapping) else "?"
        raise ValueError(f"{what} holds frozen half-precision bases for the embedded tensors {got}, this model's "
                         f"half-precision embedded tensors are {half}: the model's dtypes differ from the saved "
                         "run's; build (or cast) it to the same dtype before loading")
    for i, t in base.items():
        p = params[i]
        if not isinstance(t, Tensor) or tuple(t.shape) != tuple(p.shape) or t.dtype != p.dtype:
            raise ValueError(f"{what}'s frozen base of {names[i]} is not a {p.dtype} tensor of shape "
                             f"{tuple(p.shape)}: damaged, or from a model of another dtype")


def _pack(space: ModeSpace, delta: dict, outer, t: Tensor):
    """Saved-tensor pack hook while a forward with formed half-precision weights runs: a formed weight
    (or a view of it) becomes ``(index, delta, size, stride, offset)``; anything else goes to the
    hooks that were active before (or is kept as it is)."""
    i = space._formed_at.get(t.untyped_storage().data_ptr()) if t.dtype in HALF_DTYPES else None
    if i is not None:
        return _Formed(i, delta[t.device], tuple(t.size()), tuple(t.stride()), t.storage_offset())
    return t if outer is None else _Outer(outer[0](t))


def _unpack(space: ModeSpace, outer, packed):
    if isinstance(packed, _Formed):
        w = space._form([packed.index], packed.delta)[packed.index]
        return w.as_strided(packed.size, packed.stride, packed.offset)
    if isinstance(packed, _Outer):
        return outer[1](packed.value)
    return packed


class _Formed:
    """A formed weight saved for backward: formed again from the frozen base when unpacked."""
    __slots__ = ("index", "delta", "size", "stride", "offset")

    def __init__(self, index: int, delta: Tensor, size: tuple, stride: tuple, offset: int):
        self.index, self.delta, self.size, self.stride, self.offset = index, delta, size, stride, offset


class _Outer:
    """What the saved-tensor hooks active before ours packed."""
    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


def _current_values(space: ModeSpace, module, state_dict, prefix: str, local_metadata) -> None:
    """State-dict post-hook of a module owning half-precision embedded weights: their current values."""
    mine = [(attr, i) for attr, i in space._owners.get(module, ()) if space._is_half[i]
            and prefix + attr in state_dict]
    if mine:
        formed = space._form([i for _, i in mine])
        for attr, i in mine:
            state_dict[prefix + attr] = formed[i]


def _load_current_values(space: ModeSpace, module, state_dict, prefix: str, local_metadata, strict,
                         missing_keys, unexpected_keys, error_msgs) -> None:
    """Load-state-dict pre-hook of a module owning half-precision embedded weights: the values are
    current ones. Equal to the current values (a checkpoint of this run, loaded after the optimizer's):
    the frozen base is kept, so the run resumes bit for bit. Otherwise the space is re-based first
    (:meth:`ModeSpace.rebase`): the values loaded then are exactly the weights' new values."""
    mine = [(prefix + attr, i) for attr, i in space._owners.get(module, ()) if space._is_half[i]
            and prefix + attr in state_dict]
    if not mine:
        return
    formed = space._form([i for _, i in mine])
    rebased = False
    for key, i in mine:
        v = state_dict[key]
        p = space.params[i]
        same = (isinstance(v, Tensor) and v.shape == p.shape and v.dtype == p.dtype
                and torch.equal(v.detach().to(p.device), formed[i]))
        if same:
            state_dict[key] = p.detach()  # copied onto itself: the base stays
        elif not rebased:
            space.rebase()
            rebased = True


def _drop_r(space: ModeSpace, module, state_dict, prefix: str, local_metadata) -> None:
    """State-dict post-hook of the module that holds ``r``: checkpoints never hold it."""
    for name in space.r_names:
        state_dict.pop(prefix + name, None)


def _r_not_missing(space: ModeSpace, module, incompatible_keys) -> None:
    """Load-state-dict post-hook: checkpoints never hold ``r`` (see :func:`_drop_r`), so a strict load
    must not ask for it."""
    keep = [k for k in incompatible_keys.missing_keys
            if not any(k == n or k.endswith("." + n) for n in space.r_names)]
    incompatible_keys.missing_keys[:] = keep
