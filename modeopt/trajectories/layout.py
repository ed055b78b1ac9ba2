"""Which rows of a flat weight vector belong to which named tensor.

A :class:`ParamLayout` is the bridge between a model's named parameters and the
flat ``(N,)`` vectors / ``(N, T)`` matrices that CMD works on. It stores only
names, shapes and offsets, so it is cheap to copy and to checkpoint
(:meth:`to_dict` holds plain Python values and is ``weights_only``-safe).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["ParamLayout", "ParamSpec", "model_parameters", "named_tensors", "select_parameters"]


@dataclass(frozen=True)
class ParamSpec:
    """One named tensor inside a flat vector: rows ``offset : offset + numel``."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        """Number of values of the tensor."""
        return math.prod(self.shape)

    @property
    def stop(self) -> int:
        """One past the tensor's last row in the flat vector."""
        return self.offset + self.numel

    def check_shape(self, t: Tensor) -> None:
        """Raise ``ValueError`` unless ``t`` has this spec's shape."""
        if tuple(t.shape) != self.shape:
            raise ValueError(f"tensor {self.name!r} has shape {tuple(t.shape)}, the layout expects {self.shape}")


class ParamLayout:
    """An ordered list of named tensor shapes laid end to end in one flat vector.

    Args:
        names: tensor names, in the order their rows appear.
        shapes: one shape per name.
    """

    def __init__(self, names: Sequence[str], shapes: Sequence[Sequence[int]]):
        if len(names) != len(shapes):
            raise ValueError(f"got {len(names)} names but {len(shapes)} shapes")
        if len(set(names)) != len(names):
            seen: set[str] = set()
            dup = next(n for n in names if n in seen or seen.add(n))
            raise ValueError(f"the tensor {dup!r} is listed twice: list each tensor once (a names= list that "
                             "repeats a name?)")
        specs = []
        offset = 0
        for name, shape in zip(names, shapes):
            spec = ParamSpec(str(name), tuple(int(s) for s in shape), offset)
            specs.append(spec)
            offset += spec.numel
        self.specs: tuple[ParamSpec, ...] = tuple(specs)
        self.n = offset
        self._index = {s.name: i for i, s in enumerate(self.specs)}
        self._stops = torch.tensor([s.stop for s in self.specs], dtype=torch.int64)

    # ------------------------------------------------------------------ build
    @classmethod
    def from_named_tensors(cls, named: Iterable[tuple[str, Tensor]]) -> ParamLayout:
        """Layout of ``(name, tensor)`` pairs, in the order given (only names and shapes are kept)."""
        named = list(named)
        return cls([n for n, _ in named], [tuple(t.shape) for _, t in named])

    @classmethod
    def from_model(cls, model: nn.Module, *, trainable_only: bool = True) -> ParamLayout:
        """Layout of a model's floating-point parameters (shared ones once).

        Args:
            trainable_only: keep only parameters with ``requires_grad``.
        """
        return cls.from_named_tensors(model_parameters(model, trainable_only=trainable_only))

    # ---------------------------------------------------------------- queries
    @property
    def names(self) -> list[str]:
        """Tensor names, in row order."""
        return [s.name for s in self.specs]

    @property
    def numels(self) -> list[int]:
        """Number of values of each tensor, in row order."""
        return [s.numel for s in self.specs]

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, name: str) -> ParamSpec:
        return self.specs[self._index[name]]

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ParamLayout) and self.specs == other.specs

    def __repr__(self) -> str:
        return f"ParamLayout({len(self)} tensors, {self.n} weights)"

    def locate(self, row: int) -> tuple[str, tuple[int, ...]]:
        """Name and multi-index of the tensor element stored at flat ``row``."""
        if not 0 <= row < self.n:
            raise IndexError(f"row {row} outside a layout of {self.n} weights")
        i = int(torch.searchsorted(self._stops, torch.tensor([row]), right=True)[0])
        spec = self.specs[i]
        idx = []
        rem = row - spec.offset
        for dim in reversed(spec.shape):
            idx.append(rem % dim)
            rem //= dim
        return spec.name, tuple(reversed(idx))

    def tensor_ids(self) -> Tensor:
        """(N,) int64: the index of the tensor each row belongs to."""
        return torch.repeat_interleave(
            torch.arange(len(self.specs)), torch.tensor(self.numels, dtype=torch.int64)
        )

    # ------------------------------------------------------------ conversion
    def flatten(
        self, tensors: Mapping[str, Tensor], *, out: Tensor | None = None, dtype=torch.float32
    ) -> Tensor:
        """Concatenate ``tensors[name]`` for every name into one ``(N,)`` vector."""
        if out is None:
            out = torch.empty(self.n, dtype=dtype)
        for spec in self.specs:
            if spec.name not in tensors:
                raise KeyError(f"tensor {spec.name!r} of the layout is missing")
            t = tensors[spec.name]
            spec.check_shape(t)
            out[spec.offset : spec.stop].copy_(t.detach().reshape(-1))
        return out

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Split an ``(N,)`` vector into named tensors (views when ``flat`` is contiguous)."""
        if flat.dim() != 1 or flat.shape[0] != self.n:
            raise ValueError(f"expected a flat vector of {self.n} values, got shape {tuple(flat.shape)}")
        return {s.name: flat[s.offset : s.stop].view(s.shape) for s in self.specs}

    def to_dict(self) -> dict:
        """Plain Python values (``weights_only``-safe): ``{"names": [...], "shapes": [[...], ...]}``."""
        return {"names": self.names, "shapes": [list(s.shape) for s in self.specs]}

    @classmethod
    def from_dict(cls, d: Mapping) -> ParamLayout:
        """The layout :meth:`to_dict` described."""
        return cls(d["names"], d["shapes"])


def model_parameters(model: nn.Module, *, trainable_only: bool = True) -> list[tuple[str, nn.Parameter]]:
    """A model's floating-point parameters by name, each shared parameter once."""
    out = []
    for name, p in model.named_parameters():  # named_parameters() already skips duplicates
        if not p.is_floating_point():
            continue
        if trainable_only and not p.requires_grad:
            continue
        out.append((name, p))
    return out


def select_parameters(
    model: nn.Module, names: Sequence[str] | Callable[[str, Tensor], bool] | None
) -> list[tuple[str, Tensor]]:
    """Named tensors of ``model`` chosen by a list of names (parameters or buffers) or a predicate
    ``f(name, param) -> bool`` over its parameters; ``None``: :func:`model_parameters` (trainable floats).

    Raises ``KeyError`` for a name the model lacks, ``ValueError`` for a non-float choice or an empty
    one, ``TypeError`` for ``names`` that is neither a list nor a predicate.
    """
    if isinstance(names, str) or not (names is None or callable(names) or isinstance(names, Iterable)):
        what = f"the string {names!r}: pass [{names!r}]" if isinstance(names, str) else repr(names)
        raise TypeError(f"names must be a list of parameter/buffer names or a predicate f(name, tensor), got {what}")
    if names is None:
        params = model_parameters(model, trainable_only=True)
    elif callable(names):
        params = [(n, p) for n, p in model.named_parameters() if names(n, p)]
    else:
        all_named = dict(model.named_parameters())
        all_named.update(dict(model.named_buffers()))
        names = list(names)
        missing = [n for n in names if not isinstance(n, str) or n not in all_named]
        if missing:
            raise KeyError(f"not parameters or buffers of the model: {missing}")
        params = [(n, all_named[n]) for n in names]
    bad = [n for n, p in params if not p.is_floating_point()]
    if bad:
        raise ValueError(f"not floating point, cannot be recorded: {bad}")
    if not params:
        raise ValueError("no parameters selected: the model has no trainable floating-point parameters "
                         "(pass names=... to choose some)")
    return params


def named_tensors(model: nn.Module) -> list[tuple[str, Tensor]]:
    """Every ``(name, tensor)`` of the model's parameters, then buffers, a tied tensor under each of its names."""
    return list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
