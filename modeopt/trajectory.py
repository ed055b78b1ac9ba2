"""Weight trajectories: T snapshots of N named weights, and how to record them.

A :class:`Trajectory` stores its samples **time-major**, ``data`` of shape ``(T, N)``,
because snapshots arrive one at a time and each is written as one contiguous row.
:attr:`Trajectory.matrix` is the ``(N, T)`` view that the CMD papers write as ``W``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from .layout import ParamLayout, model_parameters

__all__ = ["Trajectory", "TrajectoryRecorder", "load_state_dict_file"]


class Trajectory:
    """T time samples of N weights, with the names of the tensors the rows come from.

    Args:
        data: ``(T, N)`` floating-point tensor, one row per time sample.
        layout: which rows belong to which named tensor (``None`` for anonymous data).
        steps: ``T`` integers saying when each sample was taken (training steps or
            epochs); defaults to ``0..T-1``.
    """

    def __init__(self, data: Tensor, layout: ParamLayout | None = None, steps: Sequence[int] | None = None):
        if not isinstance(data, Tensor) or data.dim() != 2:
            raise ValueError("Trajectory data must be a (T, N) tensor")
        if layout is not None and layout.n != data.shape[1]:
            raise ValueError(f"layout describes {layout.n} weights but data has {data.shape[1]} columns")
        steps = list(range(data.shape[0])) if steps is None else [int(s) for s in steps]
        if len(steps) != data.shape[0]:
            raise ValueError(f"got {len(steps)} steps for {data.shape[0]} samples")
        self.data = data
        self.layout = layout
        self.steps = steps

    # ----------------------------------------------------------------- shape
    @property
    def matrix(self) -> Tensor:
        """The ``(N, T)`` view: rows are weights, columns time samples."""
        return self.data.T

    @property
    def n_weights(self) -> int:
        return self.data.shape[1]

    @property
    def n_samples(self) -> int:
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
        return Trajectory(self.data[sl], self.layout, self.steps[sl])

    # ----------------------------------------------------------- to a model
    def state_dict_at(self, t: int) -> dict[str, Tensor]:
        """Named tensors of sample ``t`` (negative counts from the end)."""
        if self.layout is None:
            raise ValueError("this trajectory has no layout (it was built from a bare matrix): "
                             "build it with Trajectory.from_state_dicts or a TrajectoryRecorder")
        return self.layout.unflatten(self.data[t])

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
        torch.save(
            {
                "format": "modeopt.trajectory/1",
                "data": self.data,
                "layout": None if self.layout is None else self.layout.to_dict(),
                "steps": self.steps,
            },
            path,
        )

    @classmethod
    def load(cls, path: str | os.PathLike, *, mmap: bool = False) -> Trajectory:
        """Load a trajectory written by :meth:`save` (``mmap=True`` maps it instead of reading it)."""
        d = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        if not isinstance(d, dict) or d.get("format") != "modeopt.trajectory/1":
            raise ValueError(f"{path} is not a trajectory saved by modeopt (Trajectory.save)")
        layout = None if d["layout"] is None else ParamLayout.from_dict(d["layout"])
        return cls(d["data"], layout, d["steps"])


class TrajectoryRecorder:
    """Records snapshots of a model's parameters during any training loop.

    Call :meth:`step` once per optimizer step (it snapshots every ``every`` calls) or
    :meth:`snapshot` whenever you like (e.g. once per epoch); then :meth:`trajectory`.

    Args:
        model: the model whose parameters are recorded.
        every: snapshot period, in calls of :meth:`step`.
        names: which parameters; default all floating-point parameters that require grad.
            A sequence of names, or a predicate ``f(name, param) -> bool``.
        dtype: storage dtype of the snapshots (float32, or bfloat16/float16 to halve memory).
        max_snapshots: keep only the latest ``max_snapshots`` (a ring buffer); ``None`` keeps all.

    Memory: ``min(T, max_snapshots) * N * dtype.itemsize`` bytes.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        every: int = 1,
        names: Sequence[str] | Callable[[str, Tensor], bool] | None = None,
        dtype: torch.dtype = torch.float32,
        max_snapshots: int | None = None,
    ):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if max_snapshots is not None and max_snapshots < 3:
            raise ValueError(f"max_snapshots must be >= 3 (CMD needs 3 samples), got {max_snapshots}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be floating point, got {dtype}")
        params = select_parameters(model, names)
        self.model = model
        self.every = every
        self.dtype = dtype
        self.layout = ParamLayout.from_named_tensors(params)
        self._params = [p for _, p in params]
        self._buffer = SnapshotBuffer(self.layout.n, dtype=dtype, capacity=max_snapshots)
        self._calls = 0

    def step(self) -> bool:
        """Count one training step; snapshot if it is due. Returns whether it snapshotted."""
        self._calls += 1
        if self._calls % self.every == 0:
            self.snapshot(self._calls)
            return True
        return False

    @torch.no_grad()
    def snapshot(self, step: int | None = None) -> None:
        """Record the parameters' current values now (``step`` labels the sample)."""
        row = self._buffer.next_row()
        for spec, p in zip(self.layout.specs, self._params):
            row[spec.offset : spec.stop].copy_(p.detach().reshape(-1))
        self._buffer.commit(self._calls if step is None else step)

    @property
    def n_snapshots(self) -> int:
        return len(self._buffer)

    def trajectory(self) -> Trajectory:
        """The recorded samples, oldest first (a copy)."""
        data, steps = self._buffer.ordered()
        return Trajectory(data, self.layout, steps)

    def clear(self) -> None:
        self._buffer.clear()


class SnapshotBuffer:
    """Rows of N values appended one at a time, optionally a ring of ``capacity`` rows.

    With a capacity the storage is allocated once and rows are overwritten in place;
    without one it grows by doubling (amortised O(1) per snapshot, no per-step copy).
    """

    def __init__(self, n: int, *, dtype: torch.dtype = torch.float32, capacity: int | None = None):
        self.n = n
        self.dtype = dtype
        self.capacity = capacity
        rows = capacity if capacity is not None else 4
        self.data = torch.empty(rows, n, dtype=dtype)
        self.steps: list[int] = [0] * rows
        self.count = 0  # snapshots committed so far (may exceed capacity)

    def __len__(self) -> int:
        return self.count if self.capacity is None else min(self.count, self.capacity)

    def next_row(self) -> Tensor:
        if self.capacity is None and self.count == self.data.shape[0]:
            grown = torch.empty(2 * self.data.shape[0], self.n, dtype=self.dtype)
            grown[: self.count].copy_(self.data)
            self.data = grown
            self.steps += [0] * self.count
        slot = self.count if self.capacity is None else self.count % self.capacity
        return self.data[slot]

    def commit(self, step: int) -> None:
        slot = self.count if self.capacity is None else self.count % self.capacity
        self.steps[slot] = int(step)
        self.count += 1

    def ordered(self) -> tuple[Tensor, list[int]]:
        """(len, N) rows oldest first, and their steps."""
        k = len(self)
        if self.capacity is None or self.count <= self.capacity:
            return self.data[:k].clone(), self.steps[:k]
        start = self.count % self.capacity
        order = list(range(start, self.capacity)) + list(range(start))
        return self.data[order], [self.steps[i] for i in order]

    def clear(self) -> None:
        self.count = 0

    def state_dict(self) -> dict:
        data, steps = self.ordered()
        return {"data": data, "steps": steps}

    def load_state_dict(self, state: Mapping) -> None:
        data, steps = state["data"], list(state["steps"])
        if data.dim() != 2 or data.shape[1] != self.n:
            raise ValueError(f"snapshot buffer of {self.n} weights cannot load data of shape {tuple(data.shape)}")
        k = data.shape[0]
        if self.capacity is not None and k > self.capacity:
            raise ValueError(f"{k} saved snapshots exceed the capacity {self.capacity}")
        if self.capacity is None:
            self.data = torch.empty(max(4, k), self.n, dtype=self.dtype)
            self.steps = [0] * self.data.shape[0]
        self.data[:k].copy_(data)
        self.steps[:k] = steps
        self.count = k


# ---------------------------------------------------------------- helpers
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


def select_parameters(
    model: nn.Module, names: Sequence[str] | Callable[[str, Tensor], bool] | None
) -> list[tuple[str, Tensor]]:
    """Named parameters chosen by a list of names or a predicate (default: trainable floats)."""
    if names is None:
        params = model_parameters(model, trainable_only=True)
    elif callable(names):
        params = [(n, p) for n, p in model.named_parameters() if names(n, p)]
    else:
        all_named = dict(model.named_parameters())
        all_named.update(dict(model.named_buffers()))
        missing = [n for n in names if n not in all_named]
        if missing:
            raise KeyError(f"not parameters or buffers of the model: {missing}")
        params = [(n, all_named[n]) for n in names]
    bad = [n for n, p in params if not p.is_floating_point()]
    if bad:
        raise ValueError(f"not floating point, cannot be recorded: {bad}")
    if not params:
        raise ValueError("no parameters selected: the model has no trainable floating-point parameters "
                         "(pass names=... to choose some)")
    return params


def load_named_into(model: nn.Module, tensors: Mapping[str, Tensor]) -> None:
    """Copy named tensors into the model's parameters/buffers of the same names, in place."""
    targets = dict(model.named_parameters(remove_duplicate=False))
    targets.update(dict(model.named_buffers(remove_duplicate=False)))
    with torch.no_grad():
        for name, value in tensors.items():
            if name not in targets:
                raise KeyError(f"the model has no parameter or buffer named {name!r}")
            targets[name].copy_(value.reshape(targets[name].shape))


def load_state_dict_file(path: str | os.PathLike, *, key: str | None = None) -> dict[str, Tensor]:
    """Read a state dict from a ``torch.save`` file, a ``.safetensors`` file or an HF model directory.

    ``key`` selects a nested entry (e.g. ``"model"`` in a training checkpoint); without it a
    checkpoint whose values are not tensors is searched for ``state_dict``/``model_state_dict``/``model``.
    """
    path = Path(path)
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).exists():
                path = path / name
                break
        else:
            raise FileNotFoundError(f"{path} is a directory without model.safetensors or pytorch_model.bin")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj = load_file(str(path))
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if key is not None:
        if key not in obj:
            raise KeyError(f"{path} has no entry {key!r} (it has {sorted(obj)[:10]})")
        obj = obj[key]
    elif isinstance(obj, Mapping) and not all(isinstance(v, Tensor) for v in obj.values()):
        for k in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(k), Mapping):
                obj = obj[k]
                break
        else:
            raise ValueError(f"{path} is not a plain state dict: pass key=... naming the entry that holds it "
                             f"(top-level entries: {sorted(obj)[:10]})")
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} does not hold a state dict")
    return dict(obj)
