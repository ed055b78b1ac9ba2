"""modeopt: train neural networks in a tiny mode space (Correlation Mode Decomposition).

Public API:

* :class:`CMDOptimizer` - wraps a torch optimizer: warm-up, then training of M mode scalars.
* :func:`decompose` / :class:`Decomposition` - post-hoc CMD of a weight trajectory.
* :class:`Trajectory` / :class:`TrajectoryRecorder` - record and load weight trajectories.
* :class:`ParamLayout` - which rows of a flat vector are which named tensor.
"""

from .decomposition import Decomposition, decompose
from .layout import ParamLayout
from .optimizer import CMDOptimizer
from .trajectory import Trajectory, TrajectoryRecorder

__all__ = ["CMDOptimizer", "decompose", "Decomposition", "Trajectory", "TrajectoryRecorder", "ParamLayout"]
__version__ = "0.1.0"
