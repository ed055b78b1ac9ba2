"""The mechanism: put a model's weights into mode space and take them out again.

In mode space every embedded weight is ``w_i = a_i * r[m(i)] + b_i`` and only the M scalars
``r`` are trainable. The weights are *maintained in place*: each keeps its value in its own
``nn.Parameter`` (``requires_grad=False``), so checkpoints, evaluation and export see plain
tensors. Gradients reach ``r`` through a custom autograd function:

* forward - returns the stored weight itself (a view, no copy, no arithmetic);
* backward - reduces the weight's gradient to ``dL/dr_m = sum_{i in m} a_i dL/dw_i`` with a
  deterministic float64 segment sum (``torch.ops.modeopt.mode_reduce``), so no N-sized gradient
  outlives the layer's backward (in an eager forward the node is made when the weight is first
  read, :mod:`modeopt.modespace.on_use`: a node made earlier would run after the whole backward).

After the optimizer changes ``r``, :meth:`ModeSpace.sync` writes ``w += a * dr[m]`` in place
(``torch.ops.modeopt.mode_update``), without a host synchronisation.

**Half-precision weights** (bfloat16, float16) are not updated in place: they keep their value at
the switch, frozen, and every forward forms them from it, rounded once (:mod:`modeopt.modespace.half`),
each in the operation that reads it (:mod:`modeopt.modespace.on_use`).

Device-generic: ``a`` (``coef_dtype``) and the compact labels (:func:`modeopt.modespace.kernels.label_dtype`)
live on each weight's device (with ``coef_dtype=torch.int8``: 8-bit codes, a float32 scale per tensor
and mode, and labels packed 4 bits per weight for ``M <= 16``; :mod:`modeopt.modespace.kernels.encoding`); ``r`` and ``r_in_weights`` on the first embedded weight's device.
The autograd function takes only tensors and ints, so ``torch.compile(model, fullgraph=True)``
traces the hooks, the swap and the backward (the operator is opaque to it).

Which tensor a module's forward reads is switched by forward hooks: while a module that owns
embedded weights (or the root model) runs, its ``_parameters[name]`` entry holds a stand-in (eager:
:class:`~modeopt.modespace.on_use.FormedOnUse`) or the function's output (compiled) instead of the bare
parameter, and it is restored afterwards (also when forward raises).
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
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from modeopt.modespace import kernels
from modeopt.modespace.half import HALF_DTYPES, HalfPrecision, check_base_state, current_values, load_current_values
from modeopt.modespace.swapping import Swapping

__all__ = ["ModeSpace", "HALF_DTYPES", "check_base_state", "check_not_in_mode_space"]


def check_not_in_mode_space(model: nn.Module, r_prefix: str = "modeopt_r") -> None:
    """``RuntimeError`` if ``model`` already holds mode scalars named ``<r_prefix>*`` (it is in mode space)."""
    if any(n.rsplit(".", 1)[-1].startswith(r_prefix) for n, _ in model.named_parameters()):
        raise RuntimeError(f"the model is already in mode space (it has {r_prefix}* parameters)")


class ModeSpace(Swapping, HalfPrecision):
    """The model in mode space: which weights are embedded, their ``a`` and modes, and ``r``.

    Args:
        model: the model (its modules get forward hooks; its last module gets ``modeopt_r*`` parameters).
        params: the embedded parameters, ``(name, param)``.
        labels: per parameter, the mode of each element (any integer dtype, flat), in ``[0, M)``.
        a: per parameter, the coefficient of each element (flat).
        r_groups: which param group each mode's scalar belongs to: ``(M,)`` int.
        r_init: ``(M,)`` initial mode values.
        coef_dtype: storage of ``a``: float32; bfloat16 (the model is then exactly ``a_bf16 * r + b``); or
            int8, the compact encoding (:mod:`modeopt.modespace.kernels.encoding`): 8-bit codes ``q`` with
            a float32 scale per (tensor, mode), the model exactly ``q * scale * r + b``, and labels
            packed 4 bits per weight when ``M <= 16`` (1.5 bytes per weight with the codes).
        a_scale: only with ``coef_dtype=torch.int8``: per parameter the ``(M,)`` scales of codes
            given in ``a`` (int8), as a saved mode space holds them; None quantises float ``a``.
        r_prefix: name of the ``r`` parameters (``<r_prefix><j>``); mode spaces with different prefixes
            may hold disjoint parameters of one model at the same time (one per block, see
            :class:`~modeopt.BlockwiseCMD`).

    Attributes:
        names, params: the embedded parameters (``requires_grad=False`` while in mode space).
        labels: per parameter, ``(numel,)`` compact mode labels on its device (:meth:`mode_index` gives int64),
            or ``(ceil(numel / 2),)`` uint8 packed two per byte (``coef_dtype=torch.int8``, ``M <= 16``).
        a: per parameter, ``(numel,)`` coefficients in ``coef_dtype`` on its device (int8: codes;
            :meth:`coefficients` gives the float32 values they stand for).
        a_scale: per parameter, ``(M,)`` float32 scales of the codes (``coef_dtype=torch.int8``), else None.
        coef_dtype: the storage of ``a``.
        n_modes: M. ``r_groups``: ``(M,)`` int64 on the CPU. ``groups``: the param groups that hold modes.
        r_params, r_names: one ``modeopt_r<j>`` parameter per group in ``groups``, holding that group's
            modes ``r_groups == g`` in increasing order; :meth:`r_full` is ``(M,)`` in mode order.
        r_owner, r_owner_name: the module that holds them (the model's last module, or the root).
        r_in_weights: ``(M,)`` the ``r`` the weights currently hold (see :meth:`sync`): the stored float32
            weights, and the formed half-precision ones (what the model computes with, what
            ``model.state_dict()`` gives).
        r_base: ``(M,)`` the ``r`` the frozen bases of the half-precision weights hold (their value at the
            switch, or at the last re-base); unused in a space without them.
        half: the indices of the half-precision (bfloat16/float16) embedded weights.
        requires_grad_before: per parameter, its ``requires_grad`` before, restored by :meth:`remove`.
    """

    PREFIX = "modeopt_r"
    #: weights per autograd node of the root swap (the extra gradient memory it may hold).
    GROUP_ELEMENTS = 1 << 21
    #: bfloat16/float16 weights kept as a frozen base and formed in each forward (exact; module
    #: docstring). False restores the earlier in-place update of every weight (rounding every step):
    #: read when a space is built; for comparisons (benchmarks/half_precision_drift.py) only.
    HALF_FORMED = True
    #: the saved-tensor hooks that re-form a formed weight in backward instead of keeping it (False:
    #: autograd keeps the formed weights, a copy of them until the backward; for comparisons only)
    RECOMPUTE_FORMED = True
    #: each operation that reads a half-precision weight in an eager forward forms it (the formed
    #: tensors live one operation at a time, :mod:`modeopt.modespace.on_use`); False: every one is
    #: formed when the forward starts and kept until it ends (as under torch.compile; comparisons only)
    FORM_ON_USE = True

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
        a_scale: Sequence[Tensor] | None = None,
    ):
        # coef_dtype: storage of a; bf16 halves it. The rounded a is used both by the backward and
        # by the weight update, so the model stays exactly w = a_rounded * r + b.
        check_not_in_mode_space(model, r_prefix)
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
        # kernels.label_dtype; half a byte with the 8-bit encoding for M <= 16), and a in coef_dtype,
        # each on its weight's device.
        if coef_dtype not in (torch.float32, torch.bfloat16, torch.int8):
            raise ValueError(f"ModeSpace: coef_dtype must be torch.float32, torch.bfloat16 or torch.int8, got "
                             f"{coef_dtype!r}")
        if a_scale is not None and coef_dtype != torch.int8:
            raise ValueError("ModeSpace: a_scale is given only with coef_dtype=torch.int8 (int8 codes in a)")
        self.coef_dtype = coef_dtype
        ldt = kernels.label_dtype(self.n_modes)
        self.labels = [lab.reshape(-1).to(ldt).to(p.device).contiguous() for lab, p in zip(labels, self.params)]
        self.a_scale: list[Tensor] | None = None
        if coef_dtype != torch.int8:
            self.a = [x.reshape(-1).to(device=p.device, dtype=coef_dtype).contiguous() for x, p in zip(a, self.params)]
        else:
            self._encode(a, a_scale)
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
        self._is_half = [self.HALF_FORMED and p.dtype in HALF_DTYPES for p in self.params]
        self.half = [i for i, h in enumerate(self._is_half) if h]
        # the in-place (float32) tensors by device (update calls, one per device); the half ones too
        by_dev: dict[torch.device, list[int]] = {}
        half_dev: dict[torch.device, list[int]] = {}
        for i, p in enumerate(self.params):
            (half_dev if self._is_half[i] else by_dev).setdefault(p.device, []).append(i)
        self._by_device = list(by_dev.items())
        self._half_by_device = list(half_dev.items())
        self._saving = None  # the saved-tensor hooks while a forward runs (see _enter_saving)
        # storage address of a formed weight -> (its index, a weak reference to it), in a forward
        self._formed_at: dict[int, tuple] = {}
        self._deltas: dict[torch.device, Tensor] | None = None  # r_in_weights - r_base per device, in a forward
        self._pinned: list[Tensor] = []  # formed weights kept until the forward ends (see swapping)
        self._lazy = None  # in a forward with autograd: (r, group of each tensor, ReadThrough outputs made so far)
        self.requires_grad_before = [p.requires_grad for p in self.params]
        self._owners = self._find_owners(model)
        self._groups = self._group(range(len(self.params)))
        self._active = False
        self._swapped_by: nn.Module | None = None  # the submodule whose own forward swapped (see _owner_pre)
        self._swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
        self._handles: list = []
        self._install()

    def _encode(self, a: Sequence[Tensor], a_scale: Sequence[Tensor] | None) -> None:
        """The 8-bit encoding: ``a`` quantised per (tensor, mode) (or taken as codes with ``a_scale``),
        labels packed two per byte for ``M <= 16``. The weights are not touched: quantising changes only
        the direction each weight moves in (see :mod:`modeopt.modespace.kernels.encoding`)."""
        m = self.n_modes
        if a_scale is None:
            pairs = [kernels.quantize(x.reshape(-1).to(p.device), kernels.as_index(lab), m)
                     for x, lab, p in zip(a, self.labels, self.params)]
            self.a = [q.contiguous() for q, _ in pairs]
            self.a_scale = [sc.contiguous() for _, sc in pairs]
        else:
            if len(a_scale) != len(self.params) or any(x.dtype != torch.int8 for x in a) \
                    or any(tuple(sc.shape) != (m,) or not sc.is_floating_point() for sc in a_scale):
                raise ValueError(f"ModeSpace: with a_scale, a must hold int8 codes and a_scale one ({m},) float "
                                 "tensor per parameter")
            self.a = [x.reshape(-1).to(p.device).contiguous() for x, p in zip(a, self.params)]
            self.a_scale = [sc.to(device=p.device, dtype=torch.float32).contiguous()
                            for sc, p in zip(a_scale, self.params)]
        if kernels.packs_labels(torch.int8, m):
            self.labels = [kernels.pack_labels(lab) for lab in self.labels]

    def mode_index(self) -> list[Tensor]:
        """Per embedded tensor, the mode of each element as int64 (``labels`` may be stored compactly)."""
        return [kernels.as_index(self._plain_labels(j)).to(torch.int64) for j in range(len(self.params))]

    def _plain_labels(self, j: int) -> Tensor:
        """Tensor ``j``'s labels, one per weight (packed ones unpacked)."""
        lab, n = self.labels[j], self.params[j].numel()
        return kernels.unpack_labels(lab, n) if kernels.is_packed(lab, n) else lab

    def coefficients(self) -> list[Tensor]:
        """Per embedded tensor, ``(numel,)`` float32 coefficients: ``a`` itself, or what the 8-bit codes stand
        for (``q * scale[m]``, rounded once to float32)."""
        if self.a_scale is None:
            return [x.to(torch.float32) for x in self.a]
        return [kernels.dequantize(q, sc, idx) for q, sc, idx in zip(self.a, self.a_scale, self.mode_index())]

    def storage_bytes(self) -> dict:
        """Bytes of the per-weight mode-space storage (``a``, labels, scales), read from the tensors
        (:func:`modeopt.modespace.kernels.encoding.storage_bytes`)."""
        from modeopt.modespace.kernels.encoding import storage_bytes

        return storage_bytes(self.a, self.labels, self.a_scale)

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
        self._handles.append(self.r_owner.register_state_dict_post_hook(functools.partial(drop_r_entries, self)))
        self._handles.append(self.r_owner.register_load_state_dict_post_hook(functools.partial(r_never_missing, self)))
        for p in self.params:
            p.requires_grad_(False)
            p.grad = None
        for mod, entries in self._owners.items():
            if any(self._is_half[i] for _, i in entries):
                # state_dict gives, and load_state_dict takes, the current values of the half weights
                self._handles.append(mod.register_state_dict_post_hook(functools.partial(current_values, self)))
                self._handles.append(mod.register_load_state_dict_pre_hook(
                    functools.partial(load_current_values, self)))
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
                           [self.labels[i] for i in index], d,
                           scales=None if self.a_scale is None else [self.a_scale[i] for i in index])
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
        # pickled before half-precision weights were formed (or coefficients encoded): every weight was
        # updated in place, and stays so
        if "_is_half" not in state:
            self.__dict__.update(_is_half=[False] * len(self.params), half=[], _half_by_device=[],
                                 r_base=self.r_in_weights.clone(), _saving=None, _formed_at={})
        self.__dict__.setdefault("_deltas", None)  # pickled before half weights were formed on use
        self.__dict__.setdefault("_pinned", [])
        self.__dict__.setdefault("_lazy", None)
        if "a_scale" not in state:
            self.__dict__.update(a_scale=None, coef_dtype=self.a[0].dtype if self.a else torch.float32)

    def _notice_copy_trained(self) -> None:
        if self.__dict__.get("_copied") and not self.__dict__.get("_warned_copy"):
            self._warned_copy = True
            warnings.warn(
                "modeopt: a gradient reached the mode scalars r of a *copy* of a model in mode space "
                "(copy.deepcopy or a pickled module). The copy computes the same function, but its weights "
                "follow r only through CMDOptimizer.step() of the optimizer that embedded them: training the "
                "copy's r with another optimizer changes nothing. To train a copy, call opt.export() first (or "
                "load the copy's state_dict() into a fresh model) and give it its own optimizer", stacklevel=2)


def drop_r_entries(space: ModeSpace, module, state_dict, prefix: str, local_metadata) -> None:
    """State-dict post-hook of the module that holds ``r``: checkpoints never hold it."""
    for name in space.r_names:
        state_dict.pop(prefix + name, None)


def r_never_missing(space: ModeSpace, module, incompatible_keys) -> None:
    """Load-state-dict post-hook: checkpoints never hold ``r`` (see :func:`drop_r_entries`), so a strict load
    must not ask for it."""
    keep = [k for k in incompatible_keys.missing_keys
            if not any(k == n or k.endswith("." + n) for n in space.r_names)]
    incompatible_keys.missing_keys[:] = keep
