"""An evaluation for ``modeopt analyze --eval examples/mnist_eval.py:evaluation``.

``evaluation()`` returns ``(model_factory, evaluate)``: a fresh ``SmallCNN`` and its accuracy on the
1,000 held-out digits of the MNIST subset (``mnist_subset()``), read once per process.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import nn

from workloads import SmallCNN, evaluate, mnist_subset


@functools.lru_cache(maxsize=1)
def mnist_split():
    """``mnist_subset()``, read once per process (parsing the text file takes seconds)."""
    return mnist_subset()


def evaluation() -> tuple[Callable[[], nn.Module], Callable[[nn.Module], float]]:
    """``(SmallCNN, accuracy on the held-out digits)``."""
    _, _, xte, yte = mnist_split()
    return SmallCNN, lambda model: evaluate(model, xte, yte)
