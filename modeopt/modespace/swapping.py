"""Which tensor a module's forward reads while a model is in mode space: the forward hooks that swap
the embedded parameters for stand-ins (or the autograd function's outputs) and restore them afterwards;
see :mod:`modeopt.modespace.space` for why the entries are written directly.

In an eager forward every embedded weight that needs another tensor (half-precision ones always,
every one when autograd records) gets a stand-in (:class:`~modeopt.modespace.on_use.FormedOnUse`)
that hands each operation reading it the weight formed then and/or its ReadThrough output, the
group's node made at that first use (so its backward runs right after its readers' and no weight
gradient waits for the whole backward). The root's pre-hook swaps every owner module's entries at once:
a module may read another's weight without calling it (a tied head, ``nn.MultiheadAttention`` reading
``out_proj.weight``), and the stand-ins cost nothing to put there. Under ``torch.compile`` (which does
not trace the stand-in's ``__torch_function__``), or with ``ModeSpace.FORM_ON_USE = False``, the
ReadThrough nodes are made and the half weights formed when the forward starts, kept until it ends.
A submodule called on its own (or re-run by activation checkpointing in backward) swaps its own."""

from __future__ import annotations

import torch
from torch import Tensor

from modeopt.modespace.on_use import Use, on_use as on_use_stand_in
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
            # Stand-ins (on_use's docstring): every half weight; with autograd, every weight. An operation
            # reading one gets its group's ReadThrough node made at that first use (the nodes made above
            # run after the whole backward: they serve only custom Functions handed a stand-in as it is).
            if grad:
                self._lazy = (r, {i: index for index in groups for i in index}, {})
            out_of = {i: on_use_stand_in(self, i, out_of.get(i))
                      for index in groups for i in index if grad or self._is_half[i]}
        for mod in modules:
            for attr, i in self._owners[mod]:
                if i in out_of:
                    # direct entry, as torch.nn.utils.parametrize: setattr takes only nn.Parameter (module docstring)
                    mod._parameters[attr] = out_of[i]
                    self._swapped.append((mod, attr, self.params[i]))
        self._active = True

    def _use(self, i: int) -> Tensor:
        """What an operation reading embedded tensor ``i``'s stand-in gets (:mod:`modeopt.modespace.on_use`): a
        half-precision weight formed now (a new tensor; with autograd entering the graph through
        :class:`~modeopt.modespace.on_use.Use`, and saved for backward as a token, :meth:`_enter_saving`);
        with autograd, a float32 weight's ReadThrough output (a view); else the parameter itself."""
        grad = self._lazy is not None and torch.is_grad_enabled()
        p = self.params[i]
        if not self._is_half[i]:
            return self._via(i) if grad else p
        w = self._form([i], None if self._deltas is None else self._deltas.get(p.device))[i]
        if not grad:
            return w
        self._note_formed(i, w)
        return Use.apply(self._via(i), w)

    def _via(self, i: int) -> Tensor:
        """Tensor ``i``'s ReadThrough output in this forward, its group's node made at the first use of one of
        the group's tensors (on_use's docstring says why then)."""
        r, group_of, made = self._lazy
        out = made.get(i)
        if out is None:
            index = group_of[i]
            scales = () if self.a_scale is None else [self.a_scale[j] for j in index]
            stash = ([self.a[j] for j in index], [self.labels[j] for j in index], self, scales)
            made.update(zip(index, ReadThrough.apply(r, self.n_modes, stash, 3, *(self.params[j] for j in index))))
            out = made[i]
        return out

    def _restore(self) -> None:
        for mod, attr, p in self._swapped:
            mod._parameters[attr] = p
        self._swapped.clear()
        self._active = False
        self._exit_saving()
        self._pinned.clear()
        self._deltas = None
        self._lazy = None

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
