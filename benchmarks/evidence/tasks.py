"""The tasks of the evidence runner: model, data, loss and evaluation, all offline."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass
class Task:
    name: str
    build: Callable[[int], nn.Module]
    batches: Callable[[int], Iterator[Any]]
    loss: Callable[[nn.Module, Any], torch.Tensor]
    evaluate: Callable[[nn.Module], float]
    steps_per_epoch: int
    bn_inputs: Callable[[], Iterable[torch.Tensor]] | None = None  # for swa_utils.update_bn
    head: str | None = None  # name prefix of a freshly initialised head


def _vision(name: str, make: Callable[[], nn.Module], cfg: dict, size: int, channels: int) -> Task:
    from workloads import mnist_subset
    from workloads import batches, evaluate

    xtr, ytr, xte, yte = mnist_subset(image_size=size, channels=channels)
    bs = int(cfg.get("batch", 64))

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return make()

    def loss(model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y)

    def bn_inputs():
        return (xtr[i : i + 256] for i in range(0, len(xtr), 256))

    return Task(name, build, lambda seed: batches(xtr, ytr, bs, seed=seed), loss,
                lambda m: evaluate(m, xte, yte), len(xtr) // bs, bn_inputs)


def _minilm(cfg: dict) -> Task:
    from workloads import load_minilm, review_sentiment

    n_train, n_test = int(cfg.get("n_train", 1000)), int(cfg.get("n_test", 500))
    max_len, bs = int(cfg.get("max_length", 64)), int(cfg.get("batch", 16))
    tr_texts, ytr, te_texts, yte = review_sentiment(n_train=n_train, n_test=n_test, seed=0)
    _, tok = load_minilm()

    def enc(texts):
        return tok(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")

    tr, te = enc(tr_texts), enc(te_texts)

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)  # the fresh classification head
        model, _ = load_minilm()
        return model

    def batches(seed: int):
        g = torch.Generator().manual_seed(seed)
        while True:
            perm = torch.randperm(n_train, generator=g)
            for i in range(0, n_train - bs + 1, bs):
                idx = perm[i : i + bs]
                yield {k: v[idx] for k, v in tr.items()}, ytr[idx]

    def loss(model, batch):
        x, y = batch
        return F.cross_entropy(model(**x).logits, y)

    @torch.no_grad()
    def evaluate(model) -> float:
        was = model.training
        model.eval()
        correct = 0
        for i in range(0, n_test, 100):
            logits = model(**{k: v[i : i + 100] for k, v in te.items()}).logits
            correct += int((logits.argmax(-1) == yte[i : i + 100]).sum())
        model.train(was)
        return correct / n_test

    return Task("minilm_reviews", build, batches, loss, evaluate, n_train // bs, None, head="classifier")


def make_task(cfg: dict) -> Task:
    name = cfg["task"]
    if name == "cnn_mnist":
        from workloads import SmallCNN

        return _vision(name, SmallCNN, cfg, 28, 1)
    if name == "resnet18_mnist":
        from torchvision.models import resnet18

        return _vision(name, lambda: resnet18(num_classes=10), cfg, 32, 3)
    if name == "vit_mnist":
        from workloads import tiny_vit

        v = cfg.get("vit", {})
        return _vision(name, lambda: tiny_vit(num_layers=v.get("layers", 4), hidden_dim=v.get("dim", 96),
                                              mlp_dim=v.get("mlp", 192), num_heads=v.get("heads", 4),
                                              patch_size=v.get("patch", 4)), cfg, 32, 3)
    if name == "minilm_reviews":
        return _minilm(cfg)
    raise ValueError(f"unknown task {name!r}: cnn_mnist, resnet18_mnist, vit_mnist or minilm_reviews")


def make_optimizer(cfg: dict, params, lr: float | None = None) -> torch.optim.Optimizer:
    """The experiment's optimizer; ``lr`` overrides its learning rate (a method's own ``lr``)."""
    o = dict(cfg["optimizer"])
    if lr is not None:
        o["lr"] = float(lr)
    kind = o.pop("name").lower()
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[kind]
    return cls(params, **o)
