"""Which parameters :class:`~modeopt.CMDOptimizer` embeds, and its param groups kept as wrapped.

The switch to mode space, re-clustering and export rebuild every param group of the base optimizer
from the groups seen at construction (``_orig_params``), in place (the same list objects: LR
schedulers and wrappers hold the dicts). So a group added, grown or with a tensor replaced behind
the wrapper's back is refused before any work, by size and by identity.

:class:`ParamGroupGuard` is a mixin of ``CMDOptimizer``: it reads the optimizer's ``base``,
``model``, ``phase``, ``space`` and ``n_modes``, and sets ``_orig_params``, ``_emb_names``,
``_emb_params``, ``_emb_group``, ``_layout`` and ``_group_sizes``.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn

from modeopt.utils.checks import short_names
from modeopt.trajectories.layout import ParamLayout

__all__ = ["ParamGroupGuard", "Exclude", "exclusion_predicate", "forget_whole_set_state"]

#: What ``CMDOptimizer(exclude=...)`` takes: a predicate ``f(name, param) -> bool``, name patterns, or None.
Exclude = Callable[[str, nn.Parameter], bool] | Sequence[str] | None


def forget_whole_set_state(base: torch.optim.Optimizer) -> None:
    """Tell an optimizer that keeps whole-parameter-set state that its params lists changed (in place)."""
    if isinstance(base, torch.optim.LBFGS):
        # LBFGS keeps its curvature history (vectors over all params) under the first parameter
        # and caches the total size in _numel_cache: both describe the old parameter set. Its
        # params list is the group's own (changed in place), but torch has no public way to drop
        # the cached size (it re-reads it only when the cache is None), hence this one write.
        base._numel_cache = None
        base.state.clear()


def exclusion_predicate(exclude: Exclude) -> Callable[[str, nn.Parameter], bool]:
    """``exclude`` as a predicate ``f(name, param)``: a callable as is, ``None`` excludes nothing, a
    pattern or list of ``fnmatch`` patterns matches parameter names."""
    if callable(exclude):
        return exclude
    if exclude is None:
        return lambda n, p: False
    patterns = [exclude] if isinstance(exclude, str) else exclude
    if not isinstance(patterns, (list, tuple, set, frozenset)) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"exclude must be a predicate f(name, param) or a list of fnmatch patterns (e.g. "
                        f"['*.bias', 'head.*']), got {exclude!r}")
    patterns = list(patterns)
    return lambda n, p: any(fnmatch.fnmatchcase(n, pat) for pat in patterns)


class ParamGroupGuard:
    """The selection of embedded parameters and the checks that the param groups did not change."""

    # ----------------------------------------------------------- selection
    def _select(self, exclude: Exclude) -> None:
        """Decide once which parameters get embedded, and remember every group's params."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        excluded = exclusion_predicate(exclude)
        self._orig_params: list[list[nn.Parameter]] = []
        emb: list[tuple[str, nn.Parameter]] = []
        self._emb_group: list[int] = []
        frozen, nonfloat = [], []
        for gi, group in enumerate(self.base.param_groups):
            self._orig_params.append(list(group["params"]))
            for p in group["params"]:
                if id(p) not in names:
                    raise ValueError(
                        f"the base optimizer's param group {gi} holds a tensor of shape {tuple(p.shape)} that is "
                        "not a parameter of the model: build the base optimizer on model.parameters()")
                name = names[id(p)]
                if not p.is_floating_point():
                    nonfloat.append(name)
                elif not p.requires_grad:
                    frozen.append(name)
                elif group.get("cmd", True) and not excluded(name, p):
                    emb.append((name, p))
                    self._emb_group.append(gi)
        if frozen:
            warnings.warn(f"modeopt: {len(frozen)} frozen parameter(s) (requires_grad=False) will not be embedded: "
                          f"{short_names(frozen)}", stacklevel=3)
        if nonfloat:
            warnings.warn(f"modeopt: {len(nonfloat)} non-floating-point parameter(s) will not be embedded: "
                          f"{short_names(nonfloat)}", stacklevel=3)
        if not emb:
            raise ValueError("nothing to embed: every parameter of the base optimizer is frozen, non-float or "
                             "excluded (check exclude= and the param groups' 'cmd' flags)")
        self._emb_names = [n for n, _ in emb]
        self._emb_params = [p for _, p in emb]
        self._layout = ParamLayout.from_named_tensors(emb)
        if self.n_modes > self._layout.n:
            raise ValueError(f"n_modes={self.n_modes} > the {self._layout.n} weights to embed: ask for fewer modes")

    @property
    def embedded_names(self) -> list[str]:
        """Names of the parameters that go into mode space."""
        return list(self._emb_names)


    def _current_group_sizes(self) -> list[int]:
        return [len(g["params"]) for g in self.base.param_groups]

    def _check_groups(self) -> None:
        """Refuse, before any work, param groups changed behind the wrapper's back (base.add_param_group).

        The switch, re-clustering and export rebuild every group from the groups seen at construction;
        a group added later would make the switch fail half-way.
        """
        if self.phase == "exported":
            return  # a plain optimizer now: nothing is planned from the groups any more
        sizes = self._current_group_sizes()
        if sizes == self._group_sizes:
            self._check_group_identity()
            return
        if len(sizes) != len(self._group_sizes):
            what = f"{len(sizes)} param groups now, {len(self._group_sizes)} when it was wrapped (base.add_param_group?)"
        else:
            gi = next(i for i, (a, b) in enumerate(zip(sizes, self._group_sizes)) if a != b)
            what = f"param group {gi} holds {sizes[gi]} tensors now, {self._group_sizes[gi]} expected"
        raise RuntimeError(
            f"the base optimizer's param groups changed after it was wrapped in CMDOptimizer ({what}). The switch to "
            "mode space is planned from the groups seen at construction, so this step was refused and nothing was "
            "changed. Give the base optimizer every param group before wrapping it (a group with 'cmd': False "
            "stays out of mode space), or call opt.export() first and go on with a plain optimizer")

    def _check_export_groups(self) -> None:
        """Export restores the groups seen at construction. Groups appended since (base.add_param_group
        in mode space, which the next step refuses and points to export) are kept as they are, if they
        hold none of the model's embedded weights; any other change is refused before anything changes."""
        sizes, want = self._current_group_sizes(), self._group_sizes
        if len(sizes) >= len(want) and sizes[: len(want)] == want:
            own = {id(p) for orig in self._orig_params for p in orig}
            added = [p for g in self.base.param_groups[len(want):] for p in g["params"]]
            if not any(id(p) in own for p in added):
                return
            what = "a param group added since holds a parameter the wrapper embeds or trains"
        else:
            what = (f"the first {len(want)} param groups hold {sizes[: len(want)]} tensors, "
                    f"{want} when mode space was entered")
        raise RuntimeError(
            f"export() cannot restore the base optimizer's param groups: {what}. Nothing was changed (still in mode "
            "space). Undo the change to the groups (e.g. base.param_groups.pop()), call opt.export(), then add the "
            "groups to the now plain optimizer")

    def _check_group_identity(self) -> None:
        """A tensor replaced inside a param group (same count) would be dropped silently when the switch
        (or re-clustering, export) rebuilds the groups: refuse it, by identity, before any work.

        One pass over the groups' tensor ids per step (its cost: docs/optimizer.md). The expected ids: in
        warm-up the groups seen at construction; otherwise those seen at the first step after the
        optimizer itself last changed the groups (it then records new group sizes).
        """
        ids = [id(p) for g in self.base.param_groups for p in g["params"]]
        if self.space is None and self.phase == "warmup":
            want = getattr(self, "_orig_ids", None)
            if want is None:  # the groups seen at construction never change
                want = self._orig_ids = [id(p) for orig in self._orig_params for p in orig]
        else:
            seen = getattr(self, "_group_ids_seen", None)
            if seen is None or seen[0] is not self._group_sizes:
                self._group_ids_seen = (self._group_sizes, ids)
                return
            want = seen[1]
        if ids == want:
            return
        k = next(i for i, (a, b) in enumerate(zip(ids, want)) if a != b)
        gi, pos = 0, k
        while pos >= len(self.base.param_groups[gi]["params"]):
            pos -= len(self.base.param_groups[gi]["params"])
            gi += 1
        p = self.base.param_groups[gi]["params"][pos]
        names = {id(q): n for n, q in self.model.named_parameters()}
        what = repr(names[id(p)]) if id(p) in names else f"a tensor of shape {tuple(p.shape)} that is not the model's"
        raise RuntimeError(
            f"the base optimizer's param groups changed after it was wrapped in CMDOptimizer: param group {gi} holds "
            f"{what} at position {pos}, where it held another tensor. The switch to mode space is planned from the "
            "groups seen at construction (a replaced tensor would be dropped silently), so this step was refused and "
            "nothing was changed. Build the base optimizer on the final parameters before wrapping it, or call "
            "opt.export() first and go on with a plain optimizer")

    def _params_changed(self) -> None:
        """Tell optimizers that keep whole-parameter-set state that the set changed."""
        self._group_sizes = self._current_group_sizes()
        forget_whole_set_state(self.base)

