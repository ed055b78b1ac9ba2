"""Studying training dynamics with modes: recording, CMD vs. DMD, figures and reports.

* :class:`Recording` - snapshot a model every k steps/epochs, in memory or one file per snapshot.
* The same inside a Hugging Face ``Trainer``: ``modeopt.integrations.hf.TrajectoryCallback``
  (the one integration point for transformers; ``pip install 'modeopt[hf]'``).
* :func:`load_trajectory` / :func:`load_snapshots` - read a saved run back as a ``Trajectory``.
* :func:`dmd` / :class:`DMD` - exact DMD at rank r, the CMD paper's baseline.
* :func:`analyze` - CMD + DMD of a run, the paper's figures, ``index.html`` / ``report.md``.
* :func:`koopman_spectrum` / :func:`compare_dynamics` - a run's Koopman (DMD) spectrum, and whether
  two runs have the same dynamics (W1 distance between spectra, with a p-value); :func:`compare_groups`
  the same question for two conditions with several runs (seeds) each, by a permutation test over runs.

The command line ``modeopt analyze RUN --modes 10 --out report/`` wraps :func:`analyze`;
``modeopt compare RUN_A RUN_B --out report/`` wraps :func:`compare_dynamics`.
"""

from .dmd import DMD, dmd
from .group_test import GroupComparison, compare_groups
from .evaluation import AccuracyCurves, accuracy_curves, resolve_eval
from .io import load_trajectory
from .comparison import DynamicsComparison
from .koopman import KoopmanSpectrum, koopman_spectrum
from .null_test import compare_dynamics
from .spectrum_matching import spectrum_distance
from .recording import Recording, SnapshotWriter, is_snapshot_directory, load_snapshots
from .report import Report, analyze
from .stats import (
    CorrelationData, LayerDistribution, ProfileBands, ReconstructionErrors, WeightExamples,
    correlation_data, layer_distribution, profile_bands, reconstruction_errors, weight_examples,
)

__all__ = [
    "Recording", "SnapshotWriter", "load_snapshots", "load_trajectory", "is_snapshot_directory",
    "DMD", "dmd", "analyze", "Report",
    "koopman_spectrum", "compare_dynamics", "compare_groups", "GroupComparison", "spectrum_distance", "KoopmanSpectrum", "DynamicsComparison",
    "correlation_data", "profile_bands", "layer_distribution", "reconstruction_errors", "weight_examples",
    "CorrelationData", "ProfileBands", "LayerDistribution", "ReconstructionErrors", "WeightExamples",
    "accuracy_curves", "AccuracyCurves", "resolve_eval",
]


def __getattr__(name: str):
    if name == "TrajectoryCallback":  # the analysis layer does not import the integrations above it
        raise AttributeError("TrajectoryCallback lives in modeopt.integrations.hf (one integration point per "
                             "framework): from modeopt.integrations.hf import TrajectoryCallback")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
