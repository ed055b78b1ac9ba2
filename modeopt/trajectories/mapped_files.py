"""Memory-mapped files for recordings: blocks reserved up front, pages dropped from the process once used.

A recording under ``record_dir`` lives in a shared mapping of an unlinked file. :func:`map_file`
reserves its blocks first (a full disk is a clean ``OSError``, not a ``SIGBUS`` on a later write);
:func:`drop_pages` unmaps pages the process has finished with, so neither the warm-up's writes nor
the switch's reads keep the file resident in the process's memory.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["map_file", "drop_pages"]


def map_file(directory, numel: int, dtype: torch.dtype) -> Tensor:
    """``numel`` values of ``dtype`` in a new shared mapping of a file under ``directory`` (its blocks reserved)."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix="snapshots-", suffix=".bin", dir=directory)
    try:
        # A sparse file would get its blocks on first write into the mapping: on a full disk that
        # write kills the process with SIGBUS. Reserve every block now and fail here instead.
        _reserve(fd, numel * dtype.itemsize, directory)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    try:
        t = torch.from_file(path, shared=True, size=numel, dtype=dtype)
    finally:
        os.unlink(path)  # the mapping keeps the pages; the file vanishes with the process
    if _MADVISE is not None and t.numel():
        # Reads stride across the file (one segment per snapshot): readahead and the kernel's mapping of
        # neighbouring cached pages would keep pages resident that drop_pages has not been told about.
        _MADVISE(t.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE, t.numel() * t.element_size(), _MADV_RANDOM)
    return t


_ZERO_CHUNK = 1 << 24  # bytes written at a time where posix_fallocate is not supported
_MADV_DONTNEED = 4
_MADV_RANDOM = 1


def _madvise():
    """libc's ``madvise`` on Linux (None elsewhere: eviction is then skipped)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_MADVISE = _madvise()


def drop_pages(addr: int, nbytes: int) -> None:
    """Unmap the pages covering ``[addr, addr + nbytes)`` of one of this module's *shared file* mappings
    from the process (``MADV_DONTNEED``: for a shared file mapping the contents stay in the file and
    are read back on the next access; never call it on anonymous memory, which it would zero)."""
    if _MADVISE is None or nbytes <= 0:
        return
    page = mmap.PAGESIZE
    lo = addr // page * page
    hi = -(-(addr + nbytes) // page) * page
    _MADVISE(lo, hi - lo, _MADV_DONTNEED)


def _reserve(fd: int, nbytes: int, directory) -> None:
    """Give the file ``fd`` ``nbytes`` of allocated blocks, or raise an ``OSError`` that says what to do."""
    def full(e: OSError) -> OSError:
        try:
            free = f"{shutil.disk_usage(directory).free:,}"
        except OSError:
            free = "an unknown number of"
        return OSError(
            e.errno, f"the memory-mapped snapshot file needs {nbytes:,} bytes in {str(directory)!r}, but only {free} "
            f"bytes are free there ({os.strerror(e.errno or errno.ENOSPC)}). Free space there, choose another "
            "record_dir (TrajectoryRecorder: directory) on a larger disk, or record less: "
            "record_dtype=torch.bfloat16 halves the file, a smaller max_snapshots keeps fewer rows")

    if nbytes <= 0:
        return
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is not None:
        try:
            fallocate(fd, 0, nbytes)
            return
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise full(e) from None
            # EOPNOTSUPP/EINVAL: the file system cannot reserve blocks; write zeros instead
    zeros = bytes(min(_ZERO_CHUNK, nbytes))
    done = 0
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        while done < nbytes:
            done += os.write(fd, zeros[: min(len(zeros), nbytes - done)])
        os.fsync(fd)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise full(e) from None
        raise

