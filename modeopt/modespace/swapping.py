"""Which tensor a module's forward reads while a model is in mode space: the forward hooks that swap
the embedded parameters for the autograd function's outputs and restore them afterwards; see
:mod:`modeopt.modespace.space` for why the entries are written directly.

Half-precision weights get a stand-in (:class:`~modeopt.modespace.on_use.FormedOnUse`, an alias of
their ReadThrough output, or of the base without autograd) that each operation reading it forms, so
at most one operation's formed weights are alive at a time. The root's pre-hook swaps every owner
module's entries at once: a module may read another's weight without calling it (a tied head,
``nn.MultiheadAttention`` reading ``out_proj.weight``), and the stand-in cost nothing to put there.
Under ``torch.compile`` (which does not trace the stand-in's ``__torch_function__``) the half weights
are formed when the forward starts and kept until it ends, as with ``ModeSpace.FORM_ON_USE = False``.
A submodule called on its own (or re-run by activation checkpointing in backward) swaps its own."""

from __future__ import annotations

import torch
from torch import Tensor

from modeopt.modespace.on_use import on_use as on_use_stand_in
from modeopt.modespace.read_through import ReadThrough

__all__ = ["Swapping"]


class Swapping:
    """The forward hooks of :class:`~modeopt.modespace.space.ModeSpace` (a mixin: it reads the
    space's ``params``, ``a``, ``labels``, ``a_scale``, ``_owners``, ``_groups``, ``_is_half``,
    ``half``, ``FORM_ON_USE`` and the swap state ``_active``, ``_swapped``, ``_swapped_by``,
    ``_deltas``, ``_pinned``)."""

    def _swap(self, modules, groups=None) -> None:
        if groups is None:
            groups = self._group(sorted({i for mod in modules for _, i in self._owners[mod]}))
        grad = torch.is_grad_enabled()
        compiling = torch.compiler.is_compiling()
        half = [i for index in groups for i in index if self._is_half[i]]
        # Eager: the half-precision weights are formed by each operation that reads them (on_use); under
        # torch.compile (which does not trace the stand-in's __torch_function__) all at once, here.
        on_use = self.FORM_ON_USE and not compiling
        if half and not compiling:
            self._deltas = {d: self._delta(d) for d in {self.params[i].device for i in half}}
        formed = {} if on_use else self._form(half)
        if grad and half and not compiling and self.RECOMPUTE_FORMED:
            self._enter_saving(self._deltas)
            for i, w in formed.items():  # forming all at once: kept for the forward, saved as tokens
                self._note_formed(i, w)
                self._pinned.append(w)
        out_of: dict[int, Tensor] = {}  # a shared parameter gets one output, read by all its owners
        if grad:
            r = self.r_full()
            for index in groups:
                # on_use: the bases themselves (views of them, which the stand-ins alias)
                weights = [formed.get(i, self.params[i]) for i in index]
                scales = () if self.a_scale is None else [self.a_scale[i] for i in index]
                if compiling:  # tensors only, for Dynamo
                    outs = ReadThrough.apply(r, self.n_modes, None, 3 + bool(scales), *weights,
                                              *(self.a[i] for i in index), *(self.labels[i] for i in index), *scales)
                else:
                    stash = ([self.a[i] for i in index], [self.labels[i] for i in index], self, scales)
                    outs = ReadThrough.apply(r, self.n_modes, stash, 3, *weights)
                out_of.update(zip(index, outs))
        else:  # no autograd: only the half-precision weights need another tensor
            out_of = formed
        if on_use:
            out_of.update((i, on_use_stand_in(self, i, out_of.get(i))) for i in half)
        for mod in modules:
            for attr, i in self._owners[mod]:
                if i in out_of:
                    # direct entry, as torch.nn.utils.parametrize: setattr takes only nn.Parameter (module docstring)
                    mod._parameters[attr] = out_of[i]
                    self._swapped.append((mod, attr, self.params[i]))
        self._active = True

    def _restore(self) -> None:
        for mod, attr, p in self._swapped:
            mod._parameters[attr] = p
        self._swapped.clear()
        self._active = False
        self._exit_saving()
        self._pinned.clear()
        self._deltas = None

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
