"""Exact half-precision weights in mode space: a frozen base, formed in every forward.

bfloat16 and float16 embedded weights are not updated in place: rounding every step's
change to 8 (bf16) or 11 (fp16) significant bits loses the small changes and accumulates the
rest's rounding (``benchmarks/half_precision_drift.py``). Their parameter keeps its value at the
switch, frozen (the *base*, with ``r_base``, the ``r`` it holds), and every forward that reads it
gets the weight formed out of place, ``w = round(base + a * (r_in_weights - r_base)[m])`` - summed
in float32 and rounded once to the weight's dtype (``torch.ops.modeopt.mode_form``) - like LoRA's
frozen base, so each weight is within half an ulp of its exact mode-space value after any number
of steps. No byte more per weight is kept, and a formed tensor lives only as long as the operation
that reads it: during a forward the weight's ``_parameters`` entry holds a stand-in
(:class:`~modeopt.modespace.on_use.FormedOnUse`, the base's storage) that hands each operation
consuming it the weight formed then (:meth:`~modeopt.modespace.swapping.Swapping._use`), whoever reads it (its module, a
parent reading a child's weight directly, a custom autograd function); under ``torch.compile`` every
half weight is formed when the forward starts instead. Autograd does not keep the formed weights for
backward either: while the root forward runs, a saved-tensor hook stores a formed weight (or a view
of it, or a stand-in) saved by an operation as a small token and forms it again when the backward
unpacks it. ``model.state_dict()`` gives the formed (current) values under the original
keys; ``load_state_dict`` and :meth:`ModeSpace.set_weights` take current values (an exact re-base:
``base = value``, ``r_base = r_in_weights``); :meth:`ModeSpace.remove` writes the formed values into
the parameters. Reading a half-precision ``module.weight`` outside the model's (or its module's)
forward gives the frozen base: use ``model.state_dict()`` or :meth:`ModeSpace.current` for values.

:class:`HalfPrecision` holds what :class:`~modeopt.modespace.space.ModeSpace` does for them (forming,
re-basing, their checkpoint entry, the saved-tensor hooks); the module-level functions are its hooks
(``functools.partial`` objects of them, so a model in mode space pickles).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from modeopt.modespace import kernels
from modeopt.modespace.on_use import FormedOnUse

__all__ = ["HALF_DTYPES", "HalfPrecision", "check_base_state", "current_values", "load_current_values"]

#: Weight dtypes kept as a frozen base and formed in each forward.
HALF_DTYPES = (torch.bfloat16, torch.float16)


class HalfPrecision:
    """The half-precision part of :class:`~modeopt.modespace.space.ModeSpace` (a mixin: it reads the
    space's ``params``, ``a``, ``a_scale``, ``labels``, ``r_in_weights``, ``r_base``, ``half``,
    ``_is_half``, ``_half_by_device``, ``_saving``, ``_formed_at`` and ``_deltas``)."""

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
            scales = [] if self.a_scale is None else [self.a_scale[i] for i in idx]
            args = ([self.params[i] for i in idx], [self.a[i] for i in idx], [self.labels[i] for i in idx], d)
            if torch.compiler.is_compiling():
                ws = torch.ops.modeopt.mode_form(*args, scales)
            else:
                ws = kernels.form(*args, scales)
            out.update(zip(idx, ws))
        return out

    def current(self) -> list[Tensor]:
        """Per embedded parameter, the values the model computes with now (``names`` order): the stored
        tensor itself for a float32 weight, a new formed tensor for a half-precision one."""
        formed = self._form(self.half)
        return [formed.get(i, p.detach()) for i, p in enumerate(self.params)]

    # ------------------------------------------------ saved tensors of a forward (half precision)
    def _enter_saving(self, devices) -> None:
        """Until :meth:`_exit_saving`: an operation that saves a formed weight (or a view of it) for
        backward saves a token instead, and the backward forms the weight again (no second copy of the
        weights outlives the forward); ``devices``: those of the weights formed. Chains to saved-tensor
        hooks already active (e.g. save_on_cpu)."""
        if self._saving is not None:  # nested forward (a submodule called by hand inside the root's)
            return
        if torch._C._current_graph_task_id() != -1:
            return  # in backward (activation checkpointing re-runs a forward): its own hooks are in charge
        self._formed_at = {}
        delta = {d: self._delta(d) if self._deltas is None or d not in self._deltas else self._deltas[d]
                 for d in devices}
        outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
        ctx = torch.autograd.graph.saved_tensors_hooks(functools.partial(_pack, self, delta, outer),
                                                       functools.partial(_unpack, self, outer))
        ctx.__enter__()
        self._saving = ctx

    def _note_formed(self, i: int, w: Tensor) -> None:
        """While the saving hooks are on: ``w`` is weight ``i`` formed; a tensor saved for backward that
        shares its storage (while ``w`` lives, no other tensor can) is packed as a token. A weak
        reference: once ``w`` is gone its address may be reused by any tensor, which then is not it."""
        if self._saving is not None and w.numel():
            self._formed_at[w.untyped_storage().data_ptr()] = (i, weakref.ref(w))

    def _exit_saving(self) -> None:
        if self._saving is not None:
            ctx, self._saving = self._saving, None
            ctx.__exit__(None, None, None)
        self._formed_at = {}

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


def _pack(space: HalfPrecision, delta: dict, outer, t: Tensor):
    """Saved-tensor pack hook while a forward with formed half-precision weights runs: a formed weight
    (or a view of it) becomes ``(index, delta, size, stride, offset)``, a stand-in
    (:class:`~modeopt.modespace.on_use.FormedOnUse`, of any space) ``(index, delta, None, None, None)``
    (unpacked: the weight formed); anything else goes to the hooks that were active before (or is kept as it is)."""
    if type(t) is FormedOnUse:
        # A stand-in handed to an operation as it is (a custom autograd.Function saving its input): the
        # tensor unpacked in backward would be a plain alias of the frozen base, so it is formed then.
        own = t.modeopt_space  # (another mode space's, with several on one model)
        d = delta.get(t.device) if own is space else None
        return _Formed(own, t.modeopt_index, own._delta(t.device) if d is None else d, None, None, None)
    if t.dtype in HALF_DTYPES:
        entry = space._formed_at.get(t.untyped_storage().data_ptr())
        if entry is not None and entry[1]() is not None and t.dtype == space.params[entry[0]].dtype:
            d = delta.get(t.device)
            if d is None:  # a stand-in kept from another forward, on a device this one does not form on
                d = space._delta(t.device)
            return _Formed(space, entry[0], d, tuple(t.size()), tuple(t.stride()), t.storage_offset())
    return t if outer is None else _Outer(outer[0](t))


def _unpack(space: HalfPrecision, outer, packed):
    if isinstance(packed, _Formed):
        w = packed.space._form([packed.index], packed.delta)[packed.index]
        return w if packed.size is None else w.as_strided(packed.size, packed.stride, packed.offset)
    if isinstance(packed, _Outer):
        return outer[1](packed.value)
    return packed


class _Formed:
    """A formed weight saved for backward: formed again from the frozen base when unpacked."""
    __slots__ = ("space", "index", "delta", "size", "stride", "offset")

    def __init__(self, space, index: int, delta: Tensor, size: tuple | None, stride: tuple | None,
                 offset: int | None):
        self.space, self.index, self.delta = space, index, delta
        self.size, self.stride, self.offset = size, stride, offset


class _Outer:
    """What the saved-tensor hooks active before ours packed."""
    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


def current_values(space, module, state_dict, prefix: str, local_metadata) -> None:
    """State-dict post-hook of a module owning half-precision embedded weights: their current values."""
    mine = [(attr, i) for attr, i in space._owners.get(module, ()) if space._is_half[i]
            and prefix + attr in state_dict]
    if mine:
        formed = space._form([i for _, i in mine])
        for attr, i in mine:
            state_dict[prefix + attr] = formed[i]


def load_current_values(space, module, state_dict, prefix: str, local_metadata, strict,
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
