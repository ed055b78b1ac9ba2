"""FedAvg in mode space: 8 non-IID MNIST clients send M numbers per round instead of 30 k weights.

Simulated in one process (real MNIST digits, ``workloads.mnist_subset``; SmallCNN). Every
method runs the same rounds with the same client data, seeds and local training:

* ``FedAvg`` - clients send all N weights every round (the baseline).
* ``CMD-FedAvg`` - the first ``--warmup-rounds`` are plain FedAvg (N weights each way); the server
  (a CMDOptimizer over SGD(lr=1), see ``modeopt.cmd_optimizer.federated``) records the global model every round
  and then switches to mode space; from then on clients train and send only the M mode scalars
  (variant "M only": everything embedded) or the M scalars plus the biases (variant "M + biases").

Usage::

    python examples/federated/fedavg.py                 # ~3 min on 2 CPU cores
    python examples/federated/fedavg.py --seeds 0 1 2 --rounds 40

Writes ``benchmarks/results/federated.json`` and ``federated.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import modeopt
from modeopt.cmd_optimizer import federated
from workloads import mnist_subset
from workloads import SmallCNN, evaluate

ROOT = Path(__file__).resolve().parents[2]


def dirichlet_split(y: torch.Tensor, n_clients: int, alpha: float, seed: int) -> list[torch.Tensor]:
    """Non-IID split: each class is divided among the clients in Dirichlet(alpha) proportions."""
    g = torch.Generator().manual_seed(seed)
    parts: list[list[torch.Tensor]] = [[] for _ in range(n_clients)]
    dirichlet = torch.distributions.Dirichlet(torch.full((n_clients,), float(alpha)))
    for c in range(int(y.max()) + 1):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        torch.manual_seed(seed * 1000 + c)
        share = dirichlet.sample()
        cuts = (share.cumsum(0) * idx.numel()).round().long().tolist()[:-1]
        for k, piece in enumerate(torch.tensor_split(idx, cuts)):
            parts[k].append(piece)
    return [torch.cat(p) for p in parts]


def local_train(model, space, x, y, *, epochs: int, batch: int, lr: float, seed: int) -> None:
    """A client's local update: fresh Adam on its trainable parameters (r + excluded in mode space)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            if space is not None:
                space.sync()  # w += a * dr: the client's weights follow its r


def run(method: dict, data, split, cfg, seed: int) -> dict:
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    glob = SmallCNN()
    client = SmallCNN()
    server_base = torch.optim.SGD(glob.parameters(), lr=1.0)  # FedAvg = SGD(lr=1) on p - mean(p_k)
    if method["modes"] is None:
        server = server_base
    else:
        server = modeopt.CMDOptimizer(glob, server_base, n_modes=method["modes"], warmup_steps=cfg.warmup_rounds,
                                      snapshot_every=1, n_samples=30 * method["modes"], seed=seed,
                                      exclude=method["exclude"], mode_scale="rms", progress=False)
    sizes = [len(idx) for idx in split]
    rounds, space, phase = [], None, "warmup"
    for rnd in range(cfg.rounds):
        if method["modes"] is not None and server.phase != phase:  # the server switched: so do clients
            phase = server.phase
            if space is not None:
                space.remove()
            space = federated.replicate(server, client)
        down = federated.payload(glob)  # what the server broadcasts this round
        states = []
        for k, idx in enumerate(split):
            if method["modes"] is None:
                client.load_state_dict(glob.state_dict())
            else:
                federated.pull(space, server, client)  # the broadcast r (+ excluded) -> the client's weights
            local_train(client, space, xtr[idx], ytr[idx], epochs=cfg.local_epochs, batch=cfg.batch, lr=cfg.lr,
                        seed=seed * 100_000 + rnd * 100 + k)
            states.append(federated.payload(client))
        up = federated.payload_bytes(states[0])
        federated.server_round(server, states, sizes, model=glob)
        rounds.append({"round": rnd + 1, "phase": phase, "upload_bytes_per_client": up,
                       "download_bytes_per_client": federated.payload_bytes(down),
                       "test_acc": evaluate(glob, xte, yte)})
    return {"rounds": rounds, "n_weights": sum(p.numel() for p in glob.parameters())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of the label split")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup-rounds", type=int, default=10)
    ap.add_argument("--modes", type=int, default=10)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "federated"))
    cfg = ap.parse_args()
    torch.set_num_threads(cfg.threads)

    data = mnist_subset()
    methods = {
        "FedAvg (full weights)": {"modes": None, "exclude": None},
        f"CMD-FedAvg, M = {cfg.modes} only": {"modes": cfg.modes, "exclude": None},
        f"CMD-FedAvg, M = {cfg.modes} + biases": {"modes": cfg.modes, "exclude": lambda n, p: p.ndim < 2},
    }
    results: dict[str, list[dict]] = {name: [] for name in methods}
    t0 = time.perf_counter()
    for seed in cfg.seeds:
        split = dirichlet_split(data[1], cfg.clients, cfg.alpha, seed)
        for name, method in methods.items():
            t = time.perf_counter()
            res = run(method, data, split, cfg, seed)
            res.update(seed=seed, seconds=time.perf_counter() - t, client_sizes=[len(i) for i in split])
            results[name].append(res)
            print(f"seed {seed} {name:32s} final acc {res['rounds'][-1]['test_acc']:.3f} "
                  f"({res['seconds']:.0f} s)", flush=True)
    write(results, cfg, time.perf_counter() - t0)


def summarize(results: dict, cfg) -> list[dict]:
    rows = []
    for name, runs in results.items():
        first = runs[0]["rounds"]
        late = [r for r in first if r["round"] > cfg.warmup_rounds] or first
        up_total = sum(r["upload_bytes_per_client"] for r in first) * cfg.clients
        accs = torch.tensor([run["rounds"][-1]["test_acc"] for run in runs])
        at_switch = torch.tensor([run["rounds"][cfg.warmup_rounds - 1]["test_acc"] for run in runs])
        rows.append({
            "method": name, "n_weights": runs[0]["n_weights"],
            "bytes_per_client_per_round_after_warmup": late[0]["upload_bytes_per_client"],
            "upload_bytes_all_clients_whole_run": up_total,
            "acc_at_round_warmup": at_switch.mean().item(), "final_acc_mean": accs.mean().item(),
            "final_acc_per_seed": accs.tolist(),
        })
    return rows


def write(results: dict, cfg, seconds: float) -> None:
    rows = summarize(results, cfg)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"clients": cfg.clients, "alpha": cfg.alpha, "rounds": cfg.rounds, "warmup_rounds": cfg.warmup_rounds,
            "modes": cfg.modes, "local_epochs": cfg.local_epochs, "batch": cfg.batch, "client_optimizer":
            f"Adam(lr={cfg.lr}), fresh each round", "server": "SGD(lr=1) on the pseudo-gradient (= FedAvg)",
            "seeds": cfg.seeds, "threads": cfg.threads, "seconds": round(seconds, 1), "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(), "model": "workloads.SmallCNN",
            "data": "workloads.mnist_subset(): 4,000 train / 1,000 test real MNIST digits"}
    out.with_suffix(".json").write_text(json.dumps({"config": meta, "summary": rows, "runs": results}, indent=1))
    n = rows[0]["n_weights"]
    lines = [
        "# Federated averaging in mode space (`examples/federated/fedavg.py`)", "",
        f"{cfg.clients} clients, non-IID (Dirichlet alpha = {cfg.alpha} over labels) split of 4,000 real MNIST "
        f"digits, SmallCNN ({n:,} weights), {cfg.rounds} rounds of {cfg.local_epochs} local epoch(s) "
        f"(Adam lr {cfg.lr}, batch {cfg.batch}, fresh each round), FedAvg weighted by client size. CMD-FedAvg: "
        f"rounds 1-{cfg.warmup_rounds} are plain FedAvg (the shared warm-up, recorded by the server), then "
        f"M = {cfg.modes} modes. Test accuracy on 1,000 held-out digits, mean over seeds {cfg.seeds}. "
        f"Single process simulation, {seconds:.0f} s in all.", "",
        "| method | sent per client per round after round "
        f"{cfg.warmup_rounds} (each way) | upload, all clients, {cfg.rounds} rounds | test acc at round "
        f"{cfg.warmup_rounds} | final test acc (per seed) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        per_seed = ", ".join(f"{a:.3f}" for a in r["final_acc_per_seed"])
        lines.append(f"| {r['method']} | {r['bytes_per_client_per_round_after_warmup']:,} B | "
                     f"{r['upload_bytes_all_clients_whole_run'] / 1e6:.2f} MB | {r['acc_at_round_warmup']:.3f} | "
                     f"**{r['final_acc_mean']:.3f}** ({per_seed}) |")
    lines += ["", f"Warm-up rounds send all {n:,} weights ({4 * n:,} B) each way, for every method. At the "
              "switch the modes need no transfer (each client decomposes the global models it received with the "
              f"server's seed) or, sent once, {5 * n:,} B per client (a uint8 label and a float32 `a` per weight).",
              ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
