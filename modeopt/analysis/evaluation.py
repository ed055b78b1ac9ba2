"""Accuracy of the recorded weights and of their reconstructions along a trajectory.

The user gives a ``model_factory() -> nn.Module`` (a model of the recorded architecture; its
tensors that were not recorded, e.g. BatchNorm statistics or frozen layers, are used as they
are) and an ``evaluate(model) -> float`` (e.g. test accuracy). ``modeopt analyze --eval NAME``
names one of :data:`BUILTIN_EVALS` or a ``module:function`` returning that pair.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from torch import nn
from tqdm.auto import tqdm

__all__ = ["AccuracyCurves", "accuracy_curves", "BUILTIN_EVALS", "resolve_eval"]

ModelFactory = Callable[[], nn.Module]
Evaluate = Callable[[nn.Module], float]


@dataclass
class AccuracyCurves:
    """``evaluate`` of each model at the evaluated samples.

    Attributes:
        steps: ``(E,)`` steps of the evaluated samples; ``index``: ``(E,)`` their sample indices.
        curves: name -> ``(E,)`` values, e.g. ``{"raw": ..., "CMD, M = 10": ..., "DMD, r = 10": ...}``.
    """

    steps: np.ndarray
    index: np.ndarray
    curves: dict[str, np.ndarray]


def accuracy_curves(
    models: Mapping[str, object],
    evaluate: Evaluate,
    model_factory: ModelFactory,
    *,
    n_samples: int,
    steps: list[int],
    every: int = 1,
    progress: bool | None = None,
) -> AccuracyCurves:
    """Evaluate every model (anything with ``load_into(model, t)``: a Trajectory, Decomposition
    or DMD) at every ``every``-th sample and at the last one.

    Raises:
        ValueError: when the factory's model does not have the recorded tensors.
    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    index = sorted(set(range(0, n_samples, every)) | {n_samples - 1})
    probe = model_factory()
    if not isinstance(probe, nn.Module):
        raise ValueError(f"model_factory() must return an nn.Module, got {type(probe).__name__}")
    curves = {name: np.empty(len(index)) for name in models}
    hide = None if progress is None else not progress
    bar = tqdm(total=len(index) * len(models), desc="evaluating", disable=hide, leave=False)
    for k, t in enumerate(index):
        for name, m in models.items():
            try:
                m.load_into(probe, t)
            except (KeyError, RuntimeError) as e:
                msg = str(e).strip("'\"")
                raise ValueError(f"the evaluation model does not match the trajectory ({msg}): the model factory "
                                 "must build the recorded architecture") from None
            curves[name][k] = float(evaluate(probe))
            bar.update()
    bar.close()
    return AccuracyCurves(steps=np.asarray([steps[t] for t in index]), index=np.asarray(index), curves=curves)


# ---------------------------------------------------------------- built-ins
@functools.lru_cache(maxsize=1)
def mnist_split():
    """``datasets.mnist_subset()``, read once per process (parsing the text file takes seconds)."""
    from ..datasets import mnist_subset

    return mnist_subset()


def _mnist_cnn() -> tuple[ModelFactory, Evaluate]:
    """``modeopt.zoo.SmallCNN()`` scored on the 1,000 held-out digits of ``datasets.mnist_subset()``."""
    from ..zoo import SmallCNN, evaluate

    _, _, xte, yte = mnist_split()
    return SmallCNN, lambda model: evaluate(model, xte, yte)


#: name -> function returning ``(model_factory, evaluate)``.
BUILTIN_EVALS: dict[str, Callable[[], tuple[ModelFactory, Evaluate]]] = {"mnist-cnn": _mnist_cnn}


def resolve_eval(spec: str) -> tuple[ModelFactory, Evaluate]:
    """``(model_factory, evaluate)`` for a built-in name or ``"package.module:function"``."""
    if spec in BUILTIN_EVALS:
        return BUILTIN_EVALS[spec]()
    if ":" not in spec:
        raise ValueError(f"unknown evaluation {spec!r}: use one of {sorted(BUILTIN_EVALS)} or "
                         "'package.module:function' (a function returning (model_factory, evaluate))")
    mod_name, _, attr = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"cannot import {mod_name!r} for --eval {spec}: {e}") from None
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise ValueError(f"{mod_name} has no function {attr!r} (--eval {spec})")
    pair = fn()
    if not (isinstance(pair, tuple) and len(pair) == 2 and all(callable(p) for p in pair)):
        raise ValueError(f"--eval {spec}: {attr}() must return (model_factory, evaluate), two callables")
    return pair
