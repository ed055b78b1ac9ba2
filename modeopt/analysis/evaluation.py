"""Accuracy of the recorded weights and of their reconstructions along a trajectory.

The user gives a ``model_factory() -> nn.Module`` (a model of the recorded architecture; its
tensors that were not recorded, e.g. BatchNorm statistics or frozen layers, are used as they
are) and an ``evaluate(model) -> float`` (e.g. test accuracy). ``modeopt analyze --eval SPEC``
names a function returning that pair: ``package.module:function`` or ``path/to/file.py:function``
(:func:`resolve_eval`; ``examples/mnist_eval.py`` is one).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from modeopt.utils.checks import check_int

__all__ = ["AccuracyCurves", "accuracy_curves", "resolve_eval"]

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
    check_int("every", every, 1)
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


# ---------------------------------------------------------------- --eval SPEC
def resolve_eval(spec: str) -> tuple[ModelFactory, Evaluate]:
    """``(model_factory, evaluate)`` from the function ``spec`` names, called once.

    Args:
        spec: ``"package.module:function"`` (imported) or ``"path/to/file.py:function"`` (a file,
            relative to the working directory, loaded once per process: a file that is already
            imported, e.g. by the script that runs the CLI, is reused).

    Raises:
        ValueError: a malformed spec, a module that cannot be imported, a missing file or
            function, or a function that does not return two callables.
    """
    target, _, attr = spec.rpartition(":")  # the last colon: a Windows path holds one
    if not target or not attr:
        raise ValueError(f"--eval {spec!r}: expected 'package.module:function' or 'path/to/file.py:function' "
                         "(a function returning (model_factory, evaluate))")
    mod = _load_file(target, spec) if target.endswith(".py") or "/" in target or "\\" in target \
        else _import(target, spec)
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise ValueError(f"{target} has no function {attr!r} (--eval {spec})")
    pair = fn()
    if not (isinstance(pair, tuple) and len(pair) == 2 and all(callable(p) for p in pair)):
        raise ValueError(f"--eval {spec}: {attr}() must return (model_factory, evaluate), two callables")
    return pair


def _import(name: str, spec: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ValueError(f"cannot import {name!r} for --eval {spec}: {e}") from None


def _load_file(target: str, spec: str) -> ModuleType:
    """The module of a Python file, executed once per process (registered in ``sys.modules``)."""
    path = Path(target).expanduser().resolve()
    if not path.is_file():
        raise ValueError(f"--eval {spec}: there is no file {target} (looked for {path})")
    for mod in list(sys.modules.values()):
        file = getattr(mod, "__file__", None)
        if file and Path(file).resolve() == path:
            return mod
    name = f"modeopt_eval_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise ValueError(f"--eval {spec}: {target} is not a Python file")
    mod = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = mod
    try:
        loader_spec.loader.exec_module(mod)
    except ImportError as e:
        del sys.modules[name]
        raise ValueError(f"cannot load {target} for --eval {spec}: {e}") from None
    except BaseException:
        del sys.modules[name]
        raise
    return mod
