"""Fine-tuning a bf16 decoder at the largest scale this machine holds: whole-run peak memory and
step time of plain AdamW, LoRA, BAdam, BlockwiseCMD and CMDOptimizer (issue 25, part 3).

    python benchmarks/scale.py                   # the scale run (a Llama-shaped decoder, 324.8 M weights)
    python benchmarks/scale.py --smoke           # a tiny config (~2 M weights), seconds per method
    python benchmarks/scale.py --size mid --methods blockwise cmd_disk   # some rows, merged into the results
    python benchmarks/scale.py --report-only     # rebuild scale.md from scale.json

The model is a ``LlamaForCausalLM`` built from a ``LlamaConfig`` with random weights, created
directly in bfloat16 (no float32 copy ever exists, no download); the data are synthetic tokens
(uniform over the vocabulary, labels = inputs, the causal-LM loss). Every method gets the same
batches, AdamW (``fused=True``, lr 5e-5, weight decay 0: what ``transformers.Trainer`` builds for a
bf16 model by default, ``optim="adamw_torch_fused"``) and runs in a fresh process.

Methods (``METHODS`` below):

* ``plain``: AdamW on every weight of the bf16 model (its state in bf16, as the Trainer's).
* ``lora``: peft LoRA r = 8, alpha 16, on q_proj and v_proj (peft's Llama default), dropout 0.
* ``badam``: ``badam.BlockOptimizer`` (1.4) around AdamW, blocks = the decoder layers, random
  order, a switch every ``--badam-every`` steps; it keeps a float32 copy of the active block and
  steps AdamW on it (its mixed-precision scheme).
* ``blockwise``: ``modeopt.BlockwiseCMD`` (blocks = the decoder layers, top first, 3 steps per block,
  a snapshot every step, M = 10, bf16 recording and ``a``), run until every block is embedded, then
  ``--steps`` embedded steps.
* ``cmd_disk``: ``modeopt.CMDOptimizer`` with ``record_dir`` (the recording in a memory-mapped file),
  ``record_dtype`` and ``coef_dtype`` bf16, 3 warm-up steps (T = 3), M = 10, 1-D tensors excluded.
* ``cmd_ram``: the same with the recording in RAM.
* ``blockwise_q8`` / ``cmd_disk_q8``: ``blockwise`` / ``cmd_disk`` with ``coef_dtype=torch.int8`` (8-bit
  ``a``, 4-bit labels).

Sizes (``--size``): ``scale`` (324.8 M weights), ``m80`` (84.2 M), ``mid`` (20.8 M), ``smoke`` (1.3 M).
Rows are merged into the existing ``scale.json`` (``--fresh`` starts a new one); ``--add-partial``
stores the steps of a run stopped before its end, from its log.

Memory. Each child runs with glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_=65536``, as in
``memory.py``) so freed blocks leave RSS. Once the model is built and one no-grad forward has paged
in the code, the high-water mark is reset (``/proc/self/clear_refs`` = 5) and the RSS at that moment
is the baseline; the whole-run peak is ``VmHWM - baseline`` at the end. A sampler thread reads
``/proc/self/status`` every 5 ms and keeps the largest ``RssAnon`` / ``RssFile`` / ``VmRSS`` above the
baseline per phase and per stage (``forward``, ``backward``, ``optimizer``, and inside the switch
``decompose`` / ``embed_block`` / ...): that says where a peak is, and that the pages of a
``record_dir`` recording are file-backed. After every step the tensors the method holds are
counted (gradients, optimizer state, recording, ``a`` / labels / ``r``, BAdam's float32 copies):
"census"; beside it the bytes the code's own documentation predicts: "formula".

Step time: the median per phase of the wall time of zero_grad + forward + backward + step, with the
1-minute load average at the start and end of each child (the machine may be shared).

Results: ``benchmarks/results/scale.{json,md}`` (``--smoke``: ``/tmp/scale-smoke``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: LlamaConfig fields by size. "scale": 8 layers of width 1536 (MLP 4096, 12 heads of 128), a 32,000-token
#: vocabulary, untied head: 324.8 M weights (650 MB in bf16). "m80" (83 M) and "mid" (20 M): the same shape,
#: smaller, for what cannot run at "scale" here (docs/scale.md).
SIZES = {
    "scale": dict(vocab_size=32000, hidden_size=1536, intermediate_size=4096, num_hidden_layers=8,
                  num_attention_heads=12, num_key_value_heads=12),
    "m80": dict(vocab_size=16000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=8),
    "mid": dict(vocab_size=8000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=8),
    "smoke": dict(vocab_size=2000, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=4),
}
SHAPES = {"scale": (1, 32), "m80": (1, 32), "mid": (1, 32), "smoke": (1, 16)}  # batch x sequence length
LR = 5e-5  # the Trainer's default
N_MODES = 10
STEPS_PER_BLOCK = 3  # BlockwiseCMD: the fewest that record 3 snapshots at snapshot_every = 1
WARMUP = 3  # CMDOptimizer: T = 3 snapshots

METHODS = {
    "plain": "plain AdamW, every weight (bf16 weights and state)",
    "lora": "LoRA r = 8 on q_proj, v_proj (peft)",
    "badam": "BAdam (badam 1.4 BlockOptimizer, one decoder layer at a time)",
    "blockwise": "modeopt.BlockwiseCMD (one layer at a time, then its 10 modes), coef_dtype bf16",
    "cmd_disk": "modeopt.CMDOptimizer, record_dir + bf16 recording",
    "cmd_ram": "modeopt.CMDOptimizer, bf16 recording in RAM",
    "blockwise_q8": "modeopt.BlockwiseCMD as above, coef_dtype int8 (8-bit a, 4-bit labels: its default)",
    "cmd_disk_q8": "modeopt.CMDOptimizer, record_dir + bf16 recording, coef_dtype int8",
}


# ------------------------------------------------------------------------------------------ memory
def _status() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, RssShmem, VmHWM of this process, bytes."""
    text = Path("/proc/self/status").read_text()
    return {k: int(v) * 1024 for k, v in re.findall(r"^(VmRSS|RssAnon|RssFile|RssShmem|VmHWM):\s+(\d+) kB", text, re.M)}


class Sampler:
    """A thread that keeps, per (phase, stage), the largest RSS components above a baseline."""

    KEYS = ("VmRSS", "RssAnon", "RssFile")

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.step, self.stage = 0, "other"  # step 0: building the optimizer
        self.base = _status()
        self.peaks: dict[tuple[int, str], dict[str, int]] = {}
        #: per wrapped stage, per call: bytes of the tensors its result holds, by field
        self.returned: dict[str, list[dict[str, int]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.base = _status()
        self._thread.start()

    def _note(self) -> None:
        s = _status()
        key = (self.step, self.stage)
        cur = self.peaks.setdefault(key, {k: -(1 << 62) for k in self.KEYS})
        for k in self.KEYS:
            cur[k] = max(cur[k], s[k] - self.base[k])

    def _run(self) -> None:
        while not self._stop.is_set():
            self._note()
            time.sleep(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    @contextlib.contextmanager
    def in_stage(self, stage: str):
        before = self.stage
        self._note()
        self.stage = stage
        try:
            yield
        finally:
            self._note()
            self.stage = before

    def wrap(self, dotted: str, stage: str) -> bool:
        """Run ``module.attr`` (a function or class) in ``stage``; False where it does not exist."""
        mod_name, attr = dotted.rsplit(".", 1)
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            return False
        fn = getattr(mod, attr, None)
        if fn is None:
            return False
        sampler = self

        def wrapped(*args, **kwargs):
            with sampler.in_stage(stage):
                out = fn(*args, **kwargs)
            sampler.returned.setdefault(stage, []).append(_tensor_bytes(out))
            return out

        setattr(mod, attr, wrapped)
        return True

    def by(self, label) -> dict[str, dict[str, int]]:
        """The peaks merged by ``label(step, stage)``."""
        out: dict[str, dict[str, int]] = {}
        for (step, stage), v in self.peaks.items():
            cur = out.setdefault(label(step, stage), {k: -(1 << 62) for k in self.KEYS})
            for k in self.KEYS:
                cur[k] = max(cur[k], v[k])
        return out


def _tensor_bytes(obj) -> dict[str, int]:
    """Bytes of the tensors a function returned, by field (dataclass / namedtuple / object fields, lists
    of tensors summed); {} for anything else (a module, a ModeSpace's own fields are counted by the census)."""
    import torch

    fields = getattr(obj, "__dataclass_fields__", None)
    items = ({k: getattr(obj, k) for k in fields} if fields else obj._asdict() if hasattr(obj, "_asdict") else {})
    out = {}
    for k, v in items.items():
        ts = v if isinstance(v, (list, tuple)) else [v]
        b = nbytes(t for t in ts if isinstance(t, torch.Tensor))
        if b:
            out[k] = b
    return out


def reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


# ----------------------------------------------------------------------------------------- methods
def _adamw(params):
    import torch

    return torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=True)


class Method:
    """Builds the optimizer of one method; says its phase, what it holds (census) and what its
    documented memory formulas predict."""

    uses_record_dir = False

    def __init__(self, model, spec: dict, tmp: str):
        self.model, self.spec, self.tmp = model, spec, tmp
        self.n = sum(p.numel() for p in model.parameters())
        self.opt = self.build()

    def build(self):
        return _adamw([p for p in self.model.parameters() if p.requires_grad])

    def phase(self) -> str:
        return "train"

    def base(self):
        return self.opt

    def census(self) -> dict[str, int]:
        """Bytes of the tensors the method holds beyond the model's weights, by kind."""
        import torch

        base = self.base()
        seen = {id(p) for p in self.model.parameters()}
        return {
            "grads": nbytes(p.grad for p in self.model.parameters()),
            "optimizer_state": nbytes(v for s in base.state.values() for v in s.values()
                                      if isinstance(v, torch.Tensor) and v.numel() > 1),
            "extra_params": nbytes(p for g in base.param_groups for p in g["params"] if id(p) not in seen),
        }

    def formula(self, phase: str) -> dict[str, float]:
        """Bytes the project's documented accounting predicts for ``phase`` (see each subclass)."""
        return {}

    def info(self) -> dict:
        return {}


class Plain(Method):
    def formula(self, phase):
        # torch AdamW keeps exp_avg and exp_avg_sq in the parameter's dtype (bf16): 2 x 2 B, gradient 2 B
        return {"grads": 2 * self.n, "optimizer_state": 4 * self.n}


class Lora(Method):
    def build(self):
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        self.model = get_peft_model(self.model, cfg)
        self.adapters = [p for p in self.model.parameters() if p.requires_grad]
        return _adamw(self.adapters)

    def census(self):
        out = super().census()
        out["extra_params"] = nbytes(self.adapters)  # new weights, beyond the model as loaded
        return out

    def formula(self, phase):
        # peft keeps the adapters in float32 for a bf16 base (autocast_adapter_dtype): 4 B grad + 8 B AdamW each;
        # the adapters themselves are new weights (4 B each). No accounting in peft: from the tensors.
        a = sum(p.numel() for p in self.adapters)
        return {"grads": 4 * a, "optimizer_state": 8 * a, "extra_params": 4 * a}


class BAdam(Method):
    def build(self):
        import warnings

        from badam import BlockOptimizer

        n_layers = self.model.config.num_hidden_layers
        blocks = [[f"model.layers.{i}."] for i in range(n_layers)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return BlockOptimizer(_adamw(self.model.parameters()), list(self.model.named_parameters()),
                                  block_prefix_list=blocks, switch_block_every=self.spec["badam_every"],
                                  switch_mode="random", verbose=0)

    def base(self):
        return self.opt.base_optimizer

    def census(self):
        out = super().census()
        out["extra_params"] = nbytes(self.opt.param_idx2hp.values())  # float32 copies of the active block
        out["grads"] += nbytes(p.grad for p in self.opt.param_idx2hp.values())
        return out

    def formula(self, phase):
        # badam has no memory accounting: from the tensors it holds. Per weight of the active block: a float32
        # copy (4 B) and AdamW state on it (8 B); its bf16 gradient (2 B) is turned into a float32 one (4 B)
        # during the step, and both are dropped after it.
        block = sum(p.numel() for n, p in self.model.named_parameters() if n.startswith("model.layers.0."))
        return {"extra_params": 4 * block, "optimizer_state": 8 * block, "grads": 2 * block}


class Blockwise(Method):
    coef_dtype = "bf16"  # bf16 a (BlockwiseCMD's default is int8: the blockwise_q8 row)
    coef_bytes = 3.0  # a (bf16) + label (uint8) per weight

    def build(self):
        import torch

        import modeopt
        from modeopt.blockwise.optimizer import find_blocks

        self.blocks = find_blocks(self.model)[::-1]
        kw = {"coef_dtype": torch.bfloat16 if self.coef_dtype == "bf16" else self.coef_dtype}
        return modeopt.BlockwiseCMD(self.model, _adamw(self.model.parameters()), self.blocks,
                                    steps_per_block=STEPS_PER_BLOCK, n_modes=N_MODES, snapshot_every=1,
                                    n_samples=self.spec["n_samples"], seed=0, **kw)

    def phase(self):
        return "embedded" if self.opt.phase == "embedded" else "block"

    def base(self):
        return self.opt.base

    def census(self):
        out = super().census()
        out["recording"] = int(self.opt.recording_bytes)
        out["a"] = nbytes(t for s in self.opt.spaces for t in s.a)
        out["a"] += nbytes(t for s in self.opt.spaces for t in (getattr(s, "a_scale", None) or []))
        out["labels"] = nbytes(t for s in self.opt.spaces for t in s.labels)
        out["r"] = (nbytes(t for s in self.opt.spaces for t in s.r_params)
                    + nbytes(t for s in self.opt.spaces for t in (s.r_in_weights, getattr(s, "r_base", None))))
        return out

    def formula(self, phase):
        # BlockwiseCMD's docstring: "the active block's gradients, base state and steps_per_block //
        # snapshot_every + 1 snapshots of it; a and a label per weight of each finished block (1.5 B with
        # int8 and M <= 16, 3 B with bf16 a)"; docs/optimizer.md 'Memory': a bf16 recording of bf16 weights
        # is (2 T + 2) B per weight (movements + a bf16 anchor); the embedding frees the block's gradients
        # first and its AdamW state once the clustering succeeded, so its worst moment is the scan: the
        # state, the recording and 1 B per weight of "moving" masks. Worst case of the run: the last block,
        # every other block finished.
        emb = [sum(p.numel() for _, p in e) for e in self.opt._emb]
        last = emb[-1]
        done = sum(emb[:-1]) if phase in ("block", "embed") else sum(emb)
        t = STEPS_PER_BLOCK + 1
        finished = {"a": (self.coef_bytes - self._label_bytes()) * done, "labels": done * self._label_bytes()}
        if phase == "block":
            return {"grads": 2 * last, "optimizer_state": 4 * last, "recording": (2 * t + 2) * last, **finished}
        if phase == "embed":
            return {"optimizer_state": 4 * last, "recording": (2 * t + 2) * last, "moving_masks": last, **finished}
        return finished

    def _label_bytes(self) -> float:
        return 1.0 if self.coef_dtype == "bf16" else 0.5

    def info(self):
        return {"blocks": len(self.blocks), "embedded_weights": sum(h["weights"] for h in self.opt.history),
                "steps_per_block": STEPS_PER_BLOCK, "history": [
                    {k: h[k] for k in ("block", "step", "n_modes", "weights")} for h in self.opt.history]}


class BlockwiseQ8(Blockwise):
    coef_bytes = 1.5  # the docstring: "coef_dtype=torch.int8, M <= 16: 1.5 bytes for both" (+ 4 M B per tensor)

    def __init__(self, model, spec, tmp):
        import torch

        self.coef_dtype = torch.int8
        super().__init__(model, spec, tmp)



class CMD(Method):
    uses_record_dir = True
    coef = "bf16"

    def build(self):
        import torch

        import modeopt

        kw = {"record_dir": self.tmp} if self.uses_record_dir else {}
        return modeopt.CMDOptimizer(self.model, _adamw(self.model.parameters()), n_modes=N_MODES,
                                    warmup_steps=WARMUP, snapshot_every=1, n_samples=self.spec["n_samples"], seed=0,
                                    exclude=lambda n, p: p.ndim < 2, record_dtype=torch.bfloat16,
                                    coef_dtype=torch.int8 if self.coef == "int8" else torch.bfloat16,
                                    progress=False, **kw)

    def phase(self):
        return self.opt.phase  # "warmup" / "embedded"

    def base(self):
        return self.opt.base

    def census(self):
        out = super().census()
        rec = int(self.opt.recording_bytes)
        out["recording_file" if self.uses_record_dir else "recording"] = rec
        sp = self.opt.space
        if sp is not None:
            out["a"] = nbytes(sp.a) + nbytes(getattr(sp, "a_scale", None) or [])
            out["labels"] = nbytes(sp.labels)
            out["r"] = nbytes(sp.r_params) + nbytes([sp.r_in_weights, getattr(sp, "r_base", None)])
        return out

    def n_emb(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.ndim >= 2)

    def formula(self, phase):
        # CMDOptimizer's docstring and docs/optimizer.md 'Memory': warm-up recording min(T, max_snapshots) * N *
        # itemsize(record_dtype) + 4 N (the anchor of a bf16 recording), in a file with record_dir whose pages
        # are dropped from the process after each write and read (not resident: "recording_file" is file
        # bytes, not RSS); the switch (modeopt.modespace.streamed_switch): the weights' gradients are freed
        # first, their optimizer state once the clustering succeeded, so its worst moment is the scan with the
        # state and 1 B per weight of "moving" masks; embedded: a label (1 B, M <= 256; 0.5 with int8) and a
        # (2 B in bf16, 1 in int8) per embedded weight, no weight gradients or optimizer state for them.
        n, ne = self.n, self.n_emb()
        rec = (2 * WARMUP + 4) * ne
        key = "recording_file" if self.uses_record_dir else "recording"
        if phase == "warmup":
            return {"grads": 2 * n, "optimizer_state": 4 * n, key: rec}
        if phase == "switch":
            return {"grads": 2 * (n - ne), "optimizer_state": 4 * n, key: rec, "moving_masks": 1 * ne}
        free = n - ne
        a, lab = (1.0, 0.5) if self.coef == "int8" else (2.0, 1.0)
        return {"grads": 2 * free, "optimizer_state": 4 * free, "a": a * ne, "labels": lab * ne}

    def info(self):
        return {"embedded_weights": self.n_emb(), "warmup_steps": WARMUP, "history": [
            {k: h[k] for k in ("step", "n_modes", "sizes")} for h in self.opt.history]}


class CMDRam(CMD):
    uses_record_dir = False


class CMDQ8(CMD):
    coef = "int8"


CLASSES = {"plain": Plain, "lora": Lora, "badam": BAdam, "blockwise": Blockwise, "cmd_disk": CMD, "cmd_ram": CMDRam,
           "blockwise_q8": BlockwiseQ8, "cmd_disk_q8": CMDQ8}

#: functions run under a stage name of their own, so the sampler says where a switch's memory goes
STAGES = {
    "modeopt.cmd_optimizer.optimizer.stream_mode_space": "stream_mode_space",
    "modeopt.cmd_optimizer.optimizer.ModeSpace": "ModeSpace()",
    "modeopt.blockwise.optimizer.embed_block": "embed_block",
    "modeopt.blockwise.optimizer.ModeSpace": "ModeSpace()",
}


# -------------------------------------------------------------------------------------------- child
def child(spec: dict) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    t_start = time.perf_counter()
    load_start = os.getloadavg()
    torch.set_num_threads(int(spec["threads"]))
    torch.manual_seed(0)
    cfg = LlamaConfig(**SIZES[spec["size"]], max_position_embeddings=256, tie_word_embeddings=False)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: no float32 copy of the weights at any time
    try:
        model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    n = sum(p.numel() for p in model.parameters())
    batch, seq = spec["batch"], spec["seq"]
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, cfg.vocab_size, (batch, seq), generator=g) for _ in range(8)]
    rss_built = _status()
    model.eval()
    with torch.no_grad():  # pages in the forward's code and the math libraries' state (inference needs it too)
        model(input_ids=data[0])
    model.train()
    gc.collect()
    sampler = Sampler()
    wrapped = [d for d, s in STAGES.items() if sampler.wrap(d, s)]
    reset_ok = reset_hwm()
    base_status = _status()
    sampler.start()
    tmp = tempfile.mkdtemp(prefix="scale-rec-", dir=spec.get("record_root"))

    with sampler.in_stage("build"):
        m = CLASSES[spec["method"]](model, spec, tmp)
    model, opt = m.model, m.opt
    steps, per_phase_after = [], {}
    target_embedded = spec["steps"]
    i = 0
    while True:
        before = m.phase()
        sampler.step = i + 1
        x = data[i % len(data)]
        t = time.perf_counter()
        with sampler.in_stage("zero_grad"):
            opt.zero_grad(set_to_none=True)
        with sampler.in_stage("forward"):
            loss = model(input_ids=x, labels=x).loss
        with sampler.in_stage("backward"):
            loss.backward()
        with sampler.in_stage("optimizer"):
            opt.step()
        dt = time.perf_counter() - t
        after = m.phase()
        label = before
        if spec["method"].startswith("cmd") and before == "warmup" and after == "embedded":
            label = "switch"
        if spec["method"].startswith("blockwise") and len(opt.history) > sum(1 for s in steps if s["phase"] == "embed"):
            label = "embed"
        st = _status()
        census = m.census()
        steps.append({"step": i + 1, "phase": label, "s": dt, "loss": float(loss.detach()),
                      "hwm_mib": (st["VmHWM"] - base_status["VmRSS"]) / 2**20,
                      "rss_mib": (st["VmRSS"] - base_status["VmRSS"]) / 2**20,
                      "anon_mib": (st["RssAnon"] - base_status["RssAnon"]) / 2**20,
                      "file_mib": (st["RssFile"] - base_status["RssFile"]) / 2**20,
                      "census": census})
        per_phase_after[label] = census
        print(f"step {i + 1:3d} {label:9s} {dt:7.2f} s  loss {float(loss.detach()):.4f}  "
              f"hwm {steps[-1]['hwm_mib']:8.1f} MiB  rss {steps[-1]['rss_mib']:8.1f}  "
              f"file {steps[-1]['file_mib']:7.1f}", flush=True)
        i += 1
        done_phase = after in ("train", "embedded")
        if done_phase and sum(1 for s in steps if s["phase"] == after) >= target_embedded:
            break
        if i > spec["max_steps"]:
            raise RuntimeError(f"{spec['method']}: no end after {i} steps")
    end = _status()
    sampler.stop()
    phase_names = list(dict.fromkeys(s["phase"] for s in steps))
    phases = {}
    for ph in phase_names:
        ss = [s for s in steps if s["phase"] == ph]
        phases[ph] = {"steps": len(ss), "step_s": [round(s["s"], 4) for s in ss],
                      "median_s": statistics.median(s["s"] for s in ss),
                      "census_end": ss[-1]["census"], "formula": m.formula(ph),
                      "census_max": {k: max(s["census"].get(k, 0) for s in ss) for k in ss[-1]["census"]}}
    label_of = {0: "setup", **{s["step"]: s["phase"] for s in steps}}
    mib = lambda d: {ph: {k: v / 2**20 for k, v in val.items()} for ph, val in d.items()}  # noqa: E731
    stages = mib(sampler.by(lambda step, stage: f"{label_of[step]}/{stage}"))
    sampled = mib(sampler.by(lambda step, stage: label_of[step]))
    rec_file = sum(f.stat().st_size for f in Path(tmp).glob("**/*") if f.is_file())
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return {
        "method": spec["method"], "label": METHODS[spec["method"]], "size": spec["size"], "n_weights": n,
        "config": SIZES[spec["size"]], "batch": batch, "seq": seq, "threads": spec["threads"],
        "trainable_end": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "rss_built_mib": rss_built["VmRSS"] / 2**20, "baseline_mib": base_status["VmRSS"] / 2**20,
        "baseline_hwm_before_reset_mib": base_status["VmHWM"] / 2**20, "reset_ok": reset_ok,
        "peak_mib": (end["VmHWM"] - base_status["VmRSS"]) / 2**20,
        "peak_sampled": {k: max(v[k] for v in sampled.values()) for k in Sampler.KEYS},
        "sampled_by_phase": sampled, "sampled_by_stage": stages, "stages_wrapped": wrapped,
        "returned_bytes": sampler.returned,
        "phases": phases, "steps": steps, "info": m.info(), "record_file_bytes_at_end": rec_file,
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "process_s": time.perf_counter() - t_start,
    }


# ------------------------------------------------------------------------------------------- parent
def _commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "modeopt"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + ("+dirty(modeopt)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_child(spec: dict, log_dir: Path) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="131072",
               OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]),
               PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"scale_{spec['size']}_{spec['method']}.log"
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as tmp:
        out = tmp.name
    try:
        with open(log, "w") as f:
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec), "--child-out", out],
                                  stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, timeout=spec["timeout"])
        text = Path(out).read_text()
        if proc.returncode or not text.strip():
            raise SystemExit(f"{spec['method']} failed (exit {proc.returncode}); log {log}:\n{log.read_text()[-3000:]}")
        r = json.loads(text)
        r["commit"] = spec["commit"]
        r["log"] = str(log)
        return r
    finally:
        os.unlink(out)


def _size_table(size: str, rows: dict) -> list[str]:
    any_row = next(iter(rows.values()))
    n = any_row["n_weights"]
    cfg = ", ".join(f"{k}={v}" for k, v in any_row["config"].items())
    lines = [
        f"## {size}: {n / 1e6:,.1f} M weights", "",
        f"LlamaForCausalLM(LlamaConfig({cfg}), untied head), built in bf16 with random weights; synthetic tokens, "
        f"batch {any_row['batch']} x {any_row['seq']}; {any_row['threads']} torch threads.", "",
        "| method | commit | peak MiB | B/w | / plain | / LoRA | anon peak MiB | file peak MiB | trainable at end "
        "| load avg (start, end) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    plain = rows.get("plain", {}).get("peak_mib")
    lora = rows.get("lora", {}).get("peak_mib")
    for r in rows.values():
        p = r["peak_mib"]
        lines.append(
            f"| {r['label']} | {r['commit']} | {p:,.0f} | {p * 2**20 / n:.2f} | "
            f"{(f'{p / plain:.2f}' if plain else '-')} | {(f'{p / lora:.2f}' if lora else '-')} | "
            f"{r['peak_sampled']['RssAnon']:,.0f} | {r['peak_sampled']['RssFile']:,.0f} | {r['trainable_end']:,} | "
            f"{r['loadavg_start'][0]:.1f}, {r['loadavg_end'][0]:.1f} |")
    lines += ["", "Per phase: median step time (s), sampled peak, and bytes per weight: sampled / census / formula.", "",
              "| method | phase | steps | median step s | sampled peak MiB | sampled B/w | census B/w | formula B/w "
              "| formula terms (B/w) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        for ph, v in r["phases"].items():
            s = r["sampled_by_phase"].get(ph, {}).get("VmRSS", float("nan"))
            census = sum(v["census_max"].values())
            formula = sum(v["formula"].values())
            terms = ", ".join(f"{k} {b / n:.2f}" for k, b in v["formula"].items()) or "-"
            lines.append(f"| {name} | {ph} | {v['steps']} | {v['median_s']:.2f} | {s:,.0f} | {s * 2**20 / n:.2f} | "
                         f"{census / n:.2f} | {(f'{formula / n:.2f}' if formula else '-')} | {terms} |")
    lines += ["", "Where the peak is: the largest sampled RSS above the baseline by phase / stage (MiB), top 4 "
              "per method.", "", "| method | phase / stage | VmRSS | RssAnon | RssFile |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        for key, v in sorted(r["sampled_by_stage"].items(), key=lambda kv: -kv[1]["VmRSS"])[:4]:
            lines.append(f"| {name} | {key} | {v['VmRSS']:,.0f} | {v['RssAnon']:,.0f} | {v['RssFile']:,.0f} |")
    t = targets(rows)
    if t:
        lines += ["", f"Targets at {size}:", ""] + [f"- {x}" for x in t]
    return lines + [""]


def report(payload: dict) -> str:
    m = payload["machine"]
    lines = [
        "# Fine-tuning a bf16 decoder: whole-run peak memory and step time by method", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_mib']:,} MiB RAM, no GPU; torch {m['torch']}. "
        "Shared with other jobs: the load average at the start and end of each run is beside it, and step times "
        "are inflated by it. Produced by `benchmarks/scale.py`; see docs/scale.md.", "",
        "AdamW fused, lr 5e-5, weight decay 0 (what `transformers.Trainer` builds for a bf16 model). Each method in a "
        "fresh process. Peak = whole-run VmHWM minus the RSS right after the model was built (one no-grad forward "
        "done, high-water mark reset there); anon / file = the largest sampled RssAnon / RssFile above that "
        "baseline (a `record_dir` recording is file-backed page cache). B/w = bytes per model weight. Census = the "
        "tensors the method holds after a step (gradients, optimizer state, recording, `a`, labels, `r`, BAdam's "
        "float32 copies), largest over the phase; formula = what the code's documented accounting predicts.", "",
    ]
    for size in sorted(payload["sizes"], key=lambda k: -next(iter(payload["sizes"][k].values()))["n_weights"]):
        lines += _size_table(size, payload["sizes"][size])
    for key, part in payload.get("partial", {}).items():
        lines += [f"## Partial run: {key} (stopped after {len(part['steps'])} steps: {part['why']})", "",
                  f"From its log ({part['commit']}); peak = VmHWM above the baseline after each step.", "",
                  "| step | phase | s | peak MiB |", "|---|---|---|---|"]
        lines += [f"| {st['step']} | {st['phase']} | {st['s']:.1f} | {st['hwm_mib']:,.1f} |" for st in part["steps"]]
        lines.append("")
    return "\n".join(lines)


def targets(rows: dict) -> list[str]:
    out = []
    g = {k: rows[k]["peak_mib"] for k in rows}
    for bw in ("blockwise", "blockwise_q8"):
        if {bw, "lora"} <= g.keys():
            ratio = g[bw] / g["lora"]
            out.append(f"{bw}: whole-run peak <= 1.3x LoRA's: {g[bw]:,.0f} vs {g['lora']:,.0f} MiB = "
                       f"{ratio:.2f}x: **{'met' if ratio <= 1.3 else 'not met'}**")
        if {bw, "plain"} <= g.keys():
            ratio = g[bw] / g["plain"]
            out.append(f"{bw}: whole-run peak <= 0.5x plain AdamW's: {g[bw]:,.0f} vs {g['plain']:,.0f} "
                       f"MiB = {ratio:.2f}x: **{'met' if ratio <= 0.5 else 'not met'}**")
    for cd in ("cmd_disk", "cmd_disk_q8"):
        if {cd, "plain"} <= g.keys():
            ratio = g[cd] / g["plain"]
            anon = rows[cd]["peak_sampled"]["RssAnon"] / rows["plain"]["peak_sampled"]["RssAnon"]
            # The warm-up *is* plain AdamW (plus a recording kept out of RAM), so equality is the floor: a miss
            # is said with its size.
            diff = g[cd] - g["plain"]
            verdict = "met" if ratio <= 1.0 else f"not met, by {diff:,.1f} MiB ({100 * (ratio - 1):.2f} %)"
            out.append(f"{cd}: RAM peak with record_dir <= plain AdamW's: {g[cd]:,.1f} vs {g['plain']:,.1f} MiB = "
                       f"{ratio:.4f}x (anonymous memory alone: {anon:.4f}x): **{verdict}**")
    return out


def _store(path: Path, size: str, name: str, row: dict, mach: dict) -> dict:
    """Put one row into ``path`` (read again under a lock: runs of other sizes may write it meanwhile)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(Path(tempfile.gettempdir()) / "scale-results.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        payload = json.loads(path.read_text()) if path.exists() else {"sizes": {}}
        payload["machine"] = mach
        rows = payload["sizes"].setdefault(size, {})
        rows[name] = row
        payload["sizes"][size] = {k: rows[k] for k in METHODS if k in rows}
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=1) + "\n")
        tmp.replace(path)
    return payload


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="the tiny config; results in <tmp>/scale-smoke")
    ap.add_argument("--size", choices=list(SIZES), default=None, help="a config by name (default: scale; --smoke: "
                    "smoke)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--steps", type=int, default=4, help="steps of each method's last phase (train / embedded)")
    ap.add_argument("--badam-every", type=int, default=2, help="BAdam: steps per block before it switches")
    ap.add_argument("--n-samples", type=int, default=1000, help="K of CMDOptimizer / BlockwiseCMD")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per method")
    ap.add_argument("--record-root", default=None, help="where record_dir's file goes (default: the temp dir)")
    ap.add_argument("--fresh", action="store_true", help="start a new scale.json instead of updating its rows")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--add-partial", nargs=4, metavar=("METHOD", "LOG", "COMMIT", "WHY"), default=None,
                    help="store the steps a child printed to LOG before it was stopped (with --size)")
    ap.add_argument("--out", type=Path, default=None, help="default benchmarks/results (--smoke: <tmp>/scale-smoke)")
    ap.add_argument("--log-dir", type=Path, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        r = child(json.loads(args.child))
        Path(args.child_out).write_text(json.dumps(r))
        return
    sys.path.insert(0, str(HERE))
    from _common import machine

    size = args.size or ("smoke" if args.smoke else "scale")
    out = args.out or (Path(tempfile.gettempdir()) / "scale-smoke" if args.smoke else HERE / "results")
    log_dir = args.log_dir or Path(tempfile.gettempdir()) / "scale-logs"
    path = out / "scale.json"
    if args.fresh and path.exists():
        path.unlink()
    payload = json.loads(path.read_text()) if path.exists() else {"sizes": {}}
    if args.add_partial:
        method, log, commit, why = args.add_partial
        pat = r"^step\s+(\d+) (\w+)\s+([\d.]+) s\s+loss ([\d.]+)\s+hwm\s+([\d.]+) MiB"
        steps = [{"step": int(a), "phase": b, "s": float(c), "loss": float(d), "hwm_mib": float(e)}
                 for a, b, c, d, e in re.findall(pat, Path(log).read_text(), re.M)]
        payload.setdefault("partial", {})[f"{size}/{method}"] = {"steps": steps, "why": why, "commit": commit}
        path.write_text(json.dumps(payload, indent=1) + "\n")
    elif not args.report_only:
        batch, seq = SHAPES[size]
        commit = _commit()
        for name in args.methods:
            spec = {"method": name, "size": size, "batch": batch, "seq": seq, "steps": args.steps,
                    "threads": args.threads, "badam_every": args.badam_every, "n_samples": args.n_samples,
                    "record_root": args.record_root, "timeout": args.timeout, "commit": commit,
                    "max_steps": 2 * SIZES[size]["num_hidden_layers"] * STEPS_PER_BLOCK + 50}
            t = time.perf_counter()
            r = run_child(spec, log_dir)
            payload = _store(path, size, name, r, machine())  # after every method: a later failure keeps it
            print(f"{name:10s} peak {r['peak_mib']:9,.1f} MiB ({r['peak_mib'] * 2**20 / r['n_weights']:.2f} B/w)  "
                  + "  ".join(f"{ph} {v['median_s']:.2f} s" for ph, v in r["phases"].items())
                  + f"  load {r['loadavg_start'][0]:.1f}->{r['loadavg_end'][0]:.1f}  "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)
    md = report(payload)
    (out / "scale.md").write_text(md + "\n")
    print("\n" + md)


if __name__ == "__main__":
    main()
