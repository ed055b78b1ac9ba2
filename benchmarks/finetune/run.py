"""One fine-tuning run, measured: meant to run alone in a fresh process (see ``finetune.py``)."""

from __future__ import annotations

import gc
import os
import time

import torch
import torch.nn.functional as F

from _common import peak_rss_mib, reset_peak_rss, rss_mib


def rss_file_mib() -> float:
    """File-backed resident pages (code and mapped files), MiB; NaN where not reported."""
    import re
    from pathlib import Path

    m = re.search(r"RssFile:\s+(\d+)", Path("/proc/self/status").read_text())
    return int(m.group(1)) / 1024 if m else float("nan")

from .methods import METHODS, Spec
from .tasks import TASKS


def _batches(enc: dict, y: torch.Tensor, batch: int, seed: int):
    """Endless shuffled batches: a fresh permutation each epoch (drawn from ``seed``), last partial batch dropped."""
    g = torch.Generator().manual_seed(seed)
    n = len(y)
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch + 1, batch):
            idx = perm[i : i + batch]
            yield {k: v[idx] for k, v in enc.items()}, y[idx]


@torch.no_grad()
def evaluate(model, tok, texts: list[str], y: torch.Tensor, max_length: int, device) -> tuple[float, float]:
    """Accuracy and mean cross-entropy; batches of similar lengths, padded to their longest (same
    numbers as padding to ``max_length``, faster)."""
    was = model.training
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    correct, loss = 0, 0.0
    for i in range(0, len(order), 64):
        idx = order[i : i + 64]
        x = tok([texts[j] for j in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        logits = model(**{k: v.to(device) for k, v in x.items()}).logits.float()
        yy = y[idx].to(device)
        correct += int((logits.argmax(-1) == yy).sum())
        loss += float(F.cross_entropy(logits, yy, reduction="sum"))
    model.train(was)
    return correct / len(texts), loss / len(texts)


class Memory:
    """Whole-run peak: on CPU the process's VmHWM, reset when the model and data are ready, minus
    the RSS at that moment; on CUDA ``max_memory_allocated`` minus the memory allocated then."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device) / 2**20
            self.reset_ok = True
        else:
            self.reset_ok = reset_peak_rss()
            self.baseline = rss_mib()

    def peak(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / 2**20 - self.baseline
        return peak_rss_mib() - self.baseline

    def now(self) -> float:
        if self.cuda:
            return torch.cuda.memory_allocated(self.device) / 2**20 - self.baseline
        return rss_mib() - self.baseline


def run(spec: dict) -> dict:
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec["device"])
    from workloads import load_minilm

    data = TASKS[spec["task"]](spec["n_train"], spec["n_val"], spec["n_test"])
    seed, batch, L, total = int(spec["seed"]), int(spec["batch"]), int(spec["max_length"]), int(spec["steps"])
    torch.manual_seed(seed)  # the fresh head (and any random init of a method, dropout, BAdam's block order)
    model, tok = load_minilm(2)
    model.to(device)
    enc = tok(data.train, padding="max_length", truncation=True, max_length=L, return_tensors="pt")
    enc = {k: v.to(device) for k, v in enc.items()}
    y_train = data.y_train.to(device)
    n_weights = sum(p.numel() for p in model.parameters())
    rss_loaded = rss_mib()
    # One no-grad forward of a training batch in eval mode (no randomness, nothing changes): it pages
    # in the forward's code and the math libraries' lazy state (~60 MiB of file-backed pages on CPU),
    # which inference of the loaded model needs too. The whole-run peak then counts what training adds.
    model.eval()
    with torch.no_grad():
        model(**{k: v[:batch] for k, v in enc.items()})
    model.train()
    mem = Memory(device)
    mem.start()  # the model is loaded and the data tokenized: the whole-run window starts here
    file_start = rss_file_mib()

    m = METHODS[spec["method"]]
    setup = m.build(model, float(spec["lr"]), Spec(total, len(data.train) // batch, seed))
    model, opt = setup.model, setup.optimizer
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / total))  # linear decay to 0
    setup_peak = mem.peak()
    data_iter = _batches(enc, y_train, batch, seed)
    trainable, ever = [], {}
    peak_trace, rss_trace, losses = [], [], []
    model.train()
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for step in range(1, total + 1):
        x, y = next(data_iter)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(**x).logits, y)
        loss.backward()
        opt.step()
        sched.step()
        if setup.on_step:
            setup.on_step(step)
        live = [(id(p), p.numel()) for p in model.parameters() if p.requires_grad]
        trainable.append(sum(n for _, n in live))
        ever.update(live)
        losses.append(round(float(loss.detach()), 4))
        peak_trace.append(round(mem.peak(), 1))
        rss_trace.append(round(mem.now(), 1))
    sync()
    wall = time.perf_counter() - t0
    peak = mem.peak()
    file_end = rss_file_mib()
    info = setup.info()
    val_acc, val_loss = evaluate(model, tok, data.val, data.y_val, L, device)
    test_acc, test_loss = evaluate(model, tok, data.test, data.y_test, L, device)
    final_peak = peak_trace[-1]
    peak_step = next(i + 1 for i, v in enumerate(peak_trace) if v >= final_peak)
    return {
        "task": spec["task"], "method": spec["method"], "lr": float(spec["lr"]), "seed": seed, "sig": spec["sig"],
        "val_acc": val_acc, "val_loss": val_loss, "test_acc": test_acc, "test_loss": test_loss,
        "majority": data.majority(), "n_weights": n_weights,
        "trainable_max": max(trainable), "trainable_end": trainable[-1], "trainable_first": trainable[0],
        "trained_over_run": sum(ever.values()),
        "peak_mib": peak, "baseline_mib": mem.baseline, "reset_ok": mem.reset_ok, "setup_peak_mib": setup_peak,
        "rss_loaded_mib": rss_loaded, "rss_file_growth_mib": file_end - file_start,
        "peak_step": peak_step, "peak_trace_mib": peak_trace, "rss_trace_mib": rss_trace, "loss_trace": losses,
        "wall_s": wall, "steps": total, "step_s": wall / total, "process_s": time.perf_counter() - t_start,
        "device": str(device), "threads": int(spec["threads"]), "loadavg_start": load_start,
        "loadavg_end": os.getloadavg()[0], "info": info,
    }
