"""One training run of one method on one task with one seed, measured.

Methods (``kind`` in the config):

* ``plain`` - the base optimizer. Shadows computed on the same run, evaluated along the run: EMA
  of the weights, SWA (``torch.optim.swa_utils``, BatchNorm statistics recomputed with
  ``update_bn``), online CMD (``modeopt.OnlineCMD``, BatchNorm statistics modelled), and at the end
  post-hoc CMD of the recorded trajectory (the paper's finding: the modelled weights often test better).
* ``gradual`` - ``modeopt.OnlineCMDOptimizer`` with gradual embedding (the trained model is evaluated).
* ``cmd`` - ``modeopt.CMDOptimizer`` (any of its options).
* ``dldr`` - ``modeopt.baselines.SubspaceOptimizer`` (DLDR / P-SGD, a dense PCA subspace).
* ``lora`` - LoRA adapters via ``peft`` (fine-tuning tasks).
"""

from __future__ import annotations

import re
import statistics
import time
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn
from tqdm.auto import tqdm

import modeopt
from modeopt.baselines import SubspaceOptimizer

from tasks import Task, make_optimizer

EXCLUDES = {
    "none": None,
    "1d": lambda n, p: p.ndim < 2,  # biases, norm scales
}


def _exclude(spec: str | None, task: Task):
    spec = spec or "none"
    parts = spec.split("+")
    preds = []
    for part in parts:
        if part == "head":
            if task.head is None:
                raise ValueError(f"task {task.name} has no fresh head to exclude")
            preds.append(lambda n, p, h=task.head: n.startswith(h + "."))
        elif part == "embeddings":
            preds.append(lambda n, p: "embeddings" in n)
        elif part in EXCLUDES:
            if EXCLUDES[part] is not None:
                preds.append(EXCLUDES[part])
        else:
            raise ValueError(f"unknown exclude {part!r}: none, 1d, head, embeddings (joined with +)")
    return (lambda n, p: any(f(n, p) for f in preds)) if preds else None


def _peak_mib() -> float:
    try:
        return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024
    except (OSError, AttributeError):
        return float("nan")


def _bn_refresh(model, task: Task) -> None:
    if task.bn_inputs is not None and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        update_bn(task.bn_inputs(), model)


def run_one(cfg: dict, task: Task, method: dict, seed: int) -> dict:
    kind = method["kind"]
    spe = task.steps_per_epoch
    total = int(round(float(cfg["epochs"]) * spe))
    eval_every = int(cfg.get("eval_every", spe))
    model = task.build(seed)
    freeze = cfg.get("freeze")  # e.g. "embeddings": parameters frozen in every method
    if freeze:
        for n, p in model.named_parameters():
            if freeze in n:
                p.requires_grad_(False)
    steps = lambda key: int(round(float(method[key]) * spe)) if key in method else None  # noqa: E731
    shadows = {}
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=int(method.get("r", 4)), lora_alpha=int(method.get("alpha", 8)),
                          target_modules=list(method.get("targets", ["query", "value"])), lora_dropout=0.0,
                          modules_to_save=[task.head] if task.head else None)
        model = get_peft_model(model, lcfg)
    params = [p for p in model.parameters() if p.requires_grad]
    base = make_optimizer(cfg, params, method.get("lr"))
    opt = base
    if kind == "cmd":
        opt = modeopt.CMDOptimizer(
            model, base, n_modes=int(method["n_modes"]), warmup_steps=steps("warmup_epochs"),
            snapshot_every=int(method.get("snapshot_every", 5)), n_samples=int(method.get("n_samples", 1000)),
            seed=seed, exclude=_exclude(method.get("exclude"), task),
            recluster_every=steps("recluster_every_epochs"), recluster_steps=steps("recluster_full_epochs"),
            init=method.get("init", "keep"), record_dtype=getattr(torch, method.get("record_dtype", "float32")),
            progress=False)
    elif kind == "dldr":
        opt = SubspaceOptimizer(model, base, dim=int(method["dim"]), warmup_steps=steps("warmup_epochs"),
                                snapshot_every=int(method.get("snapshot_every", 5)),
                                exclude=_exclude(method.get("exclude"), task))
    elif kind == "gradual":
        opt = modeopt.OnlineCMDOptimizer(
            model, base, n_modes=int(method.get("n_modes", 10)), fit_at=steps("fit_epochs"),
            snapshot_every=int(method.get("snapshot_every", 5)), sample_every=int(method.get("sample_every", 5)),
            seed=seed, embed_every=steps("embed_every_epochs"), embed_fraction=float(method.get("embed_fraction", 0.1)),
            granularity=method.get("granularity", "tensor"))
    elif kind == "plain":
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(float(cfg.get("ema_decay", 0.995))), use_buffers=True)
        swa = AveragedModel(model)
        swa_start = int(round(float(cfg.get("swa_start_epochs", cfg["epochs"] * 0.5)) * spe))
        swa_every = int(cfg.get("swa_every", max(1, spe // 4)))
        rec = modeopt.TrajectoryRecorder(model, every=int(cfg.get("posthoc_every", 5)), dtype=torch.bfloat16)
        online = modeopt.OnlineCMD(model, n_modes=int(cfg.get("online_modes", 10)),
                                   fit_at=int(round(float(cfg.get("online_fit_epochs", cfg["epochs"] * 0.25)) * spe)),
                                   snapshot_every=int(cfg.get("posthoc_every", 5)),
                                   sample_every=int(cfg.get("online_sample_every", 5)), seed=seed)
        shadow_curve = {"ema": [], "swa": [], "online": []}
    elif kind != "lora":
        raise ValueError(f"unknown method kind {kind!r}")

    data = task.batches(seed)
    curve, step_times, phases = [], [], []
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    switch_step = None
    bar = tqdm(total=total, desc=f"{method['name']} seed {seed}", mininterval=2.0, leave=False)
    model.train()
    for step in range(1, total + 1):
        batch = next(data)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = task.loss(model, batch)
        loss.backward()
        opt.step()
        step_times.append(time.perf_counter() - t0)
        phase = getattr(opt, "phase", "plain")
        phases.append(phase)
        if switch_step is None and phase == "embedded":
            switch_step = step
            trainable = opt.trainable_parameters()
        if kind == "plain":
            ema.update_parameters(model)
            if step >= swa_start and (step - swa_start) % swa_every == 0:
                swa.update_parameters(model)
            rec.step()
            online.update()
        if step % eval_every == 0 or step == total:
            curve.append((step, task.evaluate(model), float(loss.detach())))
            if kind == "plain":
                shadow_curve["ema"].append((step, task.evaluate(ema.module)))
                if step >= swa_start:
                    _bn_refresh(swa.module, task)
                    shadow_curve["swa"].append((step, task.evaluate(swa.module)))
                if online.phase == "fitted":
                    with online.applied() as m:
                        shadow_curve["online"].append((step, task.evaluate(m)))
        bar.update()
    bar.close()
    final = curve[-1][1]
    out = {
        "method": method["name"], "kind": kind, "seed": seed, "curve": curve, "final": final,
        "best": max(c[1] for c in curve), "trainable": trainable, "switch_step": switch_step,
        "total_steps": total, "peak_mib": _peak_mib(),
        "switches": [h["step"] for h in getattr(opt, "history", [])] or ([switch_step] if switch_step else []),
    }
    late = [t for t, ph in zip(step_times, phases) if ph == "embedded"] if switch_step else step_times[len(step_times) // 2:]
    out["step_ms"] = statistics.median(late) * 1e3
    if kind == "gradual":
        out["frozen_fraction"] = opt.frozen_fraction()
        out["trainable_end"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        opt.eval()
        out["shadow_final"] = task.evaluate(model)
        opt.train()
    if kind == "plain":
        for k, c in shadow_curve.items():
            if c:
                shadows[k] = c[-1][1]
                shadows[k + "_best"] = max(v for _, v in c)
        out["shadow_curves"] = shadow_curve
        traj = rec.trajectory()
        for m in cfg.get("posthoc_modes", [10]):
            d = modeopt.decompose(traj, n_modes=int(m), seed=seed)
            d.load_into(model, -1)
            _bn_refresh(model, task)
            shadows[f"posthoc_M{m}"] = task.evaluate(model)
        out["shadows"] = shadows
    return out
