"""Making an optimizer wrapper a real ``torch.optim.Optimizer`` that *shares* the base optimizer's
``param_groups``, ``state`` and ``defaults`` (the same objects, always).

The base's ``load_state_dict`` replaces its group dicts; a copy held by the wrapper would then go
stale silently, so these are properties that read through to the base.
``Optimizer.__init__`` assigns them before the base is known: until then they live on the instance.

Hooks:

* ``register_state_dict_pre_hook`` / ``..._post_hook`` / ``register_load_state_dict_pre_hook`` /
  ``..._post_hook`` registered on the wrapper fire around the wrapper's ``state_dict()`` and
  ``load_state_dict()`` with torch's semantics (a subclass's own ``state_dict`` / ``load_state_dict``
  are wrapped once, in ``__init_subclass__``; a nested ``super()`` call does not fire them twice).
  Hooks registered on the base fire when the base's part is saved or loaded, with the base.
* Step hooks: the wrapper's ``step`` calls the base's public ``step`` (:meth:`_base_step`), so two
  optimizers step, as with torch's own ``ZeroRedundancyOptimizer`` and ``PostLocalSGDOptimizer``:
  the global hooks (``register_optimizer_step_pre_hook``) fire once with the wrapper and once with
  the base, hooks registered on the wrapper fire once (with the wrapper), hooks registered on the
  base fire once (with the base), and LR schedulers built on either see their optimizer step.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

__all__ = ["SharesBaseOptimizer", "check_model_and_base"]


def _with_state_dict_hooks(fn):
    @functools.wraps(fn)
    def state_dict(self):
        if self.__dict__.get("_modeopt_in_state_dict"):  # a subclass's super().state_dict()
            return fn(self)
        self.__dict__["_modeopt_in_state_dict"] = True
        try:
            for hook in self._optimizer_state_dict_pre_hooks.values():
                hook(self)
            sd = fn(self)
            for hook in self._optimizer_state_dict_post_hooks.values():
                result = hook(self, sd)
                if result is not None:
                    sd = result
            return sd
        finally:
            self.__dict__["_modeopt_in_state_dict"] = False

    state_dict._modeopt_hooked = True
    return state_dict


def _with_load_state_dict_hooks(fn):
    @functools.wraps(fn)
    def load_state_dict(self, state_dict):
        if self.__dict__.get("_modeopt_in_load_state_dict"):
            return fn(self, state_dict)
        self.__dict__["_modeopt_in_load_state_dict"] = True
        try:
            state_dict = state_dict.copy()  # shallow, as torch does: a hook may edit its top level
            for hook in self._optimizer_load_state_dict_pre_hooks.values():
                result = hook(self, state_dict)
                if result is not None:
                    state_dict = result
            out = fn(self, state_dict)
            for hook in self._optimizer_load_state_dict_post_hooks.values():
                hook(self)
            return out
        finally:
            self.__dict__["_modeopt_in_load_state_dict"] = False

    load_state_dict._modeopt_hooked = True
    return load_state_dict


class SharesBaseOptimizer(torch.optim.Optimizer):
    """Subclass this, and call :meth:`_init_shared` instead of ``Optimizer.__init__``.

    In ``step``, call :meth:`_base_step` to step the base optimizer.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name, wrap in (("state_dict", _with_state_dict_hooks), ("load_state_dict", _with_load_state_dict_hooks)):
            fn = cls.__dict__.get(name)
            if fn is not None and not getattr(fn, "_modeopt_hooked", False):
                setattr(cls, name, wrap(fn))

    def _init_shared(self, base: torch.optim.Optimizer) -> None:
        self.__dict__["base"] = None
        # Optimizer.__init__ sets up hooks and patches step; its temporary groups (copies) are
        # discarded once the base is attached.
        torch.optim.Optimizer.__init__(self, [dict(g) for g in base.param_groups], base.defaults)
        self.__dict__["base"] = base

    # torch's Optimizer pickles only defaults/state/param_groups: a copy of a wrapper would lose its base
    # and everything it planned. The whole instance is its state.
    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def _shared(self, name: str):
        base = self.__dict__.get("base")
        return self.__dict__[f"_init_{name}"] if base is None else getattr(base, name)

    def _set_shared(self, name: str, value) -> None:
        base = self.__dict__.get("base")
        if base is None:
            self.__dict__[f"_init_{name}"] = value
        else:
            setattr(base, name, value)

    param_groups = property(lambda self: self._shared("param_groups"),
                            lambda self, v: self._set_shared("param_groups", v))
    state = property(lambda self: self._shared("state"), lambda self, v: self._set_shared("state", v))
    defaults = property(lambda self: self._shared("defaults"), lambda self, v: self._set_shared("defaults", v))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Refused (``RuntimeError``) once the base is attached: add groups to the base before wrapping it."""
        if self.__dict__.get("base") is None:  # Optimizer.__init__ building its temporary copy
            return super().add_param_group(param_group)
        raise RuntimeError(f"add param groups to the base optimizer before wrapping it in {type(self).__name__}: "
                           "the wrapper plans its work from the groups it sees at construction")

    def _base_step(self, closure=None):
        """The base optimizer's step, through its public ``step`` (its hooks and schedulers see it)."""
        return self.base.step() if closure is None else self.base.step(closure)


def check_model_and_base(model: object, base_optimizer: object) -> None:
    """``TypeError`` unless ``model`` is an ``nn.Module`` and ``base_optimizer`` a plain ``torch.optim.Optimizer``
    (a mode-space optimizer wrapped again would train the same parameters twice)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(base_optimizer, SharesBaseOptimizer):
        raise TypeError(f"base_optimizer is already a {type(base_optimizer).__name__}: wrap the plain torch.optim "
                        "optimizer (built on model.parameters()) once")
    if not isinstance(base_optimizer, torch.optim.Optimizer):
        raise TypeError(f"base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer).__name__}")
