"""Where each rank's shards of FSDP2 (``fully_shard``) parameters sit in the flat weight vector.

FSDP2 stores every parameter as a DTensor sharded on dim 0 over a 1-D device mesh, with
``torch.chunk`` semantics: rank ``r`` of ``W`` holds rows ``[r*c, min((r+1)*c, d0))``, ``c =
ceil(d0 / W)`` (``p.to_local()``). Flattened, that is one contiguous range of the parameter's
elements, so a rank's shards of the embedded parameters are a sorted union of ranges of the
global rows that :class:`~modeopt.trajectories.layout.ParamLayout` numbers (the single-process row order).
:class:`ShardMap` holds those ranges and maps global rows to local ones; :func:`count_collectives`
measures what a block of code sends through ``torch.distributed``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["ShardMap", "is_fsdp2_sharded", "count_collectives", "CollectiveCount"]


def is_fsdp2_sharded(params: Sequence[Tensor]) -> bool:
    """Whether any of ``params`` is a DTensor (FSDP2 ``fully_shard`` or tensor parallelism)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return any(isinstance(p, DTensor) for p in params)


def _rows_of(d0: int, rank: int, world: int) -> tuple[int, int]:
    c = -(-d0 // world) if d0 else 0
    start = min(rank * c, d0)
    return start, min(start + c, d0)


class ShardMap:
    """The embedded parameters' shards on one rank of a 1-D FSDP2 mesh.

    Args:
        params: the embedded parameters (DTensors with one ``Shard(0)`` placement on the same mesh),
            in :class:`~modeopt.trajectories.layout.ParamLayout` order.

    Attributes:
        group, rank, world: the mesh's process group, this rank's place in it and its size.
        device: the device of the local shards; collectives send tensors from there.
        params: the parameters. local_numels: per parameter, the elements of its local shard.
        global_offsets: per parameter, the global row of its first local element.
        local_offsets: per parameter, the local row of its first element; ``n_local`` in total.
        n_global: the number of embedded weights (all ranks).
    """

    def __init__(self, params: Sequence[Tensor]):
        from torch.distributed.tensor import DTensor, Shard

        # equal meshes (the same ranks and group; FSDP2 may hand units equal copies), not only the same object
        meshes = {p.device_mesh for p in params if isinstance(p, DTensor)}
        if len(meshes) != 1 or not all(isinstance(p, DTensor) for p in params):
            raise TypeError("modeopt: under FSDP2 every embedded parameter must be a DTensor on one device mesh; "
                            "keep parameters that are not sharded out of the embedding (exclude=)")
        mesh = params[0].device_mesh
        if mesh.ndim != 1 or any(tuple(p.placements) != (Shard(0),) for p in params):
            raise TypeError("modeopt supports FSDP2 on a 1-D mesh with Shard(0) parameters (fully_shard's "
                            f"default); got mesh {tuple(mesh.shape)} and placements "
                            f"{sorted({str(tuple(p.placements)) for p in params})}: HSDP, tensor parallelism and "
                            "custom shard placements are not supported (docs/scaling-out.md)")
        self.group = mesh.get_group()
        self.rank, self.world = mesh.get_local_rank(), mesh.size()
        self.device = params[0].to_local().device  # where collectives run (NCCL needs CUDA tensors)
        self.shapes = [tuple(p.shape) for p in params]
        self.numels = [p.numel() for p in params]
        self.params = list(params)
        self.local_numels: list[int] = []
        self.global_offsets: list[int] = []
        self.local_offsets: list[int] = []
        offset = n_local = 0
        for p, shape, numel in zip(params, self.shapes, self.numels):
            local = p.to_local()
            lo, hi = self.row_range(shape, self.rank)
            if local.numel() != hi - lo or not local.is_contiguous():
                raise TypeError(f"modeopt: a shard of shape {tuple(local.shape)} of a parameter of shape {shape} is not "
                                "the contiguous torch.chunk shard FSDP2 makes: unsupported sharding")
            self.local_numels.append(hi - lo)
            self.global_offsets.append(offset + lo)
            self.local_offsets.append(n_local)
            offset += numel
            n_local += hi - lo
        self.n_global, self.n_local = offset, n_local

    @torch.no_grad()
    def local_views(self) -> list[Tensor]:
        """Per parameter, its local shard flattened, read afresh (a view of the storage FSDP2 gathers from)."""
        return [p.to_local().view(-1) for p in self.params]

    def row_range(self, shape: tuple[int, ...], rank: int) -> tuple[int, int]:
        """The flat element range ``[lo, hi)`` of a parameter of ``shape`` that ``rank`` holds."""
        if not shape:
            return (0, 1) if rank == 0 else (0, 0)  # a 0-d parameter is not split: rank 0 is counted as its owner
        per_row = 1
        for s in shape[1:]:
            per_row *= s
        r0, r1 = _rows_of(shape[0], rank, self.world)
        return r0 * per_row, r1 * per_row

    def segments(self, rank: int) -> list[tuple[int, int]]:
        """``rank``'s global row ranges ``[g0, g1)``, in order (its local rows are their concatenation)."""
        out, offset = [], 0
        for shape, numel in zip(self.shapes, self.numels):
            lo, hi = self.row_range(shape, rank)
            if hi > lo:
                out.append((offset + lo, offset + hi))
            offset += numel
        return out

    def to_local(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """For global ``rows`` (any order): ``(owned, local)`` - a bool mask of those this rank holds,
        and their local row indices (in the order of ``rows``)."""
        rows = rows.to(torch.int64).cpu()
        owned = torch.zeros(rows.shape, dtype=torch.bool)
        local = torch.zeros(rows.shape, dtype=torch.int64)
        start = 0
        for g0, g1 in self.segments(self.rank):
            inside = (rows >= g0) & (rows < g1)
            owned |= inside
            local = torch.where(inside, rows - g0 + start, local)
            start += g1 - g0
        return owned, local[owned]

    def gather_rows(self, local_values: Tensor) -> Tensor:
        """The ``(N,)`` global vector assembled from every rank's ``(n_local,)`` values (all-gather).

        Sent: each rank's local rows, padded to the largest rank's count.
        """
        counts = [sum(g1 - g0 for g0, g1 in self.segments(r)) for r in range(self.world)]
        width = max(counts)
        padded = torch.zeros(width, dtype=local_values.dtype, device=self.device)
        padded[: local_values.numel()] = local_values.to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded, group=self.group)
        parts = [x.cpu() for x in parts]
        out = torch.empty(self.n_global, dtype=local_values.dtype)
        for r, part in enumerate(parts):
            start = 0
            for g0, g1 in self.segments(r):
                out[g0:g1] = part[start : start + g1 - g0]
                start += g1 - g0
        return out

    def all_reduce(self, t: Tensor) -> Tensor:
        """The sum of ``t`` over the ranks (all-reduce on :attr:`device`), on ``t``'s device."""
        x = t.to(self.device)
        dist.all_reduce(x, group=self.group)
        return x.to(t.device)

    def broadcast(self, t: Tensor) -> Tensor:
        """Rank 0's ``t`` (broadcast on :attr:`device`), on ``t``'s device."""
        x = t.to(self.device)
        dist.broadcast(x, src=dist.get_global_rank(self.group, 0), group=self.group)
        return x.to(t.device)

    def split(self, flat_local: Tensor) -> list[Tensor]:
        """Per parameter, its rows of a ``(n_local,)`` local vector (views)."""
        return [flat_local[o : o + n] for o, n in zip(self.local_offsets, self.local_numels)]


@dataclass
class CollectiveCount:
    """Bytes each rank handed to ``torch.distributed`` collectives, by collective (its input's size)."""

    bytes: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, nbytes: int) -> None:
        """Count one call of ``name`` with an input of ``nbytes``."""
        self.bytes[name] = self.bytes.get(name, 0) + int(nbytes)
        self.calls[name] = self.calls.get(name, 0) + 1

    @property
    def total(self) -> int:
        """All bytes counted."""
        return sum(self.bytes.values())


_COUNTED = {  # name -> which argument is this rank's payload (position, keyword)
    "all_reduce": (0, "tensor"), "broadcast": (0, "tensor"), "all_gather": (1, "tensor"),
    "all_gather_into_tensor": (1, "input_tensor"), "all_gather_single": (1, "input_tensor"),
    "reduce_scatter_single": (1, "input"), "reduce_scatter_tensor": (1, "input"),
}


@contextlib.contextmanager
def count_collectives() -> Iterator[CollectiveCount]:
    """Count what every ``torch.distributed`` collective called in the block sends from this rank.

    FSDP2's all-gathers and reduce-scatters (``all_gather_single`` / ``reduce_scatter_single``),
    modeopt's own all-reduces and gathers: the payload counted is the input tensor's bytes
    (FSDP2's reduce-scatter input is the whole padded unsharded gradient, its all-gather input
    this rank's shard). Patches the module functions for the duration of the block (measurement only).
    """
    count = CollectiveCount()
    saved = {}

    def wrap(name, fn, where):
        pos, key = where
        def counted(*args, **kwargs):
            x = args[pos] if len(args) > pos else kwargs[key]
            n = sum(t.numel() * t.element_size() for t in x) if isinstance(x, (list, tuple)) else \
                x.numel() * x.element_size()
            count.add(name, n)
            return fn(*args, **kwargs)
        return counted

    for name, where in _COUNTED.items():
        fn = getattr(dist, name, None)
        if fn is not None:
            saved[name] = fn
            setattr(dist, name, wrap(name, fn, where))
    try:
        yield count
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)
