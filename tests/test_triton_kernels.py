"""Tests of the Triton kernels (``modeopt.modespace.kernels.triton_kernels``) against torch references.

On this CPU-only machine they run in Triton's interpreter: ``TRITON_INTERPRET=1`` must be in the
environment before the kernels are decorated, so one subprocess runs every case of
``tests/_triton_check.py`` (one interpreter start instead of one per case) and each test below asserts
on one pass's results. With a GPU, :class:`TestCuda` runs the same checks natively on CUDA tensors.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeopt.modespace.kernels import triton_kernels as tk

sys.path.insert(0, str(Path(__file__).parent))
import _triton_check as check  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
needs_triton = pytest.mark.skipif(not tk.available(), reason="triton is not importable")


@pytest.fixture(scope="module")
def interpreted():
    """``{pass: [case results]}`` from one interpreter run of every check on CPU tensors."""
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "_triton_check.py"), "cpu"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"checker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_all_ok(rows: list[dict]) -> None:
    assert rows, "no cases ran"
    bad = [f"{r['case']}: {r['detail']}" for r in rows if not r["ok"]]
    assert not bad, "\n".join(bad)


@needs_triton
@pytest.mark.parametrize("name", list(check.CHECKS))
def test_interpreted(interpreted, name):
    """Every pass, every case, on CPU tensors in Triton's interpreter."""
    _assert_all_ok(interpreted[name])


def test_available_without_triton(monkeypatch):
    """Importing and probing the module never fails where Triton is missing."""
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    assert tk.available() is False
    assert tk.supports(3) and tk.supports(tk.MAX_REDUCE_MODES) and not tk.supports(tk.MAX_REDUCE_MODES + 1)


@needs_triton
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                    reason="this process runs Triton's interpreter")
def test_cpu_tensors_need_the_interpreter():
    """Without TRITON_INTERPRET, CPU tensors are refused with a clear error (not a crash in Triton)."""
    w = torch.zeros(4)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        tk.update([w], [torch.ones(4)], [torch.zeros(4, dtype=torch.uint8)], torch.ones(1))


@needs_triton
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
class TestCuda:
    """The same checks, compiled for the GPU, on CUDA tensors."""

    @pytest.mark.parametrize("name", list(check.CHECKS))
    def test_native(self, name):
        _assert_all_ok(check.run_all("cuda", [name])[name])

    def test_large_reduce_deterministic(self):
        """A few million elements over many rows of partials: bitwise equal across runs, and within
        1e-6 of sum |a g| of a float64 reference."""
        gen = torch.Generator().manual_seed(0)
        n, m = 3_000_001, 4096
        g = torch.randn(n, generator=gen).cuda()
        a = torch.randn(n, generator=gen).to(torch.bfloat16).cuda()
        lab = torch.randint(0, m, (n,), generator=gen).to(torch.int16).cuda()
        out = [tk.reduce([g, None, g[:12345]], [a, a, a[:12345]], [lab, lab, lab[:12345]], m) for _ in range(3)]
        assert all(torch.equal(out[0], o) for o in out[1:])
        ref, scale = check._reduce_ref([g, g[:12345]], [a, a[:12345]], [lab, lab[:12345]], m)
        assert bool(((out[0].cpu() - ref).abs() <= 1e-6 * scale).all())


@needs_triton
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                    reason="this process runs Triton's interpreter")
def test_compiles_for_sm90_without_a_gpu():
    """The interpreter accepts code the compiler rejects (and runs scalars in float64): compile every
    kernel to PTX for sm_90 ahead of time - no GPU needed - and check that update and assign have no
    fused multiply-add (they must round like the torch reference)."""
    import triton

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:
        pytest.skip(f"this Triton has no ahead-of-time compile API: {e}")
    k = tk.compiled()
    lab = {"lab_ptr": "*i16", "n": "i64", "n_modes": "i32"}
    kernels = {
        "update": (k.update, {"w_ptr": "*bf16", "a_ptr": "*bf16", "d_ptr": "*fp32", **lab}),
        "assign": (k.assign, {"w_ptr": "*fp16", "a_ptr": "*fp32", "b_ptr": "*fp32", "r_ptr": "*fp32", **lab}),
        "welford": (k.welford, {"w_ptr": "*fp32", "mean_ptr": "*fp64", "com_ptr": "*fp64", "dr_ptr": "*fp64",
                                "inv_n_ptr": "*fp64", **lab}),
        "reduce": (k.reduce, {"g_ptr": "*fp32", "a_ptr": "*bf16", "lab_ptr": "*u8", "part_ptr": "*fp64", "n": "i32",
                              "row0": "i32", "n_tiles": "i32", "M_PAD": "i32"}),
        # the 8-bit encoding: int8 codes, labels packed two per byte
        "update_q8": (k.update, {"w_ptr": "*bf16", "a_ptr": "*i8", "d_ptr": "*fp32", **lab, "lab_ptr": "*u8"}),
        "reduce_q8": (k.reduce, {"g_ptr": "*bf16", "a_ptr": "*i8", "lab_ptr": "*u8", "part_ptr": "*fp64", "n": "i32",
                                 "row0": "i32", "n_tiles": "i32", "M_PAD": "i32"}),
    }
    block, mode_tile = tk.reduce_tiles(300)
    for name, (fn, sig) in kernels.items():
        q8 = name.endswith("_q8")
        const = {"LABEL_U16": name not in ("reduce", "update_q8", "reduce_q8"), "BLOCK": tk.ELEMENTWISE_BLOCK}
        if name.startswith(("update", "reduce")):
            const["LABEL_U4"] = q8
        if name.startswith("reduce"):
            const.update(BLOCK=block, MODE_TILE=mode_tile, ITERS=4)
        src = ASTSource(fn=fn, signature={**sig, **{c: "constexpr" for c in const}}, constexprs=const)
        try:
            ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                 options={"num_warps": 4, "enable_fp_fusion": False}).asm["ptx"]
        except (TypeError, KeyError, AttributeError) as e:  # the compile API moved: not a kernel bug
            pytest.skip(f"ahead-of-time compile API differs in Triton {triton.__version__}: {e!r}")
        assert ".entry" in ptx
        if name in ("update", "assign", "update_q8"):
            assert "fma.rn.f32" not in ptx, f"{name}: float32 multiply-add was fused"
