"""Argument checks shared by the optimizers and the analysis: each says what was wrong and what to do."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["check_int", "check_base_class", "check_no_duplicates", "short_names", "describe"]


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> None:
    """Raise ``ValueError`` unless ``value`` is an ``int`` (not a ``bool``) in ``[minimum, maximum]``."""
    if (not isinstance(value, int) or isinstance(value, bool)
            or (minimum is not None and value < minimum) or (maximum is not None and value > maximum)):
        if minimum is not None and maximum is not None:
            want = f"an integer in [{minimum}, {maximum}]"
        elif minimum is not None:
            want = f"an integer >= {minimum}"
        elif maximum is not None:
            want = f"an integer <= {maximum}"
        else:
            want = "an integer"
        raise ValueError(f"{name} must be {want}, got {value!r}")


def check_base_class(base: torch.optim.Optimizer) -> None:
    """Refuse at construction the base optimizers that cannot train the mode scalars r (a 1-D dense vector)."""
    muon = getattr(torch.optim, "Muon", None)
    if muon is not None and isinstance(base, muon):
        raise TypeError(
            "torch.optim.Muon updates only 2-D matrices, but in mode space the trainable parameters are the mode "
            "scalars r, a vector: wrap an element-wise optimizer (AdamW, SGD, ...) in CMDOptimizer for the "
            "parameters you put in mode space, and train the matrices you keep out of it with a separate Muon")
    if isinstance(base, torch.optim.SparseAdam):
        raise TypeError(
            "torch.optim.SparseAdam takes only sparse gradients, but the gradient of the mode scalars r is dense: "
            "use Adam/AdamW (with nn.Embedding(sparse=False)), or SGD/Adagrad, which take the embedding's sparse "
            "gradients in warm-up and r's dense ones after the switch")


def check_no_duplicates(model: nn.Module, base: torch.optim.Optimizer) -> None:
    """Refuse a base optimizer that lists a parameter twice (torch only warns, and would step it twice)."""
    names = {id(p): n for n, p in model.named_parameters()}
    group_of: dict[int, int] = {}
    for gi, group in enumerate(base.param_groups):
        for p in group["params"]:
            if id(p) in group_of:
                where = f"param group {gi}" if group_of[id(p)] == gi else f"param groups {group_of[id(p)]} and {gi}"
                name = names.get(id(p), f"of shape {tuple(p.shape)}")
                raise ValueError(f"the base optimizer lists the parameter {name!r} twice ({where}): give each "
                                 "parameter to the base optimizer once")
            group_of[id(p)] = gi


def short_names(names: Sequence[str], k: int = 5) -> str:
    """The first ``k`` names, comma-separated, and how many more there are."""
    return ", ".join(names[:k]) + (f", ... (+{len(names) - k})" if len(names) > k else "")


def describe(x: Any) -> str:
    """What ``x`` is, for an error message about a damaged checkpoint: dtype and shape of a tensor, else its type."""
    if isinstance(x, Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"
