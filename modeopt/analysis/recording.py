"""Recording a training run for analysis: in memory or one file per snapshot in a directory.

:class:`Recording` snapshots a model every ``k`` optimizer steps or every ``k`` epochs, from a
given step/epoch on, inside any training loop (it is also a context manager). In memory it is a
:class:`~modeopt.TrajectoryRecorder`; with ``directory=`` every snapshot is written to its own
file as soon as it is taken, so a long run needs no RAM for its history, and
:func:`load_snapshots` reads the directory back as a :class:`~modeopt.Trajectory`.

Directory format (``modeopt.snapshots/1``)::

    manifest.json         {"format", "layout": {names, shapes}, "dtype", "unit", "relative"}
    anchor.pt             float32 (N,) first snapshot, only for bf16/fp16 recordings
    snapshot-000000.pt    {"step": int, "epoch": int, "data": (N,) tensor}, one per snapshot

A bf16/fp16 recording stores each snapshot as its movement from the anchor (as the in-memory
recorder does): half precision cannot resolve a small movement of a large weight.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from modeopt.utils import progress as _progress
from modeopt.utils.checks import check_int
from modeopt.trajectories.layout import ParamLayout
from modeopt.trajectories.layout import select_parameters
from modeopt.trajectories.snapshots import TrajectoryRecorder
from modeopt.trajectories.trajectory import Trajectory
from .atomic_files import atomic_save, atomic_write_text

__all__ = ["Recording", "SnapshotWriter", "load_snapshots", "is_snapshot_directory", "recording_options",
           "check_recording", "MANIFEST", "FORMAT"]

FORMAT = "modeopt.snapshots/1"
MANIFEST = "manifest.json"
_SNAPSHOT_RE = re.compile(r"^snapshot-(\d+)\.pt$")
_UNITS = ("step", "epoch")
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
           "float16": torch.float16}


def _dtype_name(dtype: torch.dtype) -> str:
    for name, dt in _DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype}")


class SnapshotWriter:
    """Writes snapshots of named tensors to ``directory``, one file each (atomic renames).

    A directory that already holds snapshots is only reused to resume a training:
    ``resume_from=c`` deletes the snapshots counted after ``c`` (the abandoned continuation of
    the old run) and appends after the others; they must be of the same layout, dtype and unit.

    Args:
        directory: where to write; created if missing.
        layout: the named tensors each snapshot holds.
        dtype: storage dtype; bf16/fp16 store movements from the first snapshot (``anchor.pt``).
        unit: what the snapshots' counters count, ``"step"`` or ``"epoch"``.
        resume_from: the count (step or epoch) a resumed training restarts from.
    """

    def __init__(self, directory: str | os.PathLike, layout: ParamLayout, *, dtype: torch.dtype = torch.float32,
                 unit: str = "step", resume_from: int | None = None):
        if unit not in _UNITS:
            raise ValueError(f"unit must be 'step' or 'epoch', got {unit!r}")
        self.directory = Path(directory)
        self.layout = layout
        self.dtype = dtype
        self.unit = unit
        self.relative = dtype not in (torch.float32, torch.float64)
        manifest = {"format": FORMAT, "layout": layout.to_dict(), "dtype": _dtype_name(dtype), "unit": unit,
                    "relative": self.relative}
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"{self.directory} is a file, not a directory")
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / MANIFEST
        self.anchor: Tensor | None = None
        self.index = 0
        existing = _snapshot_files(self.directory)
        if path.exists():
            old = _read_manifest(self.directory)
            if existing and resume_from is None:
                raise ValueError(f"{self.directory} already holds {len(existing)} snapshots of another recording: "
                                 "record into an empty directory, or pass resume_from=STEP to continue a resumed "
                                 "training")
            for k in ("layout", "dtype", "unit"):
                if old[k] != manifest[k]:
                    what = "a different model (other tensor names or shapes)" if k == "layout" else f"{k}={old[k]!r}"
                    raise ValueError(f"{self.directory} already holds snapshots of {what}: record into an "
                                     "empty directory, or delete the old snapshots")
            for i, p in existing:
                if resume_from is not None and int(_load_snapshot(p)[unit]) > resume_from:
                    p.unlink()  # the old run's future: this training replaces it
                else:
                    self.index = max(self.index, i + 1)
            if self.relative and (self.directory / "anchor.pt").exists():
                self.anchor = torch.load(self.directory / "anchor.pt", weights_only=True)
        elif existing:
            raise ValueError(f"{self.directory} holds snapshot files but no {MANIFEST}: use an empty directory")
        atomic_write_text(path, json.dumps(manifest, indent=1))
        self._flat = torch.empty(layout.n, dtype=torch.float32)

    @torch.no_grad()
    def write(self, tensors: Sequence[Tensor], *, step: int, epoch: int) -> Path:
        """Write one snapshot of ``tensors`` (in layout order); returns its path."""
        flat = self._flat
        for spec, t in zip(self.layout.specs, tensors):
            flat[spec.offset : spec.stop].copy_(t.detach().reshape(-1))
        if self.relative:
            if self.anchor is None:
                anchor = flat.clone()
                atomic_save(anchor, self.directory / "anchor.pt")
                self.anchor = anchor  # only once it is on disk: the snapshots are read relative to it
            data = (flat - self.anchor).to(self.dtype)
        else:
            data = flat.to(self.dtype, copy=True)
        path = self.directory / f"snapshot-{self.index:06d}.pt"
        atomic_save({"step": int(step), "epoch": int(epoch), "data": data}, path)
        self.index += 1
        return path


class Recording:
    """Snapshots a model during any training loop, for analysis (a context manager too).

    Call :meth:`step` after every optimizer step and/or :meth:`epoch` after every epoch; a
    snapshot is taken at every ``every``-th count of ``unit``, from count ``start`` on (counts
    ``start, start + every, ...``). Then :meth:`trajectory`, or
    ``modeopt analyze DIRECTORY`` when recording to a directory.

    Args:
        model: the model whose parameters are recorded.
        every: snapshot period, in ``unit`` (the paper's sub-sampling: every 2nd-4th epoch
            models the weights about as well as every epoch).
        unit: ``"step"`` (counted by :meth:`step`) or ``"epoch"`` (counted by :meth:`epoch`).
        start: first count at which a snapshot may be taken (the paper's "start at epoch e":
            the later part of a training is modelled as well or better).
        initial: also snapshot the weights before training (count 0), when ``start == 0``.
        directory: write one file per snapshot there (see the module doc) instead of keeping
            them in memory. Nothing is kept in RAM but one ``(N,)`` buffer.
        names: which parameters (a list of names, parameters or buffers, or a predicate
            ``f(name, tensor)``); default every trainable floating-point parameter.
        dtype: storage dtype; ``torch.bfloat16`` halves the size (stored as movements from the
            first snapshot).
        max_snapshots: in memory only: keep the latest ``max_snapshots`` (a ring).
        resume_from: the count (step or epoch) a resumed training restarts from: counting
            continues from there and, in a directory, snapshots counted after it are deleted
            (the old run's abandoned continuation) and new ones are appended. Without it a
            directory that already holds snapshots is refused.

    Example::

        with Recording(model, every=1, unit="epoch", directory="runs/cnn") as rec:
            for epoch in range(10):
                for x, y in loader:
                    ...; opt.step()
                    rec.step()
                rec.epoch()
        traj = rec.trajectory()          # or modeopt.analysis.load_snapshots("runs/cnn")
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        every: int = 1,
        unit: str = "step",
        start: int = 0,
        initial: bool = False,
        directory: str | os.PathLike | None = None,
        names: Sequence[str] | Callable[[str, Tensor], bool] | None = None,
        dtype: torch.dtype = torch.float32,
        max_snapshots: int | None = None,
        resume_from: int | None = None,
    ):
        check_recording(every=every, unit=unit, start=start, directory=directory, max_snapshots=max_snapshots,
                        resume_from=resume_from)
        self.model = model
        self.every, self.unit, self.start, self.initial = every, unit, start, initial
        self.directory = None if directory is None else Path(directory)
        self.steps = 0
        self.epochs = 0
        self.n_snapshots = 0
        self._last: int | None = None  # count of the latest snapshot (no duplicates)
        if directory is None:
            self._memory: TrajectoryRecorder | None = TrajectoryRecorder(
                model, names=names, dtype=dtype, max_snapshots=max_snapshots)
            self.layout = self._memory.layout
            self._params: list[Tensor] = []  # the in-memory recorder holds its own
            self._writer: SnapshotWriter | None = None
        else:
            params = select_parameters(model, names)
            self.layout = ParamLayout.from_named_tensors(params)
            self._params = [p for _, p in params]
            self._memory = None
            self._writer = SnapshotWriter(directory, self.layout, dtype=dtype, unit=unit, resume_from=resume_from)
        if resume_from is not None:
            if unit == "step":
                self.steps = resume_from
            else:
                self.epochs = resume_from
            self._last = resume_from  # recorded before the interruption, if it was due
        elif initial and start == 0:
            self.snapshot()

    # ------------------------------------------------------------ context
    def __enter__(self) -> Recording:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Nothing stays open (every snapshot file is complete when written); kept for symmetry."""

    # -------------------------------------------------------------- counts
    @property
    def count(self) -> int:
        """The current count of ``unit``."""
        return self.steps if self.unit == "step" else self.epochs

    def step(self, global_step: int | None = None) -> bool:
        """Count one optimizer step (or set the count to ``global_step``); snapshot if due."""
        self.steps = self.steps + 1 if global_step is None else int(global_step)
        return self._snapshot_if_due("step")

    def epoch(self, epoch: int | None = None) -> bool:
        """Count one finished epoch (or set the count to ``epoch``); snapshot if due."""
        self.epochs = self.epochs + 1 if epoch is None else int(epoch)
        return self._snapshot_if_due("epoch")

    def _snapshot_if_due(self, counted: str) -> bool:
        """Snapshot when ``counted`` is the recording's unit and its count is on the schedule (once per count)."""
        c = self.count
        if counted != self.unit or c < self.start or (c - self.start) % self.every or c == self._last:
            return False
        self.snapshot()
        return True

    @torch.no_grad()
    def snapshot(self) -> None:
        """Record the parameters now, labelled with the current count of ``unit``."""
        if self._writer is not None:
            self._writer.write(self._params, step=self.steps, epoch=self.epochs)
        else:
            self._memory.snapshot(self.count)
        self._last = self.count
        self.n_snapshots += 1

    def trajectory(self, *, progress: bool | None = None) -> Trajectory:
        """The snapshots recorded so far (read back from the directory when there is one)."""
        if self._writer is not None:
            return load_snapshots(self.directory, progress=progress)
        return self._memory.trajectory()


def check_recording(*, every: int, unit: str, start: int, directory, max_snapshots: int | None,
                    resume_from: int | None = None) -> None:
    """Validate :class:`Recording`'s arguments (clear errors before any training)."""
    check_int("every", every, 1)
    if unit not in _UNITS:
        raise ValueError(f"unit must be 'step' or 'epoch', got {unit!r}")
    check_int("start", start, 0)
    if resume_from is not None:
        check_int("resume_from", resume_from, 0)
    if directory is not None and max_snapshots is not None:
        raise ValueError("max_snapshots keeps a ring of snapshots in memory; a directory keeps them all "
                         "(give one of directory= or max_snapshots=)")


def recording_options(**options) -> dict:
    """:class:`Recording`'s keyword arguments ``options`` completed with its defaults and checked,
    for a recording started later (``model`` and ``resume_from`` are not among them).

    Raises:
        TypeError: a name :class:`Recording` does not take, or ``model``/``resume_from``.
        ValueError: as :class:`Recording` would.
    """
    if "model" in options or "resume_from" in options:
        raise TypeError("the model and resume_from= are given when the recording starts, not here")
    sig = inspect.signature(Recording)
    try:
        bound = sig.bind(None, **options)
    except TypeError as e:
        names = [n for n in sig.parameters if n not in ("model", "resume_from")]
        raise TypeError(f"{e}: the options are Recording's keyword arguments ({', '.join(names)})") from None
    bound.apply_defaults()
    args = {k: v for k, v in bound.arguments.items() if k not in ("model", "resume_from")}
    check_recording(every=args["every"], unit=args["unit"], start=args["start"], directory=args["directory"],
                    max_snapshots=args["max_snapshots"])
    return args


# ------------------------------------------------------------------ reading
def is_snapshot_directory(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory written by :class:`Recording` / :class:`SnapshotWriter`."""
    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


def snapshot_unit(directory: str | os.PathLike) -> str:
    """What the snapshots' counters count (``"step"`` or ``"epoch"``)."""
    return _read_manifest(Path(directory))["unit"]


def load_snapshots(
    directory: str | os.PathLike,
    *,
    start: int | None = None,
    stop: int | None = None,
    every: int = 1,
    progress: bool | None = None,
) -> Trajectory:
    """Read a snapshot directory back as a :class:`~modeopt.Trajectory`, oldest first.

    Args:
        start, stop: keep the snapshots whose count (step or epoch) is ``>= start`` and
            ``< stop`` (the later part of a run).
        every: then keep every ``every``-th of them (sub-sampling).
        progress: show a progress bar (``None``: only on a terminal).

    Memory: one ``(T, N)`` tensor of the stored dtype (plus the float32 anchor); each file is
    copied into its row, never stacked.

    Raises:
        ValueError: naming the file, for a directory without snapshots, a snapshot of another
            shape or dtype, or an unreadable file.
    """
    directory = Path(directory)
    check_int("every", every, 1)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory")
    manifest = _read_manifest(directory)
    layout = ParamLayout.from_dict(manifest["layout"])
    dtype = _DTYPES[manifest["dtype"]]
    files = _snapshot_files(directory)
    if not files:
        raise ValueError(f"{directory} has a manifest but no snapshot files (snapshot-NNNNNN.pt): "
                         "was the recording ever due? (check every= and start=)")
    unit = manifest["unit"]
    # Read the counts first (cheap with mmap), to select before reading the values. A count
    # recorded twice (a training resumed from an earlier checkpoint) keeps the later file.
    by_count: dict[int, Path] = {}
    for _, path in files:
        by_count[int(_load_snapshot(path)[unit])] = path
    metas = sorted(((path, c) for c, path in by_count.items()), key=lambda pc: pc[1])
    counts = [c for _, c in metas]
    if start is not None:
        metas = [pc for pc in metas if pc[1] >= start]
    if stop is not None:
        metas = [pc for pc in metas if pc[1] < stop]
    metas = metas[::every]
    if not metas:
        raise ValueError(f"no snapshot of {directory} lies in the window start={start}, stop={stop} "
                         f"(the {unit}s recorded run from {counts[0]} to {counts[-1]})")
    data = torch.empty(len(metas), layout.n, dtype=dtype)
    for row, (path, _) in enumerate(tqdm(metas, desc="reading snapshots", disable=_progress.disable(progress, len(metas), 8),
                                         leave=False)):
        x = _load_snapshot(path)["data"]
        if not isinstance(x, Tensor) or x.dim() != 1 or x.numel() != layout.n:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{path.name} holds {shape} values, but the manifest's model has {layout.n} weights: "
                             f"the directory mixes snapshots of different models")
        if x.dtype != dtype:
            raise ValueError(f"{path.name} is {x.dtype}, the manifest says {manifest['dtype']}: "
                             "the directory mixes recordings")
        data[row] = x
    offset = None
    if manifest["relative"]:
        anchor = directory / "anchor.pt"
        if not anchor.exists():
            raise ValueError(f"{directory} is a {manifest['dtype']} recording without its anchor.pt "
                             "(the float32 first snapshot the others are stored relative to)")
        offset = torch.load(anchor, weights_only=True, map_location="cpu")
    return Trajectory(data, layout, [c for _, c in metas], offset)


def _read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{directory} has no {MANIFEST}: it was not written by modeopt.analysis.Recording") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ValueError(f"{path} is not a modeopt snapshot manifest (format {FORMAT!r})")
    missing = [k for k in ("layout", "dtype", "unit", "relative") if k not in m]
    if missing or m["dtype"] not in _DTYPES:
        raise ValueError(f"{path} is damaged (missing {missing or 'a known dtype'})")
    return m


def _snapshot_files(directory: Path) -> list[tuple[int, Path]]:
    out = []
    for p in directory.iterdir():
        m = _SNAPSHOT_RE.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def _load_snapshot(path: Path) -> dict:
    try:
        d = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file: say which one
        raise ValueError(f"cannot read snapshot {path}: {type(e).__name__}: {e}") from None
    if not isinstance(d, dict) or not {"step", "epoch", "data"} <= set(d):
        raise ValueError(f"{path} is not a modeopt snapshot (expected a dict with step, epoch, data)")
    return d
