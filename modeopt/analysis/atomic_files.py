"""Files written whole or not at all: a temporary name, then a rename.

A full disk reaches torch's zip writer as ``RuntimeError: [enforce fail at inline_container.cc:...]
unexpected pos ...`` (or as an ``OSError``): :func:`atomic_save` raises it as ``OSError(ENOSPC)``
with the bytes needed and free, and leaves nothing behind.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["atomic_save", "atomic_write_text"]


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary name, then rename: a file that could not be written completely
    leaves nothing behind (the recording stays readable, and the next snapshot tries again).

    A full disk reaches torch's zip writer as ``RuntimeError: [enforce fail at inline_container.cc:...]
    unexpected pos ...`` (or as an ``OSError``): raised as ``OSError(ENOSPC)`` with the bytes needed and free.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(e, RuntimeError) and not _is_write_failure(e):
            raise
        raise _write_error(e, path, _payload_bytes(obj)) from e


def _is_write_failure(e: RuntimeError) -> bool:
    text = str(e)
    return any(s in text for s in ("inline_container", "PytorchStreamWriter", "unexpected pos", "file write failed"))


def _payload_bytes(obj) -> int:
    """About what ``torch.save(obj)`` writes: the tensors' bytes plus ~1 KiB of zip and pickle framing."""
    tensors = obj.values() if isinstance(obj, dict) else [obj]
    return 1024 + sum(t.numel() * t.element_size() for t in tensors if isinstance(t, Tensor))


def _write_error(e: BaseException, path: Path, needed: int) -> OSError:
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or (free is not None and free < needed)
    room = f"it needs about {needed:,} bytes, {'?' if free is None else f'{free:,}'} are free there"
    if full:
        return OSError(errno.ENOSPC, f"the disk is full: snapshot {path.name} could not be written to {path.parent} "
                                     f"({room}). Nothing was left behind and the recording is readable up to the "
                                     "previous snapshot; free space or record to another directory (a later "
                                     "snapshot tries again)")
    return OSError(getattr(e, "errno", None) or errno.EIO,
                   f"snapshot {path.name} could not be written to {path.parent} ({type(e).__name__}: "
                   f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}; {room}). Nothing was left behind "
                   "and the recording is readable up to the previous snapshot; a later snapshot tries again")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary name, then rename: readers see the old file or the new one, never a part."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
