"""Embedded weights read through a stand-in during a forward: half-precision ones formed by each
operation that reads them, and every weight's autograd node made when it is first read.

While a model in mode space runs its forward, the ``_parameters`` entry of each embedded weight holds a
:class:`FormedOnUse` (a tensor with the parameter's storage, shape, dtype and device: no copy) whose
``__torch_function__`` hands every operation that consumes it what that operation must read
(:meth:`~modeopt.modespace.swapping.Swapping._use`):

* a bfloat16/float16 weight *formed* from its frozen base (``round(base + a * (r_in_weights - r_base)[m])``).
  The formed tensor lives as long as that operation (or what it returns, e.g. a view ``w.t()``) holds
  it: at most one operation's weights are formed at a time, instead of every half-precision weight of
  the model for the whole forward. An operation that saves it for backward saves a token (the
  saved-tensor hooks of :mod:`modeopt.modespace.half`), so the backward forms it again;
* with autograd, the output of the weight's :class:`~modeopt.modespace.read_through.ReadThrough` node
  (float32 weights: a view of the parameter; half ones enter the graph through :class:`Use`, which hands
  the formed weight's gradient to it). The node of a group of weights is made when one of them is first
  read, not when the forward starts: autograd runs the ready node made *last* first, so a node made at
  the start waited for the whole backward and kept every embedded weight's gradient alive until then
  (a full gradient-sized copy of the model); made at first use, it runs right after its readers'.
  The stand-in itself aliases a node made when the forward starts: a custom ``autograd.Function``
  handed the stand-in as it is (its forward runs without autograd, so nothing is substituted at its
  input) sends its gradient there. Only such uses wait for the end of the backward.

Every reader gets the right tensor, whoever it is: the owner module's own forward, a parent that
reads a child's weight directly (``F.linear(x, self.embed.weight)``, tied heads, custom code), a
custom ``autograd.Function`` (its forward's operations form it; its gradient reaches ``r`` through
the stand-in's own autograd history). Reading metadata (shape, dtype, device, ...) forms nothing.
A raw pointer (``data_ptr()``, ``__cuda_array_interface__``, e.g. a Triton kernel launched by hand)
gets one of a formed copy that is kept until the forward ends.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["FormedOnUse", "Use", "on_use"]

_T = torch.Tensor
#: Reads that only need metadata: answered from the base, without forming.
_METADATA = frozenset({
    _T.size, _T.dim, _T.numel, _T.nelement, _T.stride, _T.storage_offset, _T.is_contiguous, _T.is_floating_point,
    _T.is_complex, _T.element_size, _T.get_device, _T.__len__,
    *(getattr(_T, name).__get__ for name in (
        "shape", "dtype", "device", "ndim", "layout", "requires_grad", "is_leaf", "grad_fn", "grad", "is_cuda",
        "is_cpu", "is_sparse", "is_meta", "is_quantized", "itemsize", "nbytes")),
})
#: Reads that return a raw address of the data (an int, holding nothing alive): the formed copy they
#: point into is kept until the forward ends.
_POINTERS = frozenset({_T.data_ptr, _T.__cuda_array_interface__.__get__})


class FormedOnUse(Tensor):
    """A half-precision embedded weight's stand-in during a forward (module docstring).

    Attributes (set by :func:`on_use`): ``modeopt_space`` (the ModeSpace), ``modeopt_index`` (which of its
    embedded tensors).
    """

    modeopt_space: Any
    modeopt_index: int

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        made: dict[int, tuple[FormedOnUse, Tensor]] = {}  # id(stand-in) -> (it, its formed weight): once per call
        args, kwargs = _formed(args, made), _formed(kwargs, made)
        out = func(*args, **kwargs)
        if func in _POINTERS:  # the address must stay valid after this call: keep the copy for the forward
            for z, w in made.values():
                z.modeopt_space._pinned.append(w)
        return out


def _formed(obj, made: dict[int, tuple[FormedOnUse, Tensor]]):
    """``obj`` (an argument: a tensor, or a list/tuple/dict of them, nested) with each FormedOnUse
    replaced by its formed weight (formed once per call, however often the call names it)."""
    if isinstance(obj, FormedOnUse):
        got = made.get(id(obj))
        if got is None:
            got = made[id(obj)] = (obj, obj.modeopt_space._use(obj.modeopt_index))
        return got[1]
    if type(obj) in (list, tuple):
        return type(obj)(_formed(x, made) for x in obj)
    if type(obj) is dict:
        return {k: _formed(v, made) for k, v in obj.items()}
    return obj


class Use(torch.autograd.Function):
    """Forward: the formed weight (a view). Backward: its gradient, handed to ``via`` (the weight's
    ReadThrough output), so it is reduced onto the modes with the rest of its group."""

    @staticmethod
    def forward(ctx, via: Tensor, formed: Tensor) -> Tensor:  # noqa: D401
        """``formed`` as it is (a view; nothing saved)."""
        return formed.view_as(formed)

    @staticmethod
    def backward(ctx, grad: Tensor):
        """The formed weight's gradient, for ``via``."""
        return grad, None


def on_use(space, index: int, via: Tensor | None) -> FormedOnUse:
    """The stand-in for embedded tensor ``index`` of ``space`` (module docstring): an alias of ``via`` (the
    weight's ReadThrough output made when the forward started, carrying its autograd history for a
    custom ``autograd.Function`` handed the stand-in itself) or, without autograd, of the parameter."""
    with torch._C.DisableTorchFunctionSubclass():
        z = (via if via is not None else space.params[index].detach()).as_subclass(FormedOnUse)
    z.modeopt_space, z.modeopt_index = space, index
    return z
