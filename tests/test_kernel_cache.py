"""The compiled-kernel cache never breaks training (issue #15, item 8) and the kernels never index
out of bounds (item 6).

Each case runs in a fresh process (the library is built and loaded once per process): a fork of a
server that imported torch and modeopt but never touched the library (tests/_forkserver.py; one
interpreter start instead of one per case), with its own ``MODEOPT_CACHE``, pre-seeded with a bad
file at the exact name the library is cached under.
Every case must exit 0, warn exactly once (naming the cause and the fix) and compute what the torch
reference computes; where the cache is writable, the bad file must have been replaced by a good one.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from modeopt.modespace.kernels import c_library

CC = c_library.compiler()
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler")

# Runs every entry point on the fused path (if in use) and on the torch path, and a few mode-space
# steps through a switch; prints the largest relative difference and whether the fused path ran.
PROBE = textwrap.dedent("""
    import json, torch, modeopt
    from modeopt.modespace.space import kernels
    g = torch.Generator().manual_seed(0)
    m, sizes = 5, [300_000, 37]  # more than one piece of work, and an odd tail
    ldt = kernels.label_dtype(m)
    w = [torch.randn(n, generator=g) for n in sizes]
    a = [torch.randn(n, generator=g) for n in sizes]
    b = [torch.randn(n, generator=g) for n in sizes]
    lab = [torch.randint(0, m, (n,), generator=g).to(ldt) for n in sizes]
    delta, dr = torch.randn(m, generator=g), torch.randn(m, generator=g, dtype=torch.float64)

    def run():
        out = [kernels.reduce(w, a, lab, m)]
        ws = [x.clone() for x in w]
        kernels.update(ws, a, lab, delta)
        out += ws
        mean = [torch.zeros(n, dtype=torch.float64) for n in sizes]
        com = [torch.ones(n, dtype=torch.float64) for n in sizes]
        kernels.welford(w, mean, com, lab, dr, 2)
        out += mean + com
        ws = [torch.empty(n) for n in sizes]
        kernels.assign(ws, a, b, lab, delta)
        return out + ws

    fused = kernels.fused_available()
    got = run()
    with kernels.use_fused(False):
        ref = run()
    err = max(float(((x.double() - y.double()).abs() / (1 + y.double().abs())).max()) for x, y in zip(got, ref))

    from workloads import SmallCNN
    torch.manual_seed(0)
    model = SmallCNN(width=4)
    opt = modeopt.CMDOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), n_modes=2, warmup_steps=3,
                               snapshot_every=1, n_samples=60, seed=0, progress=False)
    for _ in range(5):
        opt.zero_grad(); model(torch.randn(4, 1, 28, 28)).sum().backward(); opt.step()
    print(json.dumps({"fused": fused, "err": err, "phase": opt.phase}))
""")


def _probe(fresh, cache: Path, **env_extra) -> tuple[dict, str]:
    out = fresh.run(PROBE, env={"MODEOPT_CACHE": str(cache), **env_extra}, unset=("MODEOPT_KERNELS", "CC"))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "KernelWarning:" in line]


def _assert_repaired(path: Path) -> None:
    """The cached file is a good library again (loads, has every entry point, passes the self-test)."""
    assert path.is_file() and path.stat().st_size > 1000
    assert c_library.digest_path(path).read_text() == c_library.sha256(path)
    c_library.load(path)


@pytest.fixture(scope="module")
def real_so(tmp_path_factory) -> Path:
    if CC is None:
        pytest.skip("no C compiler")
    return c_library.compile_library(CC, tmp_path_factory.mktemp("real"))


def _cc(src: str, out: Path, tmp: Path) -> Path:
    c = tmp / "src.c"
    c.write_text(src)
    subprocess.run([CC, "-O1", "-fPIC", "-shared", "-std=c99", str(c), "-o", str(out)], check=True,
                   capture_output=True)
    return out


def _with_digest(path: Path, digest_of: Path | None = None) -> None:
    """Record a digest beside ``path`` as a build would (of ``digest_of``, default the file itself)."""
    c_library.digest_path(path).write_text(c_library.sha256(digest_of or path))


def _truncated_stale_digest(path, tmp, real):
    path.write_bytes(real.read_bytes()[: real.stat().st_size // 3])
    _with_digest(path, real)


# How each bad file gets there, and the cause the warning must name. Without a matching digest a
# file is never handed to the dynamic loader (a truncated library crashes dlopen with SIGBUS);
# the cases with a digest check what happens when a recorded build itself is bad.
SEEDS = {
    "empty": lambda path, tmp, real: path.write_bytes(b""),
    "garbage": lambda path, tmp, real: path.write_bytes(os.urandom(4096)),
    "truncated": lambda path, tmp, real: path.write_bytes(real.read_bytes()[: real.stat().st_size // 3]),
    "truncated_stale_digest": _truncated_stale_digest,
    "garbage_with_digest": lambda path, tmp, real: (path.write_bytes(os.urandom(4096)), _with_digest(path)),
    "missing_symbols": lambda path, tmp, real: (_cc("int modeopt_nothing(void) { return 1; }\n", path, tmp),
                                                _with_digest(path)),
    # every entry point present, but update subtracts: only the self-test can tell
    "wrong_results": lambda path, tmp, real: (_cc(c_library.SOURCE.read_text().replace(
        "w[i] += ACONV(a[i]) * delta", "w[i] -= ACONV(a[i]) * delta"), path, tmp), _with_digest(path)),
}
CAUSES = {"empty": "has no recorded digest", "garbage": "has no recorded digest", "truncated": "has no recorded digest",
          "truncated_stale_digest": "does not match its recorded digest", "garbage_with_digest": "cannot be loaded",
          "missing_symbols": "lacks an entry point", "wrong_results": "disagrees with the torch reference"}


@needs_cc
@pytest.mark.parametrize("kind", list(SEEDS))
def test_a_bad_cached_library_is_rebuilt_with_one_warning(kind, tmp_path, real_so, fresh_process):
    cache = tmp_path / "cache"
    cache.mkdir()
    path = c_library.library_path(CC, cache)
    SEEDS[kind](path, tmp_path, real_so)
    res, err = _probe(fresh_process, cache)
    warns = _warnings(err)
    assert len(warns) == 1, err[-3000:]
    assert str(path) in warns[0] and CAUSES[kind] in warns[0] and "The fused kernels are in use" in warns[0]
    assert "rm -rf ~/.cache/modeopt" in warns[0] and "MODEOPT_KERNELS=torch" in warns[0]
    assert res["fused"] and res["err"] < 1e-6 and res["phase"] == "embedded"
    _assert_repaired(path)
    assert sorted(p.name for p in cache.iterdir()) == [path.name, path.name + ".sha256"]  # no temporaries
    if kind == "truncated":  # the next process uses the repaired file silently (once: each probe costs seconds)
        res, err = _probe(fresh_process, cache)
        assert res["fused"] and not _warnings(err), err[-3000:]


@needs_cc
def test_a_bad_cached_library_that_cannot_be_rebuilt_falls_back_to_torch(tmp_path, fresh_process):
    cache = tmp_path / "cache"
    cache.mkdir()
    path = c_library.library_path("/bin/false", cache)
    path.write_bytes(os.urandom(4096))
    res, err = _probe(fresh_process, cache, CC="/bin/false")
    warns = _warnings(err)
    assert len(warns) == 1, err[-3000:]
    assert "has no recorded digest" in warns[0] and "compiling with /bin/false failed" in warns[0]
    assert "use the (slower) torch path" in warns[0]
    assert not res["fused"] and res["err"] == 0.0 and res["phase"] == "embedded"
    assert not path.exists()  # the bad file is gone: it is never loaded again


@needs_cc
@pytest.mark.parametrize("how", ["under_a_file", "read_only"])
def test_an_unwritable_cache_builds_into_a_temporary_directory(how, tmp_path, fresh_process):
    if how == "under_a_file":
        (tmp_path / "file").write_text("not a directory")
        cache = tmp_path / "file" / "cache"
    else:
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            pytest.skip("root writes into read-only directories")
        cache = tmp_path / "ro"
        cache.mkdir()
        cache.chmod(0o500)
    try:
        res, err = _probe(fresh_process, cache)
    finally:
        if how == "read_only":
            cache.chmod(0o700)
    warns = _warnings(err)
    assert len(warns) == 1, err[-3000:]
    assert "is not writable" in warns[0] and "temporary directory" in warns[0] and "MODEOPT_CACHE" in warns[0]
    assert res["fused"] and res["err"] < 1e-6 and res["phase"] == "embedded"


def test_an_unwritable_cache_without_a_working_compiler_falls_back_to_torch(tmp_path, fresh_process):
    (tmp_path / "file").write_text("not a directory")
    res, err = _probe(fresh_process, tmp_path / "file" / "cache", CC="/bin/false")
    warns = _warnings(err)
    assert len(warns) == 1 and "is not writable" in warns[0] and "torch path" in warns[0], err[-3000:]
    assert not res["fused"] and res["err"] == 0.0 and res["phase"] == "embedded"


@needs_cc
def test_kernels_disabled_ignore_a_bad_cache_silently(tmp_path, fresh_process):
    path = c_library.library_path(CC, tmp_path)
    path.write_bytes(b"")
    res, err = _probe(fresh_process, tmp_path, MODEOPT_KERNELS="torch")
    assert not res["fused"] and not _warnings(err) and res["err"] == 0.0
    assert path.read_bytes() == b""  # not touched


OUT_OF_RANGE = textwrap.dedent("""
    import torch
    from modeopt.modespace.space import kernels
    from modeopt.modespace.space import ModeSpace
    print("fused", kernels.fused_available())
    n, m = 1000, 4
    w = torch.randn(n)
    for ldt, bad in [(torch.uint8, 4), (torch.uint8, 200), (torch.int32, 2**30), (torch.int32, -5)]:
        lab = torch.zeros(n, dtype=ldt)
        lab[n - 1] = bad
        calls = {
            "welford": lambda: kernels.welford([w], [torch.zeros(n, dtype=torch.float64)],
                                               [torch.zeros(n, dtype=torch.float64)], [lab],
                                               torch.zeros(m, dtype=torch.float64), 1),
            "assign": lambda: kernels.assign([w.clone()], [torch.ones(n)], [torch.zeros(n)], [lab], torch.ones(m)),
            "ModeSpace": lambda: ModeSpace(torch.nn.Linear(n, 1, bias=False),
                                           [("weight", torch.nn.Parameter(w.clone().view(1, n)))],
                                           [lab], [torch.ones(n)], torch.zeros(m, dtype=torch.int64), torch.zeros(m)),
        }
        for name, call in calls.items():
            try:
                call()
                print(name, bad, "NO ERROR")
            except ValueError as e:
                print(name, bad, "ValueError:", e)
    # a label tensor checked once is re-checked after it changes in place
    lab = torch.zeros(n, dtype=torch.uint8)
    kernels.assign([w.clone()], [torch.ones(n)], [torch.zeros(n)], [lab], torch.ones(m))
    lab[3] = 9
    try:
        kernels.assign([w.clone()], [torch.ones(n)], [torch.zeros(n)], [lab], torch.ones(m))
        print("modified NO ERROR")
    except ValueError as e:
        print("modified ValueError:", e)
    try:
        kernels.welford([w], [torch.zeros(n - 1, dtype=torch.float64)], [torch.zeros(n, dtype=torch.float64)],
                        [torch.zeros(n, dtype=torch.uint8)], torch.zeros(m, dtype=torch.float64), 1)
        print("sizes NO ERROR")
    except ValueError as e:
        print("sizes ValueError:", e)
""")


def test_out_of_range_labels_raise_value_error_not_a_signal(tmp_path, fresh_process):
    out = fresh_process.run(OUT_OF_RANGE, env={"MODEOPT_CACHE": str(tmp_path)}, unset=("MODEOPT_KERNELS",))
    assert out.returncode == 0, (out.returncode, out.stderr[-3000:])  # a negative code would be a signal
    lines = out.stdout.splitlines()
    assert lines[0] == f"fused {CC is not None}"
    assert "NO ERROR" not in out.stdout
    errors = [line for line in lines[1:] if "ValueError:" in line]
    assert len(errors) == 4 * 3 + 2
    assert "welford 4 ValueError: labels[0] holds mode label 4, but there are only 4 modes" in out.stdout
    assert f"assign {2**30} ValueError: labels[0] holds mode label {2**30}" in out.stdout
    assert "ModeSpace 200 ValueError: ModeSpace labels[0] holds mode label 200" in out.stdout
    assert "welford -5 ValueError: labels[0] holds a negative mode label (-5)" in out.stdout
    assert "modified ValueError: labels[0] holds mode label 9" in out.stdout
    assert "sizes ValueError: welford: tensor 0 has arguments of [1000, 999, 1000, 1000] elements" in out.stdout


def test_missing_c_source_falls_back_with_the_reason(tmp_path, fresh_process):
    """An installation without its package data (the C source) says so, once, and trains on the torch path."""
    script = ("from pathlib import Path\nfrom modeopt.modespace.kernels import c_library\n"
              f"c_library.SOURCE = Path({str(tmp_path / 'gone.c')!r})\n" + PROBE)
    out = fresh_process.run(script, env={"MODEOPT_CACHE": str(tmp_path / "cache")}, unset=("MODEOPT_KERNELS", "CC"))
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["fused"] is False and res["err"] == 0.0 and res["phase"] == "embedded"
    warned = _warnings(out.stderr)
    assert len(warned) == 1 and "missing from this installation" in warned[0] and "reinstall" in warned[0]
