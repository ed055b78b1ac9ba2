"""The checks of :class:`~modeopt.BlockwiseCMD`'s constructor arguments, each raising before anything
changes and saying what to do (as :mod:`modeopt.optim.settings` does for ``CMDOptimizer``), and the
half-precision warning."""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor, nn

from modeopt.distributed.wrappers import sharding_wrapper
from modeopt.optim.settings import check_dtypes, check_snapshot_count
from modeopt.optim.wrapping import check_model_and_base
from modeopt.utils.checks import check_base_class, check_int, check_no_duplicates

__all__ = ["check_arguments", "check_train_always"]


def check_arguments(model: Any, base_optimizer: Any, *, blocks: Any, train_always: Any, steps_per_block: Any,
                    n_modes: Any, snapshot_every: Any, n_samples: Any, seed: Any, mode_scale: Any, coef_dtype: Any,
                    record_dtype: Any) -> None:
    """``TypeError`` / ``ValueError`` / ``RuntimeError`` for an argument BlockwiseCMD cannot work with."""
    check_model_and_base(model, base_optimizer)
    check_base_class(base_optimizer)  # Muon, SparseAdam: cannot train the mode scalars r
    check_int("steps_per_block", steps_per_block, 1)
    check_int("n_modes", n_modes, 1)
    check_int("snapshot_every", snapshot_every, 1)
    check_int("n_samples", n_samples, 1)
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    check_snapshot_count("steps_per_block", steps_per_block, snapshot_every)
    if n_modes > n_samples:
        raise ValueError(f"n_modes={n_modes} > n_samples={n_samples}: ask for fewer modes or sample more weights")
    if mode_scale not in ("auto", "rms", "norm"):
        raise ValueError(f"mode_scale must be 'auto', 'rms' or 'norm', got {mode_scale!r}")
    check_dtypes(coef_dtype, record_dtype)
    wrapped = sharding_wrapper(model) or (
        "DistributedDataParallel" if isinstance(model, nn.parallel.DistributedDataParallel) else None)
    if wrapped is not None:
        raise TypeError(f"BlockwiseCMD trains on one process; the model is wrapped in {wrapped}, whose reducer "
                        "or shards are built for a fixed set of trainable parameters. Use CMDOptimizer for "
                        "DDP / FSDP2 (docs/scaling-out.md)")
    if any(n.rsplit(".", 1)[-1].startswith("modeopt_") for n, _ in model.named_parameters()):
        raise RuntimeError("the model is already in mode space (it has modeopt_* parameters): one mode-space "
                           "optimizer per model")
    if blocks is not None:
        _check_prefix_list("blocks", blocks, nested=True)
    _check_prefix_list("train_always", train_always, nested=False)
    check_no_duplicates(model, base_optimizer)


def _check_prefix_list(arg: str, value: Any, nested: bool) -> None:
    """``value`` must be a list of name prefixes (``nested``: each may be a list of them, a block of several)."""
    if isinstance(value, str):  # would be read as one prefix per character
        raise TypeError(f"{arg} must be a list of parameter-name prefixes, got the string {value!r}: pass [{value!r}]")
    what = (f"{arg} must be a list of parameter-name prefixes (each a string, or a list of strings for a block "
            "of several)" if nested else f"{arg} must be a list of parameter-name prefixes (strings)")
    if not isinstance(value, Iterable):
        raise TypeError(f"{what}, got {value!r}")
    for item in value:
        ok = isinstance(item, str) or (nested and isinstance(item, (list, tuple))
                                       and all(isinstance(x, str) for x in item))
        if not ok:
            raise TypeError(f"{what}, got {item!r} in it")


def check_train_always(model: nn.Module, train_always: Sequence[str], always: Sequence[Tensor],
                   orig: Sequence[Sequence[Tensor]], names: dict[int, str]) -> None:
    """Every ``train_always`` prefix must select a parameter the base optimizer trains: a typo, or a
    head tied to the embedding (GPT-2's ``lm_head``), would otherwise leave it frozen all run, silently."""
    held = {id(p) for params in orig for p in params}
    always_ids = {id(p) for p in always}
    every = list(model.named_parameters(remove_duplicate=False))
    for prefix in train_always:
        if any(id(p) in always_ids and names[id(p)].startswith(prefix) for _, p in every):
            continue
        hits = [(n, p) for n, p in every if n.startswith(prefix)]
        if not hits:
            heads = sorted({n[: i + 1] for n, _ in every for i, c in enumerate(n) if c == "."})
            close = difflib.get_close_matches(prefix, heads, n=1)
            hint = f": did you mean {close[0]!r}?" if close else ": check the prefix (names from model.named_parameters())"
            raise ValueError(f"train_always prefix {prefix!r} matches no parameter of the model{hint}")
        tied = [(n, names[id(p)]) for n, p in hits if names.get(id(p)) != n]
        if len(tied) == len(hits):
            n, owner = tied[0]
            head = owner.rsplit(".", 1)[0] + "." if "." in owner else owner
            raise ValueError(f"train_always prefix {prefix!r} matches only {n!r}, tied to {owner!r} (the same tensor, "
                             f"named there in model.named_parameters()): name the owner, e.g. train_always="
                             f"[{head!r}]")
        canonical = [(n, p) for n, p in hits if names.get(id(p)) == n]
        if not any(id(p) in held for _, p in canonical):
            raise ValueError(f"train_always prefix {prefix!r} matches only parameters the base optimizer does not "
                             f"hold ({[n for n, _ in canonical][:3]}): build it on model.parameters()")
        raise ValueError(f"train_always prefix {prefix!r} matches only parameters frozen (requires_grad=False) "
                         f"before wrapping ({[n for n, _ in canonical][:3]}), which stay frozen: unfreeze them, "
                         "or drop the prefix")
