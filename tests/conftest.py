import gc
import os
import shutil
import subprocess

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# `make test` runs the suite in pytest-xdist workers (one per core). Each worker then gets its share of the
# cores: torch's default (every core in every worker) oversubscribes the machine, and small tests, most of
# this suite, are several times slower when their threads fight. Set before any test's process starts,
# so the processes tests launch inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    torch.set_num_threads(_threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))


def planted_trajectory(n=20_000, t=30, m=5, noise=1e-4, seed=0, dtype=torch.float32):
    """A trajectory built from m mutually uncorrelated (orthonormal, centred) profiles.

    Returns (W (n, t), true_labels (n,), a (n,), b (n,), profiles (m, t)).
    """
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(t, m, generator=g, dtype=torch.float64)
    p -= p.mean(0)
    q, _ = torch.linalg.qr(p)
    profiles = q.T.contiguous()
    labels = torch.randint(0, m, (n,), generator=g)
    a = torch.randn(n, generator=g, dtype=torch.float64)
    a += 0.5 * a.sign()  # |a| >= 0.5: every weight really follows its mode, some anti-correlated
    b = torch.randn(n, generator=g, dtype=torch.float64)
    w = a[:, None] * profiles[labels] + b[:, None]
    w += noise * torch.randn(n, t, generator=g, dtype=torch.float64)
    return w.to(dtype), labels, a, b, profiles


def same_partition(x: torch.Tensor, y: torch.Tensor) -> bool:
    """True if two labelings induce the same partition (equal up to relabelling)."""
    pairs = torch.unique(torch.stack([x, y]), dim=1)
    return pairs.shape[1] == torch.unique(x).numel() == torch.unique(y).numel()


@pytest.fixture(scope="session")
def mnist():
    from workloads import mnist_subset

    return mnist_subset()


@pytest.fixture(scope="session")
def fresh_process(tmp_path_factory):
    """Runs code in a process that has never built or loaded modeopt's kernel library: a fork of a
    server that imported torch and modeopt once (tests/_forkserver.py); ``.run(code, env=, unset=)``
    returns a ``subprocess.CompletedProcess``."""
    from _forkserver import ForkServer

    server = ForkServer(tmp_path_factory.mktemp("forks"))
    yield server
    server.close()


@pytest.fixture(scope="session")
def two_rank_launch(tmp_path_factory):
    """``{suite: output directory}`` after one 2-rank launch of every suite registered in
    ``tests/_two_ranks.SUITES`` (the DDP and FSDP2 tests; see that module)."""
    import torch.distributed as dist
    from _two_ranks import SUITES, run_suites

    from modeopt.distributed.ddp import launch_local

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")

    outs = {name: tmp_path_factory.mktemp(name) for name in SUITES}
    suites = [SUITES[name](out) for name, out in outs.items()]
    wall = launch_local(run_suites, (suites,), nprocs=2, timeout=240 * len(suites))
    print(f"\none 2-rank launch for {', '.join(outs)}: {wall:.1f} s")
    return outs


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 1 MiB tmpfs (a disk that fills up); skipped where mounting is not permitted."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {res.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        gc.collect()  # files written there may still be mapped
        if subprocess.run(["umount", str(mnt)]).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=True)
