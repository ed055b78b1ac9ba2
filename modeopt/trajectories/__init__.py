"""Layer 1 - weight trajectories: which rows of a flat vector are which tensor (:class:`ParamLayout`),
T snapshots of N weights (:class:`Trajectory`), bounded recording (:class:`SnapshotBuffer`,
:class:`TrajectoryRecorder`), checkpoint files, streaming to a device, and the one T x T reduction."""

from .layout import ParamLayout
from .snapshots import SnapshotBuffer, TrajectoryRecorder
from .trajectory import Trajectory

__all__ = ["ParamLayout", "SnapshotBuffer", "Trajectory", "TrajectoryRecorder"]
