"""The conjugacy calibration study (examples/studies/conjugacy.py) in its --quick setting."""


import pytest

from _studies import load_study


@pytest.fixture(scope="module")
def res(tmp_path_factory):
    out = tmp_path_factory.mktemp("conjugacy")
    r = load_study('conjugacy').main(["--quick", "--out", str(out)])
    assert (out / "conjugacy.json").is_file() and (out / "conjugacy.md").is_file()
    assert (out / "conjugacy_spectra.png").is_file()
    return r


def test_paper_pipeline_reproduces_the_papers_numbers(res):
    p = res["paper_pipeline"]
    # the authors' code gives 0.0081 and 0.7503 (deterministic: same maps, same grids)
    assert p["OMD | OGD (paper's u0 grid)"] == pytest.approx(0.0081, abs=5e-4)
    assert p["OGD (paper's u0 grid) | BM"] == pytest.approx(0.750, abs=0.01)
    assert p["OMD | OGD (paper's u0 grid)"] < p["OMD | BM"] / 20


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
