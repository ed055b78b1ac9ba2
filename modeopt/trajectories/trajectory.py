"""Weight trajectories: T snapshots of N named weights.

A :class:`Trajectory` stores its samples **time-major**, ``data`` of shape ``(T, N)``,
because snapshots arrive one at a time and each is written as one contiguous row.
:attr:`Trajectory.matrix` is the ``(N, T)`` view that the CMD papers write as ``W``.
Recording one during training: :class:`~modeopt.TrajectoryRecorder` (``modeopt.trajectories.snapshots``).
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .checkpoint_files import load_state_dict_file, why_unreadable
from .layout import ParamLayout, named_tensors

__all__ = ["Trajectory", "ModelsTrajectory", "as_tensor", "load_named_into"]


class Trajectory:
    """T time samples of N weights, with the names of the tensors the rows come from.

    Args:
        data: ``(T, N)`` floating-point tensor, one row per time sample.
        layout: which rows belong to which named tensor (``None`` for anonymous data).
        steps: ``T`` integers saying when each sample was taken (training steps or
            epochs); defaults to ``0..T-1``.
        offset: optional ``(N,)`` float32 (or bf16/fp16) baseline; the values are then ``data + offset`` in float32.
            Low-precision recordings store movements relative to a baseline this way, because
            bf16/fp16 cannot resolve a small movement of a large weight.
        evict: optional ``f(start, stop)``, called by the streaming passes once they have copied the
            values of weights ``start:stop``: a memory-mapped recording drops those pages from the
            process's resident memory (:meth:`~modeopt.trajectories.snapshots.SnapshotBuffer.evict`).
    """

    def __init__(self, data: Tensor, layout: ParamLayout | None = None, steps: Sequence[int] | None = None,
                 offset: Tensor | None = None, evict: Callable[[int, int], None] | None = None):
        if not isinstance(data, Tensor) or data.dim() != 2:
            raise ValueError("Trajectory data must be a (T, N) tensor")
        if layout is not None and layout.n != data.shape[1]:
            raise ValueError(f"layout describes {layout.n} weights but data has {data.shape[1]} columns")
        if offset is not None and tuple(offset.shape) != (data.shape[1],):
            raise ValueError(f"offset must have shape ({data.shape[1]},), got {tuple(offset.shape)}")
        steps = list(range(data.shape[0])) if steps is None else [int(s) for s in steps]
        if len(steps) != data.shape[0]:
            raise ValueError(f"got {len(steps)} steps for {data.shape[0]} samples")
        self.data = data
        self.layout = layout
        self.steps = steps
        self.offset = offset
        self.evict = evict

    # ----------------------------------------------------------------- shape
    @property
    def matrix(self) -> Tensor:
        """The ``(N, T)`` values: a view of ``data`` (materialised when there is an offset)."""
        if self.offset is None:
            return self.data.T
        return (self.data.to(torch.float32) + self.offset).T

    def rows(self, start: int, stop: int, dtype: torch.dtype | None = None) -> Tensor:
        """Values of weights ``start:stop`` as a ``(stop - start, T)`` tensor."""
        x = self.data[:, start:stop].T
        if self.offset is not None:
            x = x.to(torch.float32) + self.offset[start:stop, None]
        return x if dtype is None else x.to(dtype)

    def cols(self, start: int, stop: int, dtype: torch.dtype | None = None) -> Tensor:
        """Values of weights ``start:stop`` time-major, a ``(T, stop - start)`` tensor (no transpose)."""
        x = self.data[:, start:stop]
        if self.offset is not None:
            x = x.to(torch.float32) + self.offset[start:stop]
        return x if dtype is None else x.to(dtype)

    def take(self, index: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """Values of the weights ``index`` as a ``(len(index), T)`` tensor."""
        # Row by row: indexing a column-sliced view (one tensor of a recording) in one call may read the
        # whole slice; each time row of it is contiguous, so this reads only the K values it needs.
        index = torch.as_tensor(index, dtype=torch.int64)
        if index.dim() == 1:
            rows = []
            for row in self.data:
                rows.append(row.index_select(0, index))
                if self.evict is not None:  # each scattered read maps up to 64 KiB around it (fault-around)
                    self.evict(0, self.n_weights)
            x = torch.stack(rows).T
        else:
            x = self.data[:, index].T
        if self.offset is not None:
            x = x.to(torch.float32) + self.offset[index, None]
        return x if dtype is None else x.to(dtype)

    @property
    def value_dtype(self) -> torch.dtype:
        """The dtype the values are read in: ``data``'s, or float32 when there is an offset."""
        return self.data.dtype if self.offset is None else torch.float32

    @property
    def n_weights(self) -> int:
        """N, the number of weights (columns of ``data``)."""
        return self.data.shape[1]

    @property
    def n_samples(self) -> int:
        """T, the number of time samples (rows of ``data``)."""
        return self.data.shape[0]

    def __len__(self) -> int:
        return self.n_samples

    def __repr__(self) -> str:
        where = f", {len(self.layout)} tensors" if self.layout is not None else ""
        return f"Trajectory(N={self.n_weights}, T={self.n_samples}{where})"

    # ----------------------------------------------------------- sub-windows
    def window(self, start: int | None = None, stop: int | None = None, every: int = 1) -> Trajectory:
        """Samples ``start:stop:every`` (a view), e.g. the later half or every 2nd snapshot."""
        sl = slice(start, stop, every)
        return Trajectory(self.data[sl], self.layout, self.steps[sl], self.offset)

    # ----------------------------------------------------------- to a model
    def state_dict_at(self, t: int) -> dict[str, Tensor]:
        """Named tensors of sample ``t`` (negative counts from the end)."""
        if self.layout is None:
            raise ValueError("this trajectory has no layout (it was built from a bare matrix): "
                             "build it with Trajectory.from_state_dicts or a TrajectoryRecorder")
        row = self.data[t] if self.offset is None else self.data[t].to(torch.float32) + self.offset
        return self.layout.unflatten(row)

    def load_into(self, model: nn.Module, t: int = -1) -> None:
        """Copy sample ``t`` into the model's tensors of the same names (in place)."""
        load_named_into(model, self.state_dict_at(t))

    # ------------------------------------------------------------ factories
    @classmethod
    def from_matrix(cls, matrix, layout: ParamLayout | None = None, steps=None) -> Trajectory:
        """From an ``(N, T)`` tensor or array (rows = weights)."""
        m = as_tensor(matrix)
        if m.dim() != 2:
            raise ValueError(f"a trajectory matrix must be 2-D (N, T), got shape {tuple(m.shape)}")
        return cls(m.T, layout, steps)

    @classmethod
    def from_state_dicts(
        cls,
        state_dicts: Iterable[Mapping[str, Tensor]],
        *,
        keys: Sequence[str] | None = None,
        steps: Sequence[int] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Trajectory:
        """Stack a sequence of state dicts (one per time sample).

        Args:
            keys: which entries to keep; default every floating-point tensor of the first
                state dict (so integer buffers such as ``num_batches_tracked`` are skipped).
            dtype: storage dtype of the trajectory.
        """
        it = iter(state_dicts)
        try:
            first = next(it)
        except StopIteration:
            raise ValueError("no state dicts given: a trajectory needs at least 3 samples") from None
        if keys is None:
            keys = [k for k, v in first.items() if isinstance(v, Tensor) and v.is_floating_point()]
            if not keys:
                raise ValueError("the first state dict holds no floating-point tensors")
        else:
            for k in keys:
                if k not in first:
                    raise KeyError(f"key {k!r} not in the first state dict")
                if not first[k].is_floating_point():
                    raise ValueError(f"key {k!r} is {first[k].dtype}, not floating point: CMD models real-valued weights")
        layout = ParamLayout(list(keys), [tuple(first[k].shape) for k in keys])
        rows = [layout.flatten(first, dtype=dtype)]
        for i, sd in enumerate(it, start=1):
            try:
                rows.append(layout.flatten(sd, dtype=dtype))
            except (KeyError, ValueError) as e:
                raise ValueError(f"state dict {i} does not match the first one: {e}") from None
        return cls(torch.stack(rows), layout, steps)

    @classmethod
    def from_checkpoints(
        cls,
        paths: Iterable[str | os.PathLike],
        *,
        key: str | None = None,
        keys: Sequence[str] | None = None,
        steps: Sequence[int] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Trajectory:
        """From checkpoint files (``torch.save`` / ``.safetensors`` / HF model directories),
        one per time sample, in the order given. See :func:`load_state_dict_file`."""
        paths = list(paths)
        if not paths:
            raise ValueError("no checkpoint files given")
        return cls.from_state_dicts(
            (load_state_dict_file(p, key=key) for p in paths), keys=keys, steps=steps, dtype=dtype
        )

    # --------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the trajectory with ``torch.save`` (tensors and plain values: :meth:`load` reads it
        with ``weights_only=True``)."""
        torch.save(
            {
                "format": "modeopt.trajectory/1",
                "data": self.data,
                "layout": None if self.layout is None else self.layout.to_dict(),
                "steps": self.steps,
                "offset": self.offset,
            },
            path,
        )

    @classmethod
    def load(cls, path: str | os.PathLike, *, mmap: bool = False) -> Trajectory:
        """Load a trajectory written by :meth:`save` (``mmap=True`` maps it instead of reading it)."""
        try:
            d = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            # torch's weights-only refusal spans many lines and advises weights_only=False: wrong here
            # (modeopt never unpickles code). One line, as the CLI's loader says it.
            raise ValueError(f"cannot read {path}: {why_unreadable(path, e)}; expected a trajectory saved by Trajectory.save") from None
        if not isinstance(d, dict) or d.get("format") != "modeopt.trajectory/1":
            raise ValueError(f"{path} is not a trajectory saved by modeopt (Trajectory.save)")
        layout = None if d["layout"] is None else ParamLayout.from_dict(d["layout"])
        return cls(d["data"], layout, d["steps"], d.get("offset"))


def as_tensor(x) -> Tensor:
    """A tensor view of an array-like (numpy arrays and memmaps are not copied)."""
    if isinstance(x, Tensor):
        return x
    import numpy as np

    arr = np.asarray(x)
    if arr.dtype.kind not in "fc":
        raise ValueError(
            f"trajectory values must be floating point, got numpy dtype {arr.dtype}: cast them with .astype('float32')"
        )
    with warnings.catch_warnings():
        # Read-only arrays (np.load(mmap_mode="r")) are fine: nothing here writes to its input.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(arr)



def load_named_into(model: nn.Module, tensors: Mapping[str, Tensor]) -> None:
    """Copy named tensors into the model's parameters/buffers of the same names, in place."""
    targets = dict(named_tensors(model))
    with torch.no_grad():
        for name, value in tensors.items():
            if name not in targets:
                raise KeyError(f"the model has no parameter or buffer named {name!r}")
            targets[name].copy_(value.reshape(targets[name].shape))


class ModelsTrajectory:
    """Mixin for a model of a trajectory (a CMD or DMD fit): given ``layout`` (a :class:`ParamLayout` or
    None) and ``reconstruct(t)`` (the ``(N,)`` modelled weights at sample ``t``), it reads them by name
    and writes them into a model."""

    layout: ParamLayout | None

    def reconstruct(self, t: int | None = None) -> Tensor:
        """The modelled weights: ``(N, T)``, or ``(N,)`` at sample ``t`` only."""
        raise NotImplementedError

    def state_dict_at(self, t: int = -1) -> dict[str, Tensor]:
        """The modelled weights at sample ``t`` as named tensors (needs a layout)."""
        if self.layout is None:
            raise ValueError(f"this {type(self).__name__} has no layout: decompose a Trajectory (not a bare matrix) "
                             "to load reconstructions into a model")
        return self.layout.unflatten(self.reconstruct(t))

    def load_into(self, model: nn.Module, t: int = -1) -> None:
        """Write the modelled weights at sample ``t`` into the model, in place."""
        load_named_into(model, self.state_dict_at(t))
