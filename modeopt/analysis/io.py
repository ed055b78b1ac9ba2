"""Reading a saved training run, whatever form it was saved in, as one :class:`~modeopt.Trajectory`.

Accepted (what ``modeopt analyze`` takes):

* a file written by :meth:`Trajectory.save`;
* a directory written by :class:`~modeopt.analysis.Recording` (``manifest.json`` + one file per
  snapshot);
* a directory of checkpoints (``*.pt``, ``*.pth``, ``*.bin``, ``*.safetensors``, or Hugging Face
  ``checkpoint-N/`` directories), in natural order of their names (``ep2`` before ``ep10``);
* a list of checkpoint files, in natural order of their names (or as given: ``keep_order``).

Checkpoints may be plain state dicts or training checkpoints with a ``model`` / ``state_dict``
entry (see :func:`modeopt.trajectories.trajectory.load_state_dict_file`); every floating-point tensor of the
first one is kept.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from modeopt.utils.checks import check_int
from modeopt.trajectories.layout import ParamLayout
from modeopt.trajectories.checkpoint_files import load_state_dict_file
from modeopt.trajectories.checkpoint_files import why_unreadable as _why_unreadable
from modeopt.trajectories.trajectory import Trajectory
from .recording import is_snapshot_directory, load_snapshots, snapshot_unit

__all__ = ["load_trajectory", "natural_key"]

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
_HF_FILES = ("model.safetensors", "pytorch_model.bin")


def natural_key(path: str | os.PathLike) -> list:
    """Sort key that orders embedded numbers by value: ``ep2`` < ``ep10``."""
    return [int(s) if s.isdigit() else s.lower() for s in re.split(r"(\d+)", Path(path).name)]


def load_trajectory(
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    key: str | None = None,
    keep_order: bool = False,
    start: int | None = None,
    stop: int | None = None,
    every: int = 1,
    progress: bool | None = None,
) -> tuple[Trajectory, str]:
    """Read a saved run (see the module doc) and return ``(trajectory, unit)``.

    Args:
        sources: one path (trajectory file or directory) or several checkpoint paths.
        key: the entry of each checkpoint that holds the state dict, when it is nested.
        keep_order: keep checkpoint files in the order given instead of natural name order.
        start, stop: keep the samples whose step is ``>= start`` and ``< stop``.
        every: then keep every ``every``-th sample.
        progress: show a progress bar (``None``: only on a terminal).

    Returns:
        The trajectory and what its steps count (``"step"``, ``"epoch"`` for epoch recordings).

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: with what to change, for an empty directory, a single checkpoint, files that
            are not checkpoints, or checkpoints of different models.
    """
    check_int("every", every, 1)
    paths = [Path(sources)] if isinstance(sources, (str, os.PathLike)) else [Path(p) for p in sources]
    if not paths:
        raise ValueError("no input given: pass a trajectory file, a snapshot directory or checkpoint files")
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist")
    unit = "step"
    if len(paths) == 1 and is_snapshot_directory(paths[0]):
        traj = load_snapshots(paths[0], start=start, stop=stop, every=every, progress=progress)
        return traj, snapshot_unit(paths[0])
    if len(paths) == 1 and paths[0].is_dir():
        d = paths[0]
        if any((d / f).is_file() for f in _HF_FILES):
            raise ValueError(f"{d} is a single model checkpoint (save_pretrained directory), not a run: give a "
                             "directory of checkpoints, several checkpoints, or a snapshot directory")
        ckpts = _checkpoints_in(d)
        if not ckpts:
            raise ValueError(f"{d} holds no snapshots and no checkpoints: expected a manifest.json written by "
                             f"modeopt.analysis.Recording, or checkpoint files ({', '.join(CHECKPOINT_SUFFIXES)}) "
                             "or checkpoint-N/ directories")
        traj = _from_checkpoints(sorted(ckpts, key=natural_key), key=key, progress=progress)
    elif len(paths) == 1:
        traj = _load_trajectory_file(paths[0])
    else:
        for p in paths:
            if p.is_dir() and not any((p / f).is_file() for f in _HF_FILES):
                raise ValueError(f"{p} is a directory: with several inputs each must be a checkpoint file "
                                 "or a save_pretrained directory")
        traj = _from_checkpoints(paths if keep_order else sorted(paths, key=natural_key), key=key,
                                 progress=progress)
    return _select(traj, start, stop, every), unit


def _checkpoints_in(d: Path) -> list[Path]:
    out = []
    for p in d.iterdir():
        if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES:
            out.append(p)
        elif p.is_dir() and any((p / f).is_file() for f in _HF_FILES):
            out.append(p)
    return out


def _load_trajectory_file(path: Path) -> Trajectory:
    try:
        return Trajectory.load(path, mmap=True)
    except ValueError as e:
        if "not a trajectory saved by modeopt" in str(e):
            raise ValueError(f"{path} is not a trajectory (Trajectory.save) but a single file: give a snapshot "
                             "directory, a directory of checkpoints, or at least 3 checkpoint files") from None
        raise
    except Exception:  # noqa: BLE001 - legacy (non-zip) files cannot be memory-mapped: read them
        try:
            return Trajectory.load(path)
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"cannot read {path}: {_why_unreadable(path, e)}; expected a trajectory saved by "
                             "Trajectory.save, a snapshot directory or checkpoint files") from None


def _steps_from_names(paths: Sequence[Path]) -> list[int] | None:
    """The last number in each name (``checkpoint-500`` -> 500), if every name has one and they increase."""
    steps = []
    for p in paths:
        nums = re.findall(r"\d+", p.stem if p.is_file() else p.name)
        if not nums:
            return None
        steps.append(int(nums[-1]))
    if any(b <= a for a, b in zip(steps, steps[1:])):
        return None
    return steps


def _read_checkpoint(path: Path, key: str | None) -> dict[str, Tensor]:
    try:
        return load_state_dict_file(path, key=key)
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise ValueError(str(e).strip("'\"")) from None
    except Exception as e:  # noqa: BLE001 - a file torch cannot read: say which, in one line
        raise ValueError(f"cannot read checkpoint {path}: {_why_unreadable(path, e)}") from None


def _from_checkpoints(paths: Sequence[Path], *, key: str | None, progress: bool | None) -> Trajectory:
    """Stack checkpoints into a preallocated ``(T, N)`` float32 tensor (no list of copies)."""
    paths = list(paths)
    first = _read_checkpoint(paths[0], key)
    keys = [k for k, v in first.items() if isinstance(v, Tensor) and v.is_floating_point()]
    if not keys:
        raise ValueError(f"{paths[0]} holds no floating-point tensors")
    layout = ParamLayout(keys, [tuple(first[k].shape) for k in keys])
    data = torch.empty(len(paths), layout.n, dtype=torch.float32)
    layout.flatten(first, out=data[0])
    del first
    hide = None if progress is None and len(paths) >= 8 else (True if progress is None else not progress)
    for i in tqdm(range(1, len(paths)), desc="reading checkpoints", disable=hide, leave=False):
        sd = _read_checkpoint(paths[i], key)
        try:
            layout.flatten(sd, out=data[i])
        except (KeyError, ValueError) as e:
            raise ValueError(f"{paths[i]} does not match {paths[0]}: {str(e).strip(chr(34) + chr(39))} "
                             "(are these checkpoints of the same model?)") from None
    return Trajectory(data, layout, _steps_from_names(paths))


def _select(traj: Trajectory, start: int | None, stop: int | None, every: int) -> Trajectory:
    if start is None and stop is None and every == 1:
        return traj
    idx = [i for i, s in enumerate(traj.steps) if (start is None or s >= start) and (stop is None or s < stop)]
    idx = idx[::every]
    if not idx:
        raise ValueError(f"no sample lies in the window start={start}, stop={stop} "
                         f"(the steps run from {traj.steps[0]} to {traj.steps[-1]})")
    if idx == list(range(idx[0], idx[-1] + 1, every if len(idx) > 1 else 1)):
        return traj.window(idx[0], idx[-1] + 1, every if len(idx) > 1 else 1)
    t = torch.tensor(idx)
    return Trajectory(traj.data[t], traj.layout, [traj.steps[i] for i in idx], traj.offset)
