"""Making an optimizer wrapper a real ``torch.optim.Optimizer`` that *shares* the base optimizer's
``param_groups``, ``state`` and ``defaults`` (the same objects, always).

The base's ``load_state_dict`` replaces its group dicts; a copy held by the wrapper would then go
stale silently (the SAM-wrapper bug), so these are properties that read through to the base.
``Optimizer.__init__`` assigns them before the base is known: until then they live on the instance.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["SharesBaseOptimizer"]


class SharesBaseOptimizer(torch.optim.Optimizer):
    """Subclass this, and call :meth:`_init_shared` instead of ``Optimizer.__init__``."""

    def _init_shared(self, base: torch.optim.Optimizer) -> None:
        self.__dict__["base"] = None
        # Optimizer.__init__ sets up hooks and patches step; its temporary groups (copies) are
        # discarded once the base is attached.
        torch.optim.Optimizer.__init__(self, [dict(g) for g in base.param_groups], base.defaults)
        self.__dict__["base"] = base

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
        if self.__dict__.get("base") is None:  # Optimizer.__init__ building its temporary copy
            return super().add_param_group(param_group)
        raise RuntimeError(f"add param groups to the base optimizer before wrapping it in {type(self).__name__}: "
                           "the wrapper plans its work from the groups it sees at construction")
