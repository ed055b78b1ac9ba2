"""Streaming a trajectory's columns to the device that computes on them, chunk by chunk.

Host data decomposed on a GPU is copied up on a side stream, double buffered, through pinned
memory; data already on the device is sliced in place. Used by :func:`~modeopt.decompose`'s two
full passes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .trajectory import Trajectory

__all__ = ["resolve_device", "stream_cols"]


def resolve_device(device: torch.device | str | None, data: Tensor) -> torch.device:
    """``device`` as a ``torch.device`` (``None``: ``data``'s; a bare ``"cuda"``: the current CUDA device)."""
    dev = data.device if device is None else torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev



#: Route host chunks through the staging path even for the CPU (tests exercise it this way).
_FORCE_STAGING = False


def stream_cols(trajectory: Trajectory, bounds: list[tuple[int, int]], device: torch.device,
                *, staged: bool | None = None, n_buffers: int = 2):
    """Yield ``(i0, i1, x)``: the values of weights ``i0:i1`` time-major, ``(T, i1 - i0)``, on ``device``.

    Host data decomposed on a GPU is *staged*: each chunk is copied up on a side stream into one
    of ``n_buffers`` device buffers while the caller computes on the previous one (double
    buffering; events order the copy after the last use of its buffer, and the compute after
    the copy). A pinned trajectory (a recording of CUDA tensors) is copied row by row straight
    from its storage; pageable data (RAM, memory maps, numpy) goes through pinned host staging
    buffers first. Everything else (data already on ``device``) yields :meth:`Trajectory.cols`.

    ``x`` may be a view of a reused buffer: consume it before asking for the next chunk. The
    values are exactly :meth:`Trajectory.cols`'s (a bf16/fp16 trajectory's offset is added on
    ``device`` in float32, the same IEEE operation).
    """
    data = trajectory.data
    if staged is None:
        staged = (data.device.type == "cpu" and device.type != "cpu") or (_FORCE_STAGING and device.type == "cpu")
    evict = trajectory.evict or (lambda i0, i1: None)  # a memory-mapped recording drops what was read
    if not staged or not bounds:
        for i0, i1 in bounds:
            x = trajectory.cols(i0, i1)
            yield i0, i1, (x if x.device == device else x.to(device))
            evict(i0, i1)
        return
    if data.device.type != "cpu":
        raise ValueError("staging streams host data; this trajectory is on " + str(data.device))
    offset, t = trajectory.offset, data.shape[0]
    width = max(i1 - i0 for i0, i1 in bounds)
    n_buffers = max(1, min(n_buffers, len(bounds)))
    cuda = device.type == "cuda"
    direct = cuda and data.is_pinned() and (offset is None or offset.is_pinned())
    pin = cuda and not direct
    bufs = [torch.empty(t * width, dtype=data.dtype, device=device) for _ in range(n_buffers)]
    obufs = [torch.empty(width, dtype=torch.float32, device=device) for _ in range(n_buffers)] if offset is not None else None
    stages = ostages = None
    if not direct:
        stages = [torch.empty(t * width, dtype=data.dtype, pin_memory=pin) for _ in range(n_buffers)]
        if offset is not None:
            ostages = [torch.empty(width, dtype=torch.float32, pin_memory=pin) for _ in range(n_buffers)]
    if cuda:
        compute = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
    copied: list = [None] * n_buffers  # upload into buffer k done (recorded on the side stream)
    used: list = [None] * n_buffers  # the caller's work on buffer k enqueued (compute stream)

    def upload(j: int) -> None:
        k = j % n_buffers
        i0, i1 = bounds[j]
        c = i1 - i0
        dst = bufs[k][: t * c].view(t, c)
        odst = None if offset is None else obufs[k][:c]
        if not cuda:  # the CPU rehearsal of the same path: stage, then copy
            stages[k][: t * c].view(t, c).copy_(data[:, i0:i1])
            evict(i0, i1)
            dst.copy_(stages[k][: t * c].view(t, c))
            if odst is not None:
                ostages[k][:c].copy_(offset[i0:i1])
                odst.copy_(ostages[k][:c])
            return
        with torch.cuda.stream(side):
            if used[k] is not None:
                side.wait_event(used[k])  # the device buffer is free
            if direct:
                for r in range(t):  # each time row of a chunk is contiguous in the recording
                    dst[r].copy_(data[r, i0:i1], non_blocking=True)
                if odst is not None:
                    odst.copy_(offset[i0:i1], non_blocking=True)
            else:
                if copied[k] is not None:
                    copied[k].synchronize()  # the host stage is free (its last upload finished)
                stage = stages[k][: t * c].view(t, c)
                stage.copy_(data[:, i0:i1])
                evict(i0, i1)
                dst.copy_(stage, non_blocking=True)
                if odst is not None:
                    ostages[k][:c].copy_(offset[i0:i1])
                    odst.copy_(ostages[k][:c], non_blocking=True)
            event = torch.cuda.Event()
            event.record(side)
            copied[k] = event

    try:
        for j in range(n_buffers - 1):
            upload(j)
        for j, (i0, i1) in enumerate(bounds):
            if j + n_buffers - 1 < len(bounds):
                upload(j + n_buffers - 1)
            k = j % n_buffers
            c = i1 - i0
            if cuda:
                compute.wait_event(copied[k])
            x = bufs[k][: t * c].view(t, c)
            if offset is not None:
                x = x.to(torch.float32) + obufs[k][:c]
            yield i0, i1, x
            if cuda:
                event = torch.cuda.Event()
                event.record(compute)
                used[k] = event
    finally:
        if cuda:  # an abandoned stream (an exception in the caller) may still be copying into bufs:
            compute.wait_stream(side)  # their memory is reused on the compute stream only after it
