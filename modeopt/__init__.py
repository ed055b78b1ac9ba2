"""modeopt: train neural networks in a tiny mode space (Correlation Mode Decomposition).

Public API:

* :class:`CMDOptimizer` - wraps a torch optimizer: warm-up, then training of M mode scalars.
* :class:`BlockwiseCMD` - fine-tuning one block (layer) at a time, each then kept moving in its own modes.
* :class:`OnlineCMD` / :class:`OnlineCMDOptimizer` - a shadow CMD model kept exact during ordinary
  training (like EMA/SWA), and gradual embedding.
* :func:`decompose` / :class:`Decomposition` - post-hoc CMD of a weight trajectory.
* :class:`Trajectory` / :class:`TrajectoryRecorder` - record and load weight trajectories.
* :class:`ParamLayout` - which rows of a flat vector are which named tensor.

Submodules: ``modeopt.distributed.ddp`` (DDP, torchrun, HF Trainer on several processes),
``modeopt.cmd_optimizer.federated`` (FedAvg in mode space), ``modeopt.analysis`` (studying training runs),
``modeopt.integrations.hf`` (the ``Trainer`` callback), ``modeopt.integrations.lightning`` (PyTorch
Lightning callbacks).
"""

from modeopt.blockwise.optimizer import BlockwiseCMD
from modeopt.decomposition.algorithm import Decomposition, decompose
from modeopt.trajectories.layout import ParamLayout
from modeopt.online.shadow import OnlineCMD
from modeopt.online.optimizer import OnlineCMDOptimizer
from modeopt.cmd_optimizer.optimizer import CMDOptimizer
from modeopt.trajectories.snapshots import TrajectoryRecorder
from modeopt.trajectories.trajectory import Trajectory

__all__ = ["CMDOptimizer", "BlockwiseCMD", "OnlineCMD", "OnlineCMDOptimizer", "decompose", "Decomposition", "Trajectory", "TrajectoryRecorder", "ParamLayout"]
__version__ = "0.1.0"
