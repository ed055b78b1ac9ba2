"""Calibration: does modeopt's Koopman comparison see a known conjugacy? (Redman et al., Sec. 4.1)

The paper (arXiv 2302.09160, Fig. 2; code: github.com/william-redman/Identifying_Equivalent_Training_Dynamics,
folder "Online mirror online gradient descent") validates its method on a problem where conjugacy holds
by construction (Ghai, Lu & Hazan 2022, the log-barrier / exponential-reparameterisation example):

* loss ``f(x) = tan(x_1) + tan(x_2)`` on the box ``[1/T, 1]^2``, T = 100 iterations, step eta = 0.01;
* online mirror descent (OMD) with the log barrier ``R(x) = -sum log x``:
  ``-1/x' = -1/x - eta f'(x)``, then a Bregman projection onto the box;
* online gradient descent (OGD) on ``u = log x``, i.e. on ``f(exp(u))``, then a Euclidean projection
  onto ``[log(1/T), 0]^2``. OMD in x and OGD in u are (approximately, to first order in eta) conjugate
  through ``h = log``;
* the non-conjugate comparison: the (vector) bisection method (BM) on ``f`` with brackets
  ``a0 in [-4/3, -1/3]^2``, ``b0 in [1/7, 8/7]^2``;
* 25 initial conditions (a 5 x 5 grid), 4 time delays (5 blocks of the 2-d state), one DMD over the
  pairs of all 25 trajectories stacked, all 10 eigenvalues kept, no centring;
  W1 = mean |lambda_a - lambda_b| over the optimal matching. Paper: W1(OMD, OGD) ~ 0.008, BM ~ 0.75.

This script simulates all three exactly as the authors' code does (numpy instead of jax; both
projections are coordinate-wise clipping, since the box and both divergences are separable), then:

1. **the paper's pipeline**, re-implemented here (it is not modeopt's: stacked ICs, no affine term);
2. **modeopt on the ensemble**: the 25 trajectories side by side as one ``(T, 50)`` "raw" run;
3. **modeopt per initial condition** (the tool's unit is one run): ``koopman_spectrum`` of each
   trajectory and ``spectrum_distance`` at a shared rank, for a grid of settings (delays, rank), and
   ``compare_dynamics`` (p-values) where the windows allow it.

Besides the paper's pairs, a harder non-conjugate control: OMD at eta vs. OGD at 2 eta (the same
flow at twice the step: per-step eigenvalues lambda vs. lambda^2, not conjugate as maps).

The per-IC comparisons use conjugate initial conditions, ``u0 = log x0``. (The paper's grid uses
``u0 = linspace(-2.3, -0.1)``, which equals ``log x0`` only at the ends; its pooled DMD does not pair ICs.)

Runtime: about 1 minute for the full setting (measured: 50-60 s), about 6 s with ``--quick`` (one CPU thread, shared machine).
Writes ``OUT/conjugacy.{json,md}`` and ``OUT/*.png``; ``--images`` copies the figures the docs show
to ``docs/images/studies/``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from modeopt.analysis import compare_dynamics, koopman_spectrum, spectrum_distance
from workloads import cpu_name

ETA, T_ITERS, GRID = 1e-2, 100, 5
DOC_FIGURES = ["conjugacy_spectra.png", "conjugacy_settings.png"]


# ----------------------------------------------------------------------------------- the three algorithms
def _sec2(x):
    return 1.0 / np.cos(x) ** 2


def omd(x0, T=T_ITERS, eta=ETA):
    """Online mirror descent with the log barrier on the box [1/T, 1]^2 (T x 2)."""
    X = np.zeros((T, 2))
    X[0] = x0
    for t in range(1, T):
        x = X[t - 1]
        y = -1.0 / (-1.0 / x - eta * _sec2(x))  # DR^-1(DR(x) - eta grad f)
        X[t] = np.clip(y, 1.0 / T_ITERS, 1.0)  # Bregman projection onto a box = clipping (separable, convex)
    return X


def ogd(u0, T=T_ITERS, eta=ETA):
    """Online gradient descent on u = log x, loss f(exp(u)), box [log(1/T), 0]^2 (T x 2)."""
    U = np.zeros((T, 2))
    U[0] = u0
    for t in range(1, T):
        u = U[t - 1]
        v = u - eta * np.exp(u) * _sec2(np.exp(u))
        U[t] = np.clip(v, np.log(1.0 / T_ITERS), 0.0)
    return U


def bisection(a, b, T=T_ITERS):
    """The authors' vector bisection on f(z) = sum tan(z) (T x 2). At an exact root it stays put (the
    authors' code returns zeros for the remaining steps; no IC of the grid hits one)."""
    Z = np.zeros((T, 2))
    Z[0] = (a + b) / 2
    f = lambda z: np.tan(z).sum()  # noqa: E731
    for t in range(1, T):
        z = Z[t - 1]
        if f(z) < 0:
            a = z
        elif f(z) > 0:
            b = z
        else:
            Z[t:] = z
            return Z
        Z[t] = (a + b) / 2
    return Z


def grid(lo, hi, g=GRID):
    """The authors' meshgrid of initial conditions, (g*g, 2)."""
    return np.reshape(np.meshgrid(np.linspace(lo, hi, g), np.linspace(lo, hi, g)), [2, g * g]).T


def simulate(g=GRID) -> dict[str, np.ndarray]:
    """All runs, each (T, 2, n_ic)."""
    x0 = grid(0.1, 0.9, g)
    runs = {
        "OMD": np.stack([omd(x) for x in x0], 2),
        "OGD (paper's u0 grid)": np.stack([ogd(u) for u in grid(-2.3, -0.1, g)], 2),
        "OGD": np.stack([ogd(np.log(x)) for x in x0], 2),  # conjugate ICs u0 = log x0
        "OGD, 2 eta": np.stack([ogd(np.log(x), eta=2 * ETA) for x in x0], 2),
        "BM": np.stack([bisection(a, b) for a, b in zip(grid(-4 / 3, -1 / 3, g), grid(1 / 7, 8 / 7, g))], 2),
    }
    runs["ICs"] = x0
    return runs


# ------------------------------------------------------------------ the paper's pipeline (not modeopt's)
def paper_eigenvalues(X: np.ndarray, n_delays: int = 4) -> tuple[np.ndarray, int]:
    """The authors' DMD: delay-embed each IC, stack all pairs, exact DMD, no centring; all (D+1)*2 eigenvalues.

    The authors divide by every singular value of the stacked snapshots ``A``. Bisection's ``A`` has rank
    6 of 10 (its last 4 singular values are 1e-14..1e-16 of the largest: rounding), and dividing by them
    turns rounding into 4 eigenvalues that depend on the BLAS/LAPACK kernels OpenBLAS picks for the CPU
    (W1(OGD, BM) was 0.750 with AVX-512 kernels, 0.772 with AVX2, 0.731 with SSE3). So this keeps the
    directions above the numerical-rank tolerance ``sigma_max * max(A.shape) * eps`` (numpy's
    ``matrix_rank``) and reports the minimum-norm least-squares operator ``B A^+`` there: its eigenvalues
    on the resolved directions, and 0 on the ones the data does not determine. Returns the eigenvalues
    ``((n_delays+1)*D,)`` and the resolved rank; both are the same on every kernel to ~1e-10.
    """
    T, D, N = X.shape
    H = np.zeros((T - n_delays, (n_delays + 1) * D, N))
    for d in range(n_delays + 1):
        H[:, d * D:(d + 1) * D] = X[d:T - n_delays + d]
    A = np.concatenate([H[:-1, :, i] for i in range(N)]).T
    B = np.concatenate([H[1:, :, i] for i in range(N)]).T
    u, s, vh = np.linalg.svd(A, full_matrices=False)
    r = int((s > s[0] * max(A.shape) * np.finfo(A.dtype).eps).sum())
    ev = np.concatenate([np.linalg.eigvals((u[:, :r].T @ B @ vh[:r].T) / s[:r]), np.zeros(A.shape[0] - r)])
    return ev[np.lexsort((-np.angle(ev), -np.round(np.abs(ev), 12)))], r  # a fixed order: |lambda| desc, angle


def w1(a, b) -> float:
    c = np.abs(np.asarray(a)[:, None] - np.asarray(b)[None, :])
    i, j = linear_sum_assignment(c)
    return float(c[i, j].mean())


PAIRS = [("OMD", "OGD", "conjugate"), ("OMD", "OGD, 2 eta", "not conjugate (2x step)"),
         ("OMD", "BM", "not conjugate"), ("OGD", "BM", "not conjugate")]


# ---------------------------------------------------------------------------------------- modeopt
def shared_distance(a: np.ndarray, b: np.ndarray, **kw) -> tuple[float, int]:
    """koopman_spectrum of both at their energy ranks (or ``rank``), then at the smaller one; W1."""
    if kw.get("rank") is None:
        r = min(koopman_spectrum(a, **kw).rank, koopman_spectrum(b, **kw).rank)
        kw = {**kw, "rank": r}
    sa, sb = koopman_spectrum(a, **kw), koopman_spectrum(b, **kw)
    return spectrum_distance(sa, sb)[0], kw["rank"]


def per_ic_settings(runs, ics, settings) -> list[dict]:
    """Per-IC spectrum distances of every pair under each setting: median, range, failures."""
    out = []
    for name, kw in settings:
        row = {"setting": name, "kwargs": kw, "pairs": {}}
        for a, b, _ in PAIRS:
            ds, errs = [], []
            for i in ics:
                try:
                    ds.append(shared_distance(runs[a][:, :, i], runs[b][:, :, i], **kw)[0])
                except ValueError as e:
                    errs.append(str(e).split(":")[0] + ": " + str(e).split(":")[1][:80])
            row["pairs"][f"{a} | {b}"] = {
                "median": float(np.median(ds)) if ds else None, "min": float(np.min(ds)) if ds else None,
                "max": float(np.max(ds)) if ds else None, "n": len(ds), "failed": len(errs),
                "first_error": errs[0] if errs else None, "all": [float(d) for d in ds]}
        d = {k: np.array(v["all"]) for k, v in row["pairs"].items()}
        if all(len(v) == len(ics) for v in d.values()):
            c = d["OMD | OGD"]
            row["conjugate_closest"] = {"vs 2 eta": int((c < d["OMD | OGD, 2 eta"]).sum()),
                                        "vs BM": int((c < d["OMD | BM"]).sum()), "of": len(ics)}
        out.append(row)
    return out


def per_ic_compare(runs, ics, settings) -> list[dict]:
    """compare_dynamics on each IC and pair: W1 and p (failures counted with the first message)."""
    out = []
    for name, kw in settings:
        row = {"setting": name, "kwargs": kw, "pairs": {}}
        for a, b, _ in PAIRS:
            res, errs = [], []
            for i in ics:
                try:
                    c = compare_dynamics(runs[a][:, :, i], runs[b][:, :, i], labels=(a, b), progress=False, **kw)
                    res.append((c.distance, c.p_value, c.statistic / max(float(np.median(c.null)), 1e-300)))
                except ValueError as e:
                    errs.append(str(e)[:160])
            p = [r[1] for r in res]
            row["pairs"][f"{a} | {b}"] = {
                "n": len(res), "failed": len(errs), "first_error": errs[0] if errs else None,
                "median_w1": float(np.median([r[0] for r in res])) if res else None,
                "median_p": float(np.median(p)) if p else None, "min_p": float(min(p)) if p else None,
                "max_p": float(max(p)) if p else None, "n_p_below_0.05": int(sum(x < 0.05 for x in p)),
                "median_ratio": float(np.median([r[2] for r in res])) if res else None,
                "all": [[float(x) for x in r] for r in res]}
        out.append(row)
    return out


def figures(out: Path, runs, paper_eigs, ens_specs, settings_rows) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.4))
    th = np.linspace(0, 2 * np.pi, 300)
    style = {"OMD": ("ko", 7), "OGD": ("r^", 6), "OGD, 2 eta": ("gs", 4), "BM": ("b*", 8)}
    ax = axes[0]
    i = 7
    for k, (m, _) in style.items():
        ax.plot(runs[k][:, 0, i], m[0] + "-", ms=2, lw=1, label=k)
    ax.set(title=f"IC {i}: first state variable (x, u = log x, z)", xlabel="iteration")
    ax.legend(fontsize=8)
    for ax, (title, eigs) in zip(axes[1:], [("paper's pipeline (pooled ICs, 4 delays, rank 10)", paper_eigs),
                                           ("modeopt, ensemble as one raw run (4 delays, energy 1.0: rank 6)",
                                            {k: s.eigenvalues for k, s in ens_specs.items()})]):
        ax.plot(np.cos(th), np.sin(th), "k--", lw=0.5)
        for k, (m, ms) in style.items():
            if k in eigs:
                ev = np.asarray(eigs[k])
                ax.plot(ev.real, ev.imag, m, ms=ms, mfc="none" if k == "OGD" else None, label=k)
        ax.set(title=title, xlabel="Re λ", ylabel="Im λ", xlim=(-1.15, 1.15), ylim=(-1.15, 1.15), aspect="equal")
        ax.legend(fontsize=8, loc="lower left")
    axes[1].title.set_fontsize(9)
    axes[2].title.set_fontsize(9)
    fig.tight_layout()
    paths.append(out / "conjugacy_spectra.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(11, 4.2))
    names = [r["setting"] for r in settings_rows]
    colors = ["k", "g", "b", "c"]
    for j, (a, b, kind) in enumerate(PAIRS):
        key = f"{a} | {b}"
        for s, r in enumerate(settings_rows):
            vals = r["pairs"][key]["all"]
            ax.scatter(np.full(len(vals), s + (j - 1.5) * 0.15), np.maximum(vals, 1e-8), s=8, c=colors[j],
                       label=f"{a} vs. {b} ({kind})" if s == 0 else None)
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    ax.set(ylabel="W1 between spectra (per initial condition)",
           title="modeopt per initial condition: koopman_spectrum + spectrum_distance at the shared rank")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "conjugacy_settings.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def fmt(v, d=4):
    return "-" if v is None else f"{v:.{d}f}"


def markdown(res: dict) -> str:
    L = [f"# Conjugacy calibration: OMD vs. OGD vs. bisection (Redman et al., Sec. 4.1)", "",
         f"T = {T_ITERS} iterations, eta = {ETA}, {res['n_ic']} initial conditions; runtime {res['seconds']:.0f} s.",
         "", "## The paper's pipeline (re-implemented; pooled ICs, 4 delays, all 10 eigenvalues, those of unresolved directions 0)", "",
         "| pair | W1 (here) | W1 (paper) |", "|---|---|---|"]
    for k, v in res["paper_pipeline"].items():
        L.append(f"| {k} | {v:.4f} | {res['paper_reported'].get(k, '-')} |")
    L += ["", "## modeopt, the 25 ICs side by side as one raw run", "",
          "| setting | rank | " + " | ".join(f"{a} vs. {b}" for a, b, _ in PAIRS) + " |",
          "|---|---|" + "---|" * len(PAIRS)]
    for r in res["ensemble"]:
        L.append(f"| {r['setting']} | {r.get('rank', '-')} | " +
                 " | ".join(fmt(r['distances'].get(f'{a} | {b}')) for a, b, _ in PAIRS) + " |")
    L += ["", "## modeopt per initial condition: spectrum_distance at the shared rank (median [min, max])", "",
          "| setting | " + " | ".join(f"{a} vs. {b}" for a, b, _ in PAIRS) +
          " | ICs where OMD-OGD is closer than OMD-(OGD, 2 eta) / than OMD-BM |",
          "|---|" + "---|" * (len(PAIRS) + 1)]
    for r in res["per_ic_spectra"]:
        cells = []
        for a, b, _ in PAIRS:
            p = r["pairs"][f"{a} | {b}"]
            c = f"{fmt(p['median'])} [{fmt(p['min'])}, {fmt(p['max'])}]" if p["n"] else "fails"
            if p["failed"]:
                c += f" ({p['failed']} failed)"
            cells.append(c)
        cc = r.get("conjugate_closest")
        cells.append(f"{cc['vs 2 eta']}/{cc['of']} / {cc['vs BM']}/{cc['of']}" if cc else "-")
        L.append(f"| {r['setting']} | " + " | ".join(cells) + " |")
    L += ["", "## modeopt per initial condition: compare_dynamics (median W1; median p [min, max]; #p<0.05; "
              "median between/within)", "",
          "| setting | " + " | ".join(f"{a} vs. {b}" for a, b, _ in PAIRS) + " |", "|---|" + "---|" * len(PAIRS)]
    for r in res["per_ic_compare"]:
        cells = []
        for a, b, _ in PAIRS:
            p = r["pairs"][f"{a} | {b}"]
            if p["n"]:
                c = (f"{fmt(p['median_w1'])}; p {fmt(p['median_p'], 3)} [{fmt(p['min_p'], 3)}, {fmt(p['max_p'], 3)}]; "
                     f"{p['n_p_below_0.05']}/{p['n']}; {fmt(p['median_ratio'], 2)}x")
            else:
                c = "fails"
            if p["failed"]:
                c += f" ({p['failed']} failed: {p['first_error'][:90]}...)"
            cells.append(c)
        L.append(f"| {r['setting']} | " + " | ".join(cells) + " |")
    L += ["", f"Machine: {res['machine']}", ""]
    return "\n".join(L)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="out/studies/conjugacy")
    ap.add_argument("--quick", action="store_true", help="5 ICs and two settings (seconds)")
    ap.add_argument("--images", action="store_true", help="copy the docs' figures to docs/images/studies/")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = simulate()
    n_ic = runs["OMD"].shape[2]

    # 1. the paper's pipeline (the paper's own IC grids for OMD, OGD and BM, as in its code)
    pe_r = {k: paper_eigenvalues(runs[k]) for k in ("OMD", "OGD (paper's u0 grid)", "OGD", "OGD, 2 eta", "BM")}
    pe, paper_rank = {k: v[0] for k, v in pe_r.items()}, {k: v[1] for k, v in pe_r.items()}
    paper = {"OMD | OGD (paper's u0 grid)": w1(pe["OMD"], pe["OGD (paper's u0 grid)"]),
             "OGD (paper's u0 grid) | BM": w1(pe["OGD (paper's u0 grid)"], pe["BM"]),
             "OMD | BM": w1(pe["OMD"], pe["BM"]),
             "OMD | OGD (u0 = log x0)": w1(pe["OMD"], pe["OGD"]),
             "OMD | OGD, 2 eta (u0 = log x0)": w1(pe["OMD"], pe["OGD, 2 eta"])}
    reported = {"OMD | OGD (paper's u0 grid)": "≈ 0.008", "OGD (paper's u0 grid) | BM": "≈ 0.75"}
    print("paper's pipeline:", {k: round(v, 4) for k, v in paper.items()}, "resolved ranks:", paper_rank)

    # 2. modeopt on the ensemble (25 ICs x 2 = 50 raw columns, one run)
    ens_settings = [("defaults (pca, 32 delays, energy 0.99)", {}), ("raw, 4 delays", {"observable": "raw", "delays": 4}),
                    ("raw, 4 delays, energy 1.0", {"observable": "raw", "delays": 4, "energy": 1.0}),
                    ("raw, 32 delays, energy 1.0", {"observable": "raw", "delays": 32, "energy": 1.0})]
    ens_settings += [(f"raw, 4 delays, rank {r}", {"observable": "raw", "delays": 4, "rank": r}) for r in (2, 4, 6)]
    ens, ens_specs = [], {}
    for name, kw in ens_settings:
        mats = {k: runs[k].reshape(T_ITERS, -1) for k in ("OMD", "OGD", "OGD, 2 eta", "BM")}
        r = kw.get("rank") or min(koopman_spectrum(m, **kw).rank for m in mats.values())
        specs = {k: koopman_spectrum(m, **{**kw, "rank": r}) for k, m in mats.items()}
        if kw.get("delays") == 4 and kw.get("energy") == 1.0:
            ens_specs = specs
        ens.append({"setting": name, "rank": r, "kwargs": kw,
                    "distances": {f"{a} | {b}": spectrum_distance(specs[a], specs[b])[0] for a, b, _ in PAIRS},
                    "eigenvalues": {k: [[float(v.real), float(v.imag)] for v in s.eigenvalues] for k, s in specs.items()}})
        print(f"ensemble, {name}: rank {r}", {k: round(v, 4) for k, v in ens[-1]["distances"].items()})

    # 3. per IC
    ics = list(range(n_ic)) if not args.quick else [1, 7, 13, 17, 23]
    settings = [("defaults (pca, 32 delays, energy 0.99)", {}),
                ("4 delays", {"delays": 4}), ("2 delays", {"delays": 2}),
                ("4 delays, rank 2", {"delays": 4, "rank": 2}),
                ("4 delays, energy 1.0", {"delays": 4, "energy": 1.0}),
                ("16 delays, energy 1.0", {"delays": 16, "energy": 1.0}),
                ("32 delays, energy 1.0", {"delays": 32, "energy": 1.0})]
    if args.quick:
        settings = [settings[0], settings[4]]
    spec_rows = per_ic_settings(runs, ics, settings)
    for r in spec_rows:
        print("per IC,", r["setting"], {k: (fmt(v["median"]), v["failed"]) for k, v in r["pairs"].items()})
    cmp_settings = [("defaults (32 delays)", {}), ("4 delays", {"delays": 4}),
                    ("4 delays, energy 1.0", {"delays": 4, "energy": 1.0}),
                    ("4 delays, first 50 iterations", {"delays": 4, "_first": 50}),
                    ("8 delays, window 45", {"delays": 8, "window": 45})]
    if args.quick:
        cmp_settings = cmp_settings[1:3]
    cmp_rows = []
    for name, kw in cmp_settings:
        first = kw.pop("_first", None)
        rr = runs if first is None else {k: v[:first] for k, v in runs.items() if k != "ICs"}
        cmp_rows += per_ic_compare(rr, ics, [(name, kw)])
        print("compare,", name, {k: (fmt(v["median_w1"]), fmt(v["median_p"], 3), v["n_p_below_0.05"], v["failed"])
                                 for k, v in cmp_rows[-1]["pairs"].items()})

    paths = figures(out, runs, {"OMD": pe["OMD"], "OGD": pe["OGD (paper's u0 grid)"], "BM": pe["BM"]}, ens_specs,
                    spec_rows)
    res = {"paper_pipeline": paper, "paper_reported": reported, "ensemble": ens, "per_ic_spectra": spec_rows,
           "per_ic_compare": cmp_rows, "n_ic": len(ics), "ics": [runs["ICs"][i].tolist() for i in ics],
           "paper_rank": paper_rank, "paper_eigenvalues": {k: [[float(v.real), float(v.imag)] for v in e] for k, e in pe.items()},
           "quick": args.quick, "seconds": time.perf_counter() - t0,
           "machine": f"{cpu_name()}, torch threads 1"}
    (out / "conjugacy.json").write_text(json.dumps(res, indent=1))
    (out / "conjugacy.md").write_text(markdown(res))
    if args.images:
        dst = Path(__file__).resolve().parents[2] / "docs" / "images" / "studies"
        dst.mkdir(parents=True, exist_ok=True)
        for p in paths:
            shutil.copy(p, dst / p.name)
    print(f"done in {res['seconds']:.1f} s -> {out}")
    return res


if __name__ == "__main__":
    main()
