"""Fine-tune a real pretrained MiniLM (BERT, 22.7 M parameters) on real movie reviews with the
Hugging Face ``Trainer`` and ``modeopt.CMDOptimizer``, and compare with plain AdamW.

* data: Rotten-Tomatoes review snippets (fresh / rotten), shipped inside a pip package;
* model: MiniLM-L6 with a fresh classification head, loaded offline;
* plain: ``Trainer`` + AdamW for ``--steps`` steps (linear schedule with warm-up);
* CMD: the same, with AdamW wrapped in ``CMDOptimizer``: ``--warmup-steps`` recorded steps of
  full training, then only ``--n-modes`` mode scalars (+ biases, LayerNorms and the head) train;
* ``--recipe blockwise``: instead of CMDOptimizer, ``modeopt.BlockwiseCMD``: AdamW trains one
  encoder layer at a time (``--steps`` / 6 steps each), every finished layer keeps moving in its
  own ``--n-modes`` modes; the head trains throughout (the cheap fine-tuning recipe of
  docs/finetuning.md: LoRA's accuracy at 0.76x full fine-tuning's whole-run peak memory, 1.6x
  LoRA's);
* then ``opt.export()`` and ``save_pretrained`` to ``--out``, reloaded with
  ``AutoModelForSequenceClassification.from_pretrained`` to check it computes the same function.

The word embeddings (11.7 M of the 22.7 M weights) are frozen by default in both runs, as is usual
for short fine-tunes; ``--train-embeddings`` trains (and embeds) them too. Defaults finish in
about 3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import modeopt  # noqa: E402
from workloads import load_minilm, review_sentiment  # noqa: E402


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=1000, help="training reviews")
    ap.add_argument("--n-test", type=int, default=500, help="held-out reviews")
    ap.add_argument("--steps", type=int, default=120, help="optimizer steps of each run")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64, help="tokens per review (truncation)")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--blockwise-lr", type=float, default=1e-3,
                    help="learning rate of the blockwise recipe (chosen on validation in docs/finetuning.md)")
    ap.add_argument("--warmup-steps", type=int, default=60, help="CMD: full-training steps before the switch")
    ap.add_argument("--snapshot-every", type=int, default=3, help="CMD: record the weights every this many steps")
    ap.add_argument("--n-modes", type=int, default=None,
                    help="CMD: mode scalars trained after the switch (default 50; blockwise: 10 per layer)")
    ap.add_argument("--recipe", choices=["cmd", "blockwise"], default="cmd",
                    help="cmd: CMDOptimizer (warm-up, then modes); blockwise: BlockwiseCMD (one layer at a time)")
    ap.add_argument("--train-embeddings", action="store_true", help="also train (and embed) the word embeddings")
    ap.add_argument("--skip-plain", action="store_true", help="only run CMDOptimizer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out/hf_trainer_finetune")
    return ap.parse_args()


class Reviews:
    """Tokenised reviews: a Trainer dataset (lists of dicts) and a fast accuracy evaluation."""

    def __init__(self, tokenizer, texts, labels, max_length):
        enc = tokenizer(texts, truncation=True, max_length=max_length)
        self.items = [{"input_ids": i, "attention_mask": m, "labels": int(y)}
                      for i, m, y in zip(enc["input_ids"], enc["attention_mask"], labels)]
        self.labels = labels
        self.collate = DataCollatorWithPadding(tokenizer)

    @torch.no_grad()
    def accuracy(self, model) -> float:
        was = model.training
        model.eval()
        order = sorted(range(len(self.items)), key=lambda i: len(self.items[i]["input_ids"]))
        correct = 0
        for i in range(0, len(order), 100):
            idx = order[i : i + 100]
            batch = self.collate([{k: self.items[j][k] for k in ("input_ids", "attention_mask")} for j in idx])
            correct += int((model(**batch).logits.argmax(-1) == self.labels[idx]).sum())
        model.train(was)
        return correct / len(self.items)


class SwitchReport(TrainerCallback):
    """Reports the switch to mode space: its time, the trainable parameters, the held-out accuracy."""

    def __init__(self, opt, model, test):
        self.opt, self.model, self.test, self.info = opt, model, test, {}

    def on_step_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if isinstance(self.opt, modeopt.BlockwiseCMD):
            if len(self.opt.history) > self.info.get("blocks", 0):
                h = self.opt.history[-1]
                self.info.update(blocks=len(self.opt.history), step=state.global_step,
                                 trainable=self.opt.trainable_parameters())
                print(f"\n[modeopt] step {state.global_step}: layer {h['block']} ({h['weights']:,} weights) now moves "
                      f"in {h['n_modes']} modes; trainable parameters {self.info['trainable']:,}", flush=True)
            return
        if not self.info and self.opt.phase == "embedded":
            step_s = time.perf_counter() - self.t0  # this step includes the decomposition
            t = time.perf_counter()
            self.info = {"step": state.global_step, "acc": self.test.accuracy(self.model),
                         "trainable": self.opt.trainable_parameters(), "switch_s": step_s}
            self.info["eval_s"] = time.perf_counter() - t  # not counted in the run's wall time
            h = self.opt.history[-1]
            print(f"\n[modeopt] step {state.global_step}: switched to {h['n_modes']} modes in {step_s:.1f} s "
                  f"(sizes {h['sizes'][:6]}{' ...' if len(h['sizes']) > 6 else ''}); trainable parameters "
                  f"{self.info['trainable']:,}; held-out accuracy {self.info['acc']:.3f}", flush=True)


def fine_tune(args, name: str, train: Reviews, test: Reviews, use_cmd: bool) -> dict:
    torch.manual_seed(args.seed)
    model, _ = load_minilm(num_labels=2)
    if not args.train_embeddings:
        model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    lr = args.blockwise_lr if use_cmd and args.recipe == "blockwise" else args.lr
    base = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    opt, callbacks = base, []
    if use_cmd and args.recipe == "blockwise":
        # The 6 encoder layers in turn; pooler and head train throughout; the rest of the embeddings stay frozen.
        n_layers = model.config.num_hidden_layers
        opt = modeopt.BlockwiseCMD(model, base, steps_per_block=max(3, args.steps // n_layers),
                                   n_modes=args.n_modes, snapshot_every=2, n_samples=300, seed=args.seed,
                                   train_always=["bert.pooler.", "classifier."])
        print(f"[modeopt] {len(opt.blocks)} blocks of {opt.steps_per_block} steps: {opt.blocks[0]} ... {opt.blocks[-1]}",
              flush=True)
        callbacks.append(SwitchReport(opt, model, test))
    elif use_cmd:
        opt = modeopt.CMDOptimizer(
            model, base, n_modes=args.n_modes, warmup_steps=args.warmup_steps,
            snapshot_every=args.snapshot_every, n_samples=max(1000, 30 * args.n_modes), seed=args.seed,
            # biases, LayerNorm scales and the fresh head stay free; every weight matrix is embedded
            exclude=lambda n, p: p.ndim < 2 or n.startswith("classifier"))
        embedded = set(opt.embedded_names)
        n = sum(p.numel() for name, p in model.named_parameters() if name in embedded)
        print(f"[modeopt] {len(embedded)} weight matrices ({n:,} weights) "
              f"go into mode space after {args.warmup_steps} steps", flush=True)
        callbacks.append(SwitchReport(opt, model, test))
    targs = TrainingArguments(
        output_dir=str(Path(args.out) / ("trainer-cmd" if use_cmd else "trainer-plain")), max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, learning_rate=lr, lr_scheduler_type="linear",
        warmup_steps=0.1, logging_steps=20, save_strategy="no", report_to=[], use_cpu=True,
        seed=args.seed, train_sampling_strategy="group_by_length")
    trainer = Trainer(model=model, args=targs, train_dataset=train.items, data_collator=train.collate,
                      optimizers=(opt, None), callbacks=callbacks)
    print(f"\n=== {name}: {args.steps} steps ===", flush=True)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0 - (callbacks[0].info.get("eval_s", 0.0) if callbacks else 0.0)
    return {
        "name": name, "model": model, "opt": opt, "trainer": trainer, "seconds": seconds,
        "acc": test.accuracy(model),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "switch": callbacks[0].info if callbacks else None,
    }


def main() -> None:
    args = parse_args()
    if args.n_modes is None:
        args.n_modes = 10 if args.recipe == "blockwise" else 50
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_x, train_y, test_x, test_y = review_sentiment(n_train=args.n_train, n_test=args.n_test, seed=args.seed)
    _, tokenizer = load_minilm(num_labels=2)
    train = Reviews(tokenizer, train_x, train_y, args.max_length)
    test = Reviews(tokenizer, test_x, test_y, args.max_length)
    majority = max(test_y.float().mean().item(), 1 - test_y.float().mean().item())
    print(f"{args.n_train} training / {args.n_test} held-out reviews; majority class {majority:.3f}")

    runs = [] if args.skip_plain else [fine_tune(args, "plain AdamW", train, test, use_cmd=False)]
    label = "BlockwiseCMD(AdamW)" if args.recipe == "blockwise" else "CMDOptimizer(AdamW)"
    cmd = fine_tune(args, label, train, test, use_cmd=True)
    runs.append(cmd)

    print(f"\n| run | held-out accuracy | trainable params (end) | wall time |\n|---|---|---|---|")
    print(f"| majority class | {majority:.3f} | - | - |")
    for r in runs:
        if r["switch"] and "blocks" in r["switch"]:
            print(f"| {r['name']} | {r['acc']:.3f} | {r['trainable']:,} | {r['seconds']:.0f} s |")
        elif r["switch"]:
            sw = r["switch"]
            print(f"| {r['name']} | {r['acc']:.3f} ({sw['acc']:.3f} at the switch, step {sw['step']}) | "
                  f"{r['trainable']:,} | {r['seconds']:.0f} s ({sw['switch_s']:.0f} s of it the switch) |")
        else:
            print(f"| {r['name']} | {r['acc']:.3f} | {r['trainable']:,} | {r['seconds']:.0f} s |")

    # Leave mode space for good and save a plain checkpoint of the original class.
    model, opt = cmd["model"], cmd["opt"]
    opt.export()
    save_dir = out / "cmd_model"
    model.save_pretrained(save_dir)
    tokenizer.save_pretrained(save_dir)
    reloaded = AutoModelForSequenceClassification.from_pretrained(save_dir)
    batch = test.collate([{k: it[k] for k in ("input_ids", "attention_mask")} for it in test.items[:32]])
    model.eval()
    with torch.no_grad():
        diff = (model(**batch).logits - reloaded(**batch).logits).abs().max().item()
    acc = test.accuracy(reloaded)
    print(f"\nexported and saved to {save_dir}; reloaded as {type(reloaded).__name__}: "
          f"max |logit difference| {diff:.1e}, held-out accuracy {acc:.3f}")
    if diff > 1e-5 or acc != cmd["acc"]:
        raise SystemExit("the reloaded model differs from the trained one")


if __name__ == "__main__":
    main()
