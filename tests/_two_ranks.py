"""One 2-rank launch for every suite that needs two real processes (DDP and FSDP2 tests).

Spawning two ranks, importing torch there and joining a gloo group costs seconds; the suites share
one launch. A test module registers its suite at import (collection comes before any fixture runs):
``SUITES[name] = lambda out_dir: (worker module, entry function, extra args)``; the session fixture
``two_rank_launch`` (conftest.py) runs every registered suite, each writing into its own directory,
and returns ``{name: out_dir}``. Each entry is called as ``fn(rank, world, *args)`` inside the one
process group (``modeopt.distributed.ddp.launch_local``), one suite after the other.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

#: name -> (output directory -> (module, function, args)); filled by the test modules at import.
SUITES: dict[str, Callable[[Path], tuple[str, str, tuple]]] = {}


def run_suites(rank: int, world: int, suites: list[tuple[str, str, tuple]]) -> None:
    """Entry of each rank: every suite's entry in turn (each catches its scenarios' errors itself)."""
    for module, fn, args in suites:
        getattr(importlib.import_module(module), fn)(rank, world, *args)
