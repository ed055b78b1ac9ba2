"""modeopt: train neural networks in a tiny mode space (Correlation Mode Decomposition).

Public API:

* :class:`CMDOptimizer` - wraps a torch optimizer: warm-up, then training of M mode scalars.
* :class:`BlockwiseCMD` - fine-tuning one block (layer) at a time, each then kept moving in its own modes.
* :class:`OnlineCMD` / :class:`OnlineCMDOptimizer` - a shadow CMD model kept exact during ordinary
  training (like EMA/SWA), and gradual embedding.
* :func:`decompose` / :class:`Decomposition` - post-hoc CMD of a weight trajectory.
* :class:`Trajectory` / :class:`TrajectoryRecorder` - record and load weight trajectories.
* :class:`ParamLayout` - which rows of a flat vector are which named tensor.

Submodules: ``modeopt.distributed`` (DDP, torchrun, HF Trainer on several processes),
``modeopt.federated`` (FedAvg in mode space), ``modeopt.analysis`` (studying training runs),
``modeopt.integrations.hf`` (the ``Trainer`` callback).
"""

from .blockwise import BlockwiseCMD
from .decomposition import Decomposition, decompose
from .layout import ParamLayout
from .shadow import OnlineCMD
from .shadow_optimizer import OnlineCMDOptimizer
from .optimizer import CMDOptimizer
from .snapshots import TrajectoryRecorder
from .trajectory import Trajectory

__all__ = ["CMDOptimizer", "BlockwiseCMD", "OnlineCMD", "OnlineCMDOptimizer", "decompose", "Decomposition", "Trajectory", "TrajectoryRecorder", "ParamLayout"]
__version__ = "0.1.0"
