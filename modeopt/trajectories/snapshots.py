"""Recording weight snapshots in bounded memory: :class:`SnapshotBuffer` and :class:`TrajectoryRecorder`.

The buffer keeps its rows in host memory (RAM, page-locked when recording from a GPU, or a
memory-mapped file whose blocks are reserved up front); the recorder snapshots a model's
parameters into one during any training loop and hands back a :class:`~modeopt.Trajectory`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from modeopt.utils.checks import check_int
from .layout import ParamLayout, select_parameters
from .mapped_files import drop_pages, map_file
from .trajectory import Trajectory

__all__ = ["SnapshotBuffer", "TrajectoryRecorder"]

#: values of a snapshot written at once (256 KiB of float32): the record step adds no more than this to the warm-up
APPEND_CHUNK = 1 << 16


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
        directory: keep the snapshots in a memory-mapped file there instead of in RAM
            (needs ``max_snapshots``).

    Memory: ``min(T, max_snapshots) * N * dtype.itemsize`` bytes, plus ``4 * N`` for the
    float32 baseline when ``dtype`` is bf16/fp16 (snapshots are then stored as movements from
    the first one).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        every: int = 1,
        names: Sequence[str] | Callable[[str, Tensor], bool] | None = None,
        dtype: torch.dtype = torch.float32,
        max_snapshots: int | None = None,
        directory: str | os.PathLike | None = None,
    ):
        check_int("every", every, 1)
        if max_snapshots is not None:
            check_int("max_snapshots", max_snapshots, 3)  # CMD needs 3 samples
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be floating point, got {dtype}")
        params = select_parameters(model, names)
        self.model = model
        self.every = every
        self.dtype = dtype
        self.layout = ParamLayout.from_named_tensors(params)
        self._params = [p for _, p in params]
        self._buffer = SnapshotBuffer(self.layout.n, dtype=dtype, capacity=max_snapshots, directory=directory)
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
        self._buffer.append(self.layout, self._params, self._calls if step is None else step)

    @property
    def n_snapshots(self) -> int:
        """Snapshots held now (at most ``max_snapshots``)."""
        return len(self._buffer)

    def trajectory(self) -> Trajectory:
        """The recorded samples, oldest first (a copy)."""
        data, steps = self._buffer.ordered()
        return Trajectory(data, self.layout, steps, self._buffer.anchor)

    def clear(self) -> None:
        """Drop every recorded snapshot (the storage is kept for the next ones)."""
        self._buffer.clear()


class SnapshotBuffer:
    """Rows of N values appended one at a time, optionally a ring of ``capacity`` rows.

    With a capacity the storage is allocated once (in RAM, or in a memory-mapped file under
    ``directory``) and rows are overwritten in place; without one it grows by doubling
    (amortised O(1) per snapshot). A float32 buffer stores the values; a bf16/fp16 buffer stores
    each snapshot's movement from the first one (:attr:`anchor`: float32, or the weights' own dtype
    when every recorded tensor is bf16 / fp16, which holds their values exactly), because half
    precision cannot resolve a small movement of a large weight.

    Memory: ``rows * N * itemsize`` (+ ``4 * N`` for a float32 anchor, ``2 * N`` for a half one), always
    on the host.

    **Tensors on a GPU.** The rows stay in host memory: page-locked (pinned) when the buffer
    lives in RAM and CUDA is available, so that :meth:`append` copies each tensor from its own
    device with ``copy_(non_blocking=True)`` on that device's current stream (ordered after the
    step that produced the values, and before any later in-place update of them) and records one
    CUDA event per device. Nothing waits on the host per snapshot; :meth:`synchronize` waits for
    the events and every reader (:meth:`raw`, :meth:`ordered`, :meth:`state_dict`, growing the
    storage) calls it first. GPU memory used by a float32 recording: none. A bf16/fp16 recording
    subtracts the anchor on the GPU, one tensor at a time: the anchor slice is copied up (4 B
    per weight of that tensor) and the movement is cast before it is copied down, so GPU memory
    holds ~10 B per weight of the tensor being copied, transiently, and no resident anchor.
    """

    def __init__(self, n: int, *, dtype: torch.dtype = torch.float32, capacity: int | None = None,
                 directory: str | os.PathLike | None = None):
        if directory is not None and capacity is None:
            raise ValueError("a memory-mapped snapshot buffer needs a capacity (max_snapshots)")
        self.n = n
        self.dtype = dtype
        self.capacity = capacity
        self.directory = directory
        self.relative = dtype not in (torch.float32, torch.float64)
        self.anchor: Tensor | None = None
        self.data = self._alloc(capacity if capacity is not None else 4)
        self.steps: list[int] = [0] * self.data.shape[0]
        self.count = 0  # snapshots committed so far (may exceed capacity)
        # Recording from CUDA tensors: storage re-allocated in pinned memory on the first such
        # append (RAM buffers only), and the latest event of the copies still in flight on each
        # (device, stream): a stream runs in order, so the latest one covers the earlier ones.
        self._pin = False
        self._pending: dict = {}

    def _alloc(self, rows: int) -> Tensor:
        if self.directory is None:
            return torch.empty(rows, self.n, dtype=self.dtype)
        return map_file(self.directory, rows * self.n, self.dtype).view(rows, self.n)

    def _new_anchor(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The baseline of a half-precision recording: in the file with the rows under ``directory``."""
        if self.directory is not None:
            return map_file(self.directory, self.n, dtype)
        return torch.empty(self.n, dtype=dtype, pin_memory=self._pin)

    def evict(self, start: int = 0, stop: int | None = None, rows: Sequence[int] | None = None) -> None:
        """Drop the values of weights ``start:stop`` (every row, and the anchor) from this process's
        resident memory; a no-op for a buffer in RAM.

        A memory-mapped recording's pages count in the process's RSS once touched, so a warm-up that
        writes T snapshots and a switch that reads them back would hold the whole file resident. The
        data stays in the file (the kernel's page cache may keep it, reclaimable); the next read
        faults it back in. Called as each chunk of an append is written and, through
        :attr:`Trajectory.evict`, after each chunk a decomposition pass has read. (Copies from a GPU are
        still in flight when an append returns: their pages go at the next read.)
        """
        if self.directory is None:
            return
        stop = self.n if stop is None else stop
        if stop <= start:
            return
        if rows is None:
            rows = range(min(self.count, self.data.shape[0]))
        # A read fault maps the neighbouring pages already in the page cache too (the kernel's
        # "fault-around", 64 KiB by default), so pages just outside a range read are dropped as well.
        item = self.dtype.itemsize
        end = self.data.numel() * item
        for r in rows:
            _drop_range(self.data.data_ptr(), end, (r * self.n + start) * item, (r * self.n + stop) * item)
        if self.anchor is not None:
            item = self.anchor.element_size()
            _drop_range(self.anchor.data_ptr(), self.anchor.numel() * item, start * item, stop * item)

    @property
    def nbytes(self) -> int:
        """Bytes held (RAM or file): the row storage plus the anchor."""
        anchor = 0 if self.anchor is None else self.anchor.numel() * self.anchor.element_size()
        return self.data.numel() * self.data.element_size() + anchor

    def __len__(self) -> int:
        return self.count if self.capacity is None else min(self.count, self.capacity)

    def _slot(self) -> int:
        if self.capacity is None:
            if self.count == self.data.shape[0]:
                self.synchronize()  # the old rows are read: copies into them must have landed
                grown = self._rows(2 * self.data.shape[0])
                grown[: self.count].copy_(self.data)
                self.data = grown
                self.steps += [0] * self.count
            return self.count
        return self.count % self.capacity

    def _rows(self, rows: int) -> Tensor:
        """New row storage: pinned when recording from CUDA into RAM, else :meth:`_alloc`'s."""
        if self._pin:
            return torch.empty(rows, self.n, dtype=self.dtype, pin_memory=True)
        return self._alloc(rows)

    def _pin_storage(self) -> None:
        """First append from a CUDA tensor: move the RAM storage (and anchor) to pinned memory.

        A ``directory`` (memory-mapped) buffer stays where it is: copies into it are then
        synchronous (CUDA stages pageable destinations), which is correct, only slower.
        """
        if self.directory is not None or not torch.cuda.is_available():
            return
        self._pin = True
        if not self.data.is_pinned():
            pinned = torch.empty(self.data.shape, dtype=self.dtype, pin_memory=True)
            used = min(self.count, self.data.shape[0])
            if used:
                pinned[:used].copy_(self.data[:used])
            self.data = pinned
        if self.anchor is not None and not self.anchor.is_pinned():
            self.anchor = self.anchor.pin_memory()

    def synchronize(self) -> None:
        """Wait until every snapshot copied from a GPU has landed in host memory."""
        pending, self._pending = self._pending, {}
        for event in pending.values():
            event.synchronize()

    @torch.no_grad()
    def append(self, layout: ParamLayout, tensors: Sequence[Tensor], step: int) -> None:
        """Record one snapshot of ``tensors`` (laid out by ``layout``) taken at ``step``.

        CPU tensors are copied at once. CUDA tensors are copied asynchronously, each from its
        own device (see the class notes): the host does not wait, and the values are those the
        tensors hold when the device reaches this point of its current stream.
        """
        devices = {t.device for t in tensors if t.device.type == "cuda"}
        if devices and not self._pin:
            self._pin_storage()
        slot = self._slot()
        row = self.data[slot]
        if self.relative and self.anchor is None:
            # The first snapshot's values, exactly: in float32, or in the weights' own dtype when every
            # tensor is bf16 (fp16) - half the bytes, as exact.
            dtypes = {t.dtype for t in tensors}
            own = dtypes.pop() if len(dtypes) == 1 else None
            self.anchor = self._new_anchor(own if own in (torch.bfloat16, torch.float16) else torch.float32)
            if devices:
                for spec, t in zip(layout.specs, tensors):
                    spec.check_shape(t)
                    src = t.detach().reshape(-1)
                    if src.is_cuda:
                        src = src.to(self.anchor.dtype)  # cast on the device: what is stored comes down
                    self.anchor[spec.offset : spec.stop].copy_(src, non_blocking=True)
            else:
                for spec, t in zip(layout.specs, tensors):
                    spec.check_shape(t)
                    src = t.detach().reshape(-1)
                    for i0 in range(0, src.numel(), APPEND_CHUNK):  # a mapped anchor's pages leave as written
                        i1 = min(i0 + APPEND_CHUNK, src.numel())
                        self.anchor[spec.offset + i0 : spec.offset + i1].copy_(src[i0:i1])
                        self.evict(spec.offset + i0, spec.offset + i1, rows=())
        for spec, t in zip(layout.specs, tensors):
            src = t.detach().reshape(-1)
            if src.is_cuda:
                if self.relative:
                    # Movement from the anchor, formed on the device and cast there: the anchor
                    # slice goes up (ordered after its own download on this stream), the
                    # half-precision movement comes down. Transient GPU memory: this tensor only.
                    up = self.anchor[spec.offset : spec.stop].to(src.device, non_blocking=True)
                    src = src.to(torch.float32) - up
                    del up
                    src = src.to(self.dtype)
                row[spec.offset : spec.stop].copy_(src, non_blocking=True)
            elif self.anchor is None and self.directory is None:
                row[spec.offset : spec.stop].copy_(src)
            else:
                # Chunk by chunk: a float32 copy of a whole embedding matrix would be the step's largest
                # allocation, and a memory-mapped row's pages leave the process as soon as they are written.
                anchor = None if self.anchor is None else self.anchor[spec.offset : spec.stop]
                dst = row[spec.offset : spec.stop]
                for i0 in range(0, src.numel(), APPEND_CHUNK):
                    i1 = min(i0 + APPEND_CHUNK, src.numel())
                    dst[i0:i1].copy_(src[i0:i1] if anchor is None else src[i0:i1].to(torch.float32) - anchor[i0:i1])
                    self.evict(spec.offset + i0, spec.offset + i1, rows=(slot,))
        for device in devices:
            stream = torch.cuda.current_stream(device)
            event = torch.cuda.Event()
            event.record(stream)
            self._pending[(stream.device_index, stream.stream_id)] = event
        self.steps[slot] = int(step)
        self.count += 1

    def raw(self) -> tuple[Tensor, list[int]]:
        """The stored rows in storage order (no copy) and their steps.

        Time order does not matter to CMD (correlations and least squares are invariant to a
        common permutation of the samples), so the switch can decompose these directly.
        """
        self.synchronize()
        k = len(self)
        return self.data[:k], self.steps[:k]

    def per_tensor(self, layout: ParamLayout) -> list[Trajectory]:
        """The recording as one :class:`Trajectory` per tensor of ``layout`` (views: nothing is copied), each
        evicting what a streaming pass has read of it (:meth:`evict`)."""
        data, steps = self.raw()
        return [Trajectory(data[:, s.offset : s.stop], ParamLayout([s.name], [s.shape]), steps,
                           None if self.anchor is None else self.anchor[s.offset : s.stop],
                           evict=functools.partial(_evict_from, self, s.offset)) for s in layout.specs]

    def ordered(self) -> tuple[Tensor, list[int]]:
        """(len, N) rows oldest first (a copy), and their steps."""
        self.synchronize()
        k = len(self)
        if self.capacity is None or self.count <= self.capacity:
            return self.data[:k].clone(), self.steps[:k]
        start = self.count % self.capacity
        order = list(range(start, self.capacity)) + list(range(start))
        return self.data[order], [self.steps[i] for i in order]

    def clear(self) -> None:
        """Forget every row and the anchor (the storage is kept); waits for pending copies first."""
        self.synchronize()
        self.count = 0
        self.anchor = None

    def state_dict(self) -> dict:
        """Rows in storage order (views, no copy), their steps, the anchor and the count."""
        data, steps = self.raw()
        return {"data": data, "steps": list(steps), "anchor": self.anchor, "count": self.count}

    def checked_state(self, state: Mapping) -> tuple[dict, list[int]]:
        """Validate a :meth:`state_dict` for this buffer without changing anything.

        Returns the state to load and the steps of the snapshots that hold NaN/inf, which are
        dropped (the rest keep their time order): such a snapshot cannot be modelled, and kept it
        would block every decomposition. Raises ``ValueError`` saying what does not fit.
        """
        if not isinstance(state, Mapping) or not {"data", "steps", "count"} <= set(state):
            raise ValueError("the saved snapshot recording is not a SnapshotBuffer state (expected the keys "
                             "'data', 'steps', 'count', 'anchor'): the checkpoint is damaged or from another program")
        data, steps, count, anchor = state["data"], state["steps"], state["count"], state.get("anchor")
        if not isinstance(data, Tensor) or data.dim() != 2 or data.shape[1] != self.n:
            shape = tuple(data.shape) if isinstance(data, Tensor) else type(data).__name__
            raise ValueError(f"the saved recording holds snapshots of shape {shape}, this one records {self.n} "
                             "weights per snapshot: the checkpoint is from a different model; build the same model "
                             "(same layer sizes) as the saved run")
        if data.dtype != self.dtype:
            raise ValueError(f"the saved snapshots are {data.dtype}, this recording stores {self.dtype}: build it "
                             f"with record_dtype={data.dtype} as the saved run")
        k = data.shape[0]
        if not isinstance(count, int) or isinstance(count, bool) or count < k:
            raise ValueError(f"the saved recording's count {count!r} is not an integer >= its {k} rows: "
                             "damaged checkpoint")
        if self.capacity is not None and k != min(count, self.capacity):
            raise ValueError(f"the saved recording holds {k} snapshots of {count} taken, but a recording of capacity "
                             f"{self.capacity} keeps {min(count, self.capacity)}: build it with the same warm-up "
                             "length, snapshot_every and max_snapshots as the saved run")
        if self.capacity is None and k != count:
            raise ValueError(f"the saved recording holds {k} snapshots but says {count} were taken: damaged checkpoint")
        if not isinstance(steps, (list, tuple)) or len(steps) != k or not all(
                isinstance(s, int) and not isinstance(s, bool) for s in steps):
            raise ValueError(f"the saved recording's steps must be {k} integers, one per snapshot: damaged checkpoint")
        if self.relative and k > 0:
            if not isinstance(anchor, Tensor) or anchor.dtype not in (torch.float32, torch.bfloat16, torch.float16) \
                    or tuple(anchor.shape) != (self.n,):
                raise ValueError(f"a {self.dtype} recording needs its float32 (or bf16/fp16) baseline of shape "
                                 f"({self.n},) (the 'anchor'); the checkpoint's is missing or of another shape: "
                                 "damaged checkpoint")
        elif not self.relative and anchor is not None:
            raise ValueError("a float32/float64 recording has no baseline ('anchor'), but the checkpoint holds one: "
                             f"it was recorded in low precision; build it with that record_dtype")
        finite = torch.isfinite(data).all(dim=1) if k else torch.ones(0, dtype=torch.bool)
        if self.relative and k > 0 and not bool(torch.isfinite(anchor).all()):
            finite = torch.zeros(k, dtype=torch.bool)  # every stored row is relative to a poisoned baseline
        if bool(finite.all()):
            return {"data": data, "steps": list(steps), "count": count, "anchor": anchor}, []
        keep = sorted((int(steps[j]), j) for j in range(k) if bool(finite[j]))
        dropped = sorted(int(steps[j]) for j in range(k) if not bool(finite[j]))
        rows = [j for _, j in keep]
        return {"data": data[rows], "steps": [s for s, _ in keep], "count": len(rows),
                "anchor": anchor if rows else None}, dropped

    def load_state_dict(self, state: Mapping) -> list[int]:
        """Load :meth:`state_dict` (validated by :meth:`checked_state`). Returns the steps of the
        snapshots dropped because they held NaN/inf."""
        state, dropped = self.checked_state(state)
        data, steps, count = state["data"], state["steps"], state["count"]
        k = data.shape[0]
        if self.capacity is None and self.data.shape[0] < k:
            self.data = self._rows(max(4, k))
            self.steps = [0] * self.data.shape[0]
        self.data[:k].copy_(data)
        self.steps[:k] = steps
        self.count = count
        anchor = state.get("anchor")
        self.anchor = None
        if anchor is not None:
            self.anchor = self._new_anchor(anchor.dtype)
            self.anchor.copy_(anchor)
        self.evict()
        return dropped


#: bytes dropped beyond each end of a range read (covers the kernel's fault-around window)
_FAULT_AROUND = 1 << 18


def _drop_range(base: int, size: int, lo: int, hi: int) -> None:
    """Drop bytes ``[lo, hi)`` (widened by :data:`_FAULT_AROUND`, clamped to ``[0, size)``) of the mapping at ``base``."""
    lo, hi = max(0, lo - _FAULT_AROUND), min(size, hi + _FAULT_AROUND)
    if hi > lo:
        drop_pages(base + lo, hi - lo)


def _evict_from(buffer: SnapshotBuffer, offset: int, start: int, stop: int) -> None:
    """Evict weights ``start:stop`` of the tensor at ``offset`` of ``buffer`` (a pass read them)."""
    buffer.evict(offset + start, offset + stop)
