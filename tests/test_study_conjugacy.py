"""The conjugacy calibration study (examples/studies/conjugacy.py) in its --quick setting."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _studies import STUDIES, load_study

ROOT = Path(__file__).resolve().parents[1]

# Kernels every x86-64 CPU can run: OpenBLAS's SSE3 path (numpy, scipy), MKL's SSE4.2 path and ATen's
# scalar kernels (torch). This machine's default picks AVX-512; the AVX2 machine picked Haswell.
PORTABLE_KERNELS = {"OPENBLAS_CORETYPE": "Prescott", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
                    "ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                    "MKL_NUM_THREADS": "1"}

PAPER_PIPELINE = """
import json, sys
sys.path[:0] = [sys.argv[1]]
from conjugacy import simulate, paper_eigenvalues, w1
runs = simulate()
pe = {k: paper_eigenvalues(runs[k]) for k in ("OMD", "OGD (paper's u0 grid)", "BM")}
print(json.dumps({"ranks": {k: v[1] for k, v in pe.items()},
                  "OMD | OGD (paper's u0 grid)": w1(pe["OMD"][0], pe["OGD (paper's u0 grid)"][0]),
                  "OGD (paper's u0 grid) | BM": w1(pe["OGD (paper's u0 grid)"][0], pe["BM"][0])}))
"""


@pytest.fixture(scope="module")
def res(tmp_path_factory):
    out = tmp_path_factory.mktemp("conjugacy")
    r = load_study('conjugacy').main(["--quick", "--out", str(out)])
    assert (out / "conjugacy.json").is_file() and (out / "conjugacy.md").is_file()
    assert (out / "conjugacy_spectra.png").is_file()
    return r


def test_paper_pipeline_reproduces_the_papers_numbers(res):
    p = res["paper_pipeline"]
    # the authors' code gives 0.0081 and 0.7503 (their 0.7503 includes 4 eigenvalues made of rounding,
    # see paper_eigenvalues; their saved eigenvalues give 0.753); here the unresolved ones are 0
    assert p["OMD | OGD (paper's u0 grid)"] == pytest.approx(0.0081, abs=5e-4)
    assert p["OGD (paper's u0 grid) | BM"] == pytest.approx(0.7516, abs=1e-4)
    assert p["OMD | OGD (paper's u0 grid)"] < p["OMD | BM"] / 20
    assert res["paper_rank"] == {"OMD": 10, "OGD (paper's u0 grid)": 10, "OGD": 10, "OGD, 2 eta": 10, "BM": 6}


@pytest.mark.skipif(sys.platform != "linux", reason="the kernel switches are x86-64 Linux wheels' (OpenBLAS, MKL)")
def test_paper_pipeline_gives_the_same_numbers_on_portable_kernels(res):
    """The issue's failure: on an AVX2-only CPU W1(OGD, BM) was 0.772. Rerun on the SSE kernels, one thread."""
    env = {**os.environ, **PORTABLE_KERNELS, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "workloads")])}
    out = subprocess.run([sys.executable, "-c", PAPER_PIPELINE, str(STUDIES)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    other = json.loads(out.stdout.strip().splitlines()[-1])
    assert other["ranks"] == {"OMD": 10, "OGD (paper's u0 grid)": 10, "BM": 6}
    for k in ("OMD | OGD (paper's u0 grid)", "OGD (paper's u0 grid) | BM"):
        assert other[k] == pytest.approx(res["paper_pipeline"][k], abs=1e-8), k


def test_modeopt_separates_bisection_and_sees_the_rate_only_at_full_rank(res):
    rows = {r["setting"]: r for r in res["per_ic_spectra"]}
    default, full = rows["defaults (pca, 32 delays, energy 0.99)"], rows["4 delays, energy 1.0"]
    for row in (default, full):
        conj, bm = row["pairs"]["OMD | OGD"], row["pairs"]["OMD | BM"]
        assert conj["failed"] == 0 and bm["failed"] == 0
        assert conj["max"] < bm["min"]  # every IC: the conjugate pair is far closer than bisection
    # at energy 1.0 the conjugate pair is also closer than OGD at twice the step, on every IC
    assert full["conjugate_closest"]["vs 2 eta"] == full["conjugate_closest"]["of"]
    # ... at the default energy 0.99 (rank 1) it is not (the honest negative the docs report)
    assert default["conjugate_closest"]["vs 2 eta"] < default["conjugate_closest"]["of"]


def test_compare_dynamics_runs_with_short_delays(res):
    row = {r["setting"]: r for r in res["per_ic_compare"]}["4 delays"]
    conj = row["pairs"]["OMD | OGD"]
    assert conj["n"] == 5 and 0 < conj["median_p"] <= 1
