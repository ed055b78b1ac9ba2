"""Is post-hoc CMD of a pretrained fine-tune insensitive to the number of modes? (MiniLM, real reviews)

The CMD papers (Turjeman et al. 2022, arXiv 2212.09040, appendix 8.4 / Fig. 15; the same group's
Brokman et al. 2023, arXiv 2312.13247) fine-tune a pretrained ViT-b-16 on CIFAR-10 and model the run
with CMD at M = 2, 4, 8, 16, 32 modes: "the model is almost insensitive to the number of modes used".

Here: the pretrained MiniLM-L6 (``workloads.load_minilm()``, 22.7 M weights, all trainable, word
embeddings included) with a fresh 2-class head is fine-tuned on 1,024 real Rotten-Tomatoes review
snippets (``workloads.review_sentiment()``, 500 held out), 64 tokens, batch 16, AdamW (lr 2e-4,
weight decay 0.01, linear decay to 0), ``--epochs`` epochs (1: 64 steps). ``modeopt.analysis.Recording`` keeps every
``--every``-th step of all 22.7 M weights in memory in bfloat16 (stored as movements from the
initial, pretrained weights; about 45 MB a sample). After the run, ``modeopt.decompose`` models the
whole trajectory with each M, and for each M we measure

- the relative reconstruction error of the trajectory (``reconstruction_errors(...).total_rel``:
  0 exact, 1 no better than holding every weight at its mean);
- the held-out accuracy of the CMD weights along the run and at its end
  (``accuracy_curves``), next to the raw weights'.

Repeated for ``--seeds`` fine-tune seeds (head initialisation and batch order; the split is fixed).

Writes ``OUT/minilm_modes.{json,md}`` and ``OUT/minilm_modes.png`` (default OUT =
out/studies/minilm_modes); ``--images DIR`` also copies the figure there (docs/images/studies).

Full setting (3 seeds, 1 epoch = 64 steps, a snapshot every 4 steps = 17 samples, M = 2..32,
accuracy at steps 0, 32 and 64): 955 s (16 minutes) on this project's 2-core CPU with one torch thread,
shared with three other jobs (fine-tune 80-110 s a seed, each M 30-55 s: decompose, reconstruction error
and three evaluations of 500 reviews).
``--quick``: 5 steps on 40 reviews, 32 tokens, 40 test reviews, 1 seed, M = 2, 4, 8, only the pooler
and the head recorded (148,610 weights); 15-30 seconds, most of it importing and loading MiniLM.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import modeopt
from modeopt.analysis import Recording, accuracy_curves, reconstruction_errors
from workloads import cpu_name, load_minilm, review_sentiment


def make_data(tok, n_train: int, n_test: int, max_length: int):
    tr_texts, ytr, te_texts, yte = review_sentiment(n_train=n_train, n_test=n_test, seed=0)

    def enc(texts):
        return tok(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")

    tr, te = enc(tr_texts), enc(te_texts)
    # The test set sorted by length, each batch trimmed to its longest review: the same logits as
    # padding everything to max_length (padding is masked), in a fraction of the time.
    order = torch.argsort(te["attention_mask"].sum(1))
    te = {k: v[order] for k, v in te.items()}
    return tr, ytr, te, yte[order]


def make_evaluate(te, yte, batch: int = 100):
    n = len(yte)
    chunks = []
    for i in range(0, n, batch):
        width = int(te["attention_mask"][i : i + batch].sum(1).max())
        chunks.append(({k: v[i : i + batch, :width] for k, v in te.items()}, yte[i : i + batch]))

    @torch.no_grad()
    def evaluate(model) -> float:
        model.eval()
        correct = sum(int((model(**x).logits.argmax(-1) == y).sum()) for x, y in chunks)
        return correct / n

    return evaluate


def fine_tune(seed: int, tr, ytr, args) -> tuple[modeopt.Trajectory, float]:
    """One AdamW fine-tune; returns the recorded trajectory and the wall time."""
    torch.manual_seed(seed)  # the fresh classification head
    model, _ = load_minilm()
    model.train()
    n = len(ytr)
    per_epoch = n // args.batch
    total = per_epoch * args.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / total))
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    keep = None if args.names is None else [k for k in args.names.split(",") if k]
    names = None if keep is None else (lambda name, _t: any(k in name for k in keep))
    with Recording(model, every=args.every, initial=True, dtype=torch.bfloat16, names=names) as rec:
        for _ in range(args.epochs):
            perm = torch.randperm(n, generator=g)
            for i in range(per_epoch):
                idx = perm[i * args.batch : (i + 1) * args.batch]
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(**{k: v[idx] for k, v in tr.items()}).logits, ytr[idx]).backward()
                opt.step()
                sched.step()
                rec.step()
            rec.epoch()
    traj = rec.trajectory()
    return traj, time.perf_counter() - t0


def mean_std(xs) -> tuple[float, float]:
    a = np.asarray(xs, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def figure(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = result["modes"]
    runs = result["runs"]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.3))
    x = np.arange(len(modes))
    # (a) final accuracy vs M, relative to the same seed's raw weights (the seeds differ by more than the Ms)
    raw = [r["raw_final"] for r in runs]
    rm, rs = mean_std(raw)
    ax[0].axhline(0, color="0.4", lw=1)
    for j, r in enumerate(runs):
        ax[0].plot(x + 0.08 * (j - (len(runs) - 1) / 2),
                   [100 * (r["cmd"][str(m)]["final"] - r["raw_final"]) for m in modes], "o", ms=5, alpha=0.6,
                   color=f"C{j}", label=f"seed {r['seed']} (raw {r['raw_final']:.3f})")
    s = result["summary"]
    ax[0].errorbar(x, [100 * s[str(m)]["delta_mean"] for m in modes], yerr=[100 * s[str(m)]["delta_std"] for m in modes],
                   fmt="s-", color="k", capsize=4, label="mean ± std over seeds")
    ax[0].set_xticks(x, [str(m) for m in modes])
    ax[0].set_xlabel("number of modes M")
    ax[0].set_ylabel("CMD − raw weights, held-out accuracy (points)")
    ax[0].set_title(f"(a) at the end of the run (raw: {rm:.3f} ± {rs:.3f})")
    lo, hi = ax[0].get_ylim()
    ax[0].set_ylim(lo, hi + 0.45 * (hi - lo))
    ax[0].legend(fontsize=7, loc="upper center", ncol=2)
    # (b) relative reconstruction error vs M
    for j, r in enumerate(runs):
        ax[1].plot(modes, [r["cmd"][str(m)]["total_rel"] for m in modes], "o-", color=f"C{j}", alpha=0.7,
                   label=f"seed {r['seed']}")
    ax[1].set_xscale("log", base=2)
    ax[1].set_xticks(modes, [str(m) for m in modes])
    ax[1].set_xlabel("number of modes M")
    ax[1].set_ylabel("relative error of the trajectory")
    ax[1].set_title("(b) reconstruction error (0 exact, 1 = mean)")
    ax[1].set_ylim(bottom=0)
    ax[1].legend(fontsize=7, loc="upper right")
    # (c) accuracy along the run, mean over seeds
    steps = runs[0]["eval_steps"]
    ax[2].plot(steps, np.mean([r["raw_curve"] for r in runs], 0), "k-o", lw=2, ms=4, label="raw weights")
    for j, m in enumerate(modes):
        ax[2].plot(steps, np.mean([r["cmd"][str(m)]["curve"] for r in runs], 0), "-o", ms=3,
                   color=plt.cm.viridis(j / max(1, len(modes) - 1)), label=f"CMD, M = {m}")
    ax[2].set_xlabel("fine-tune step")
    ax[2].set_ylabel(f"held-out accuracy (mean of {len(runs)} seeds)")
    ax[2].set_title("(c) along the run")
    ax[2].legend(fontsize=7, loc="lower right")
    fig.suptitle(result["title"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(result: dict) -> str:
    s, modes, runs = result["summary"], result["modes"], result["runs"]
    cfg = result["config"]
    lines = [f"# {result['title']}", "",
             f"MiniLM-L6 (22.7 M weights, all trainable; {runs[0].get('n_weights', 22713986):,} recorded), {cfg['n_train']} train / {cfg['n_test']} test reviews, "
             f"max_length {cfg['max_length']}, batch {cfg['batch']}, AdamW lr {cfg['lr']} (linear decay to 0, "
             f"weight decay 0.01), {cfg['epochs']} epoch(s) = {result['steps_per_run']} steps; a snapshot every "
             f"{cfg['every']} steps (bfloat16 movements), {result['n_samples']} samples. CMD: `modeopt.decompose` "
             f"of the whole trajectory, K = {cfg['k']} sampled weights, sampling seed 0. Seeds {cfg['seeds']}; "
             "mean ± standard deviation over seeds.", "",
             f"Machine: {result['machine']}; {result['runtime_s']:.0f} s in all.", "",
             "| model | final accuracy | Δ vs raw (same seed) | best along the run | relative error of the trajectory |",
             "|---|---|---|---|---|"]
    rm, rs = s["raw"]["final_mean"], s["raw"]["final_std"]
    lines.append(f"| raw weights | {rm:.3f} ± {rs:.3f} | - | {s['raw']['best_mean']:.3f} ± {s['raw']['best_std']:.3f} | 0 |")
    for m in modes:
        r = s[str(m)]
        lines.append(f"| CMD, M = {m} | {r['final_mean']:.3f} ± {r['final_std']:.3f} | "
                     f"{r['delta_mean']:+.3f} ± {r['delta_std']:.3f} | {r['best_mean']:.3f} ± {r['best_std']:.3f} | "
                     f"{r['rel_mean']:.3f} ± {r['rel_std']:.3f} |")
    lines += ["", f"Spread of the CMD final accuracy over M (max - min of the seed means): "
              f"{result['spread_over_M']:.3f}.", "", "Per seed (final accuracy):", "",
              "| seed | raw | " + " | ".join(f"M = {m}" for m in modes) + " | fine-tune (s) |",
              "|---" * (len(modes) + 3) + "|"]
    for r in runs:
        lines.append(f"| {r['seed']} | {r['raw_final']:.3f} | "
                     + " | ".join(f"{r['cmd'][str(m)]['final']:.3f}" for m in modes) + f" | {r['train_s']:.0f} |")
    lines += ["", f"Accuracy along the run (mean of seeds) at steps {runs[0]['eval_steps']}:", "",
              "| model | " + " | ".join(str(t) for t in runs[0]["eval_steps"]) + " |",
              "|---" * (len(runs[0]["eval_steps"]) + 1) + "|"]
    lines.append("| raw | " + " | ".join(f"{v:.3f}" for v in np.mean([r["raw_curve"] for r in runs], 0)) + " |")
    for m in modes:
        lines.append(f"| M = {m} | " + " | ".join(
            f"{v:.3f}" for v in np.mean([r["cmd"][str(m)]["curve"] for r in runs], 0)) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--modes", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--every", type=int, default=4, help="a snapshot every k optimizer steps")
    ap.add_argument("--eval-every", type=int, default=8, help="evaluate every k-th sample (and the last)")
    ap.add_argument("--n-train", type=int, default=1024)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--k", type=int, default=1000, help="K, weights sampled for the clustering")
    ap.add_argument("--names", default=None,
                    help="record only the tensors whose name contains one of these comma-separated strings (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="seconds: 5 steps on 40 reviews, 1 seed, pooler and head only")
    ap.add_argument("--out", default="out/studies/minilm_modes")
    ap.add_argument("--images", default=None, help="also copy the figure here (e.g. docs/images/studies)")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.every, args.eval_every = args.seeds[:1], 1, 1, 100
        args.n_train, args.n_test, args.max_length, args.batch = 40, 40, 32, 8
        args.modes = [m for m in args.modes if m <= 8]
        if args.names is None:
            args.names = "pooler,classifier"  # the pooler and the head (148,610 weights): seconds
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()

    # one model for every evaluation: each recorded tensor is overwritten before each evaluation
    probe, tok = load_minilm()
    tr, ytr, te, yte = make_data(tok, args.n_train, args.n_test, args.max_length)
    evaluate = make_evaluate(te, yte)

    runs = []
    for seed in args.seeds:
        traj, train_s = fine_tune(seed, tr, ytr, args)
        T = traj.n_samples
        steps = [int(s) for s in traj.steps]
        print(f"seed {seed}: {steps[-1]} steps in {train_s:.0f} s, {T} samples of {traj.n_weights:,} weights")
        kw = dict(evaluate=evaluate, model_factory=lambda: probe, n_samples=T, steps=steps,
                  every=args.eval_every, progress=False)
        raw = accuracy_curves({"raw": traj}, **kw)
        run = {"seed": seed, "train_s": train_s, "n_samples": T, "n_weights": int(traj.n_weights), "eval_steps": [int(s) for s in raw.steps],
               "raw_curve": raw.curves["raw"].tolist(), "raw_final": float(raw.curves["raw"][-1]), "cmd": {}}
        for m in args.modes:
            t0 = time.perf_counter()
            dec = modeopt.decompose(traj, n_modes=m, n_samples=args.k, seed=0, progress=False)
            err = reconstruction_errors(traj, dec, progress=False)
            acc = accuracy_curves({f"M = {m}": dec}, **kw).curves[f"M = {m}"]
            run["cmd"][str(m)] = {"final": float(acc[-1]), "curve": acc.tolist(), "total_rel": float(err.total_rel),
                                  "n_modes": int(dec.n_modes), "sizes": [int(v) for v in dec.sizes],
                                  "time_rel_last": float(err.time_rel[-1]), "seconds": time.perf_counter() - t0}
            print(f"  M = {m:2d}: rel. error {err.total_rel:.3f}, final accuracy {acc[-1]:.3f} "
                  f"(raw {run['raw_final']:.3f}), {time.perf_counter() - t0:.0f} s")
            del dec, err
        runs.append(run)
        del traj

    summary = {}
    rf = [r["raw_final"] for r in runs]
    rb = [max(r["raw_curve"]) for r in runs]
    summary["raw"] = dict(zip(["final_mean", "final_std"], mean_std(rf))) | dict(zip(["best_mean", "best_std"], mean_std(rb)))
    for m in args.modes:
        f = [r["cmd"][str(m)]["final"] for r in runs]
        d = [r["cmd"][str(m)]["final"] - r["raw_final"] for r in runs]
        b = [max(r["cmd"][str(m)]["curve"]) for r in runs]
        e = [r["cmd"][str(m)]["total_rel"] for r in runs]
        summary[str(m)] = {**dict(zip(["final_mean", "final_std"], mean_std(f))),
                           **dict(zip(["delta_mean", "delta_std"], mean_std(d))),
                           **dict(zip(["best_mean", "best_std"], mean_std(b))),
                           **dict(zip(["rel_mean", "rel_std"], mean_std(e)))}
    means = [summary[str(m)]["final_mean"] for m in args.modes]
    result = {
        "title": f"Post-hoc CMD of a MiniLM fine-tune vs. the number of modes ({len(runs)} seeds"
                 + (", --quick)" if args.quick else ")"),
        "config": {"seeds": args.seeds, "modes": args.modes, "epochs": args.epochs, "every": args.every,
                   "eval_every": args.eval_every, "n_train": args.n_train, "n_test": args.n_test,
                   "max_length": args.max_length, "batch": args.batch, "lr": args.lr, "k": args.k,
                   "threads": args.threads, "quick": args.quick, "names": args.names, "record_dtype": "bfloat16"},
        "modes": args.modes, "steps_per_run": runs[0]["eval_steps"][-1], "n_samples": runs[0]["n_samples"],
        "runs": runs, "summary": summary, "spread_over_M": float(max(means) - min(means)),
        "machine": f"{cpu_name()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}",
        "runtime_s": time.perf_counter() - t_all,
    }
    (out / "minilm_modes.json").write_text(json.dumps(result, indent=1))
    (out / "minilm_modes.md").write_text(markdown(result))
    try:
        figure(result, out / "minilm_modes.png")
        if args.images:
            Path(args.images).mkdir(parents=True, exist_ok=True)
            shutil.copy(out / "minilm_modes.png", Path(args.images) / "minilm_modes.png")
    except ImportError:
        print("matplotlib is not installed: no figure")
    print(markdown(result))
    print(f"wrote {out}/minilm_modes.{{json,md,png}} in {result['runtime_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()
