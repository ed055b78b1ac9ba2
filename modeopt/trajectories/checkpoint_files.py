"""Reading state-dict files: ``torch.save`` files, ``.safetensors`` files and HF model directories.

``safetensors`` is optional (``pip install 'modeopt[hf]'``): it is imported only when a
``.safetensors`` file is read.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["load_state_dict_file", "why_unreadable"]


def load_state_dict_file(path: str | os.PathLike, *, key: str | None = None) -> dict[str, Tensor]:
    """Read a state dict from a ``torch.save`` file, a ``.safetensors`` file or an HF model directory.

    Returns ``{name: tensor}`` on the CPU (``torch.load(weights_only=True)``: no code is unpickled).
    A directory is read through its ``model.safetensors`` or ``pytorch_model.bin``.

    ``key`` selects a nested entry (e.g. ``"model"`` in a training checkpoint); without it a
    checkpoint whose values are not tensors is searched for ``state_dict``/``model_state_dict``/``model``.
    """
    path = Path(path)
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).exists():
                path = path / name
                break
        else:
            raise FileNotFoundError(f"{path} is a directory without model.safetensors or pytorch_model.bin")
    if path.suffix == ".safetensors":
        obj = _load_safetensors(path)
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if key is not None:
        if key not in obj:
            raise KeyError(f"{path} has no entry {key!r} (it has {sorted(obj)[:10]})")
        obj = obj[key]
    elif isinstance(obj, Mapping) and not all(isinstance(v, Tensor) for v in obj.values()):
        for k in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(k), Mapping):
                obj = obj[k]
                break
        else:
            raise ValueError(f"{path} is not a plain state dict: pass key=... naming the entry that holds it "
                             f"(top-level entries: {sorted(obj)[:10]})")
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} does not hold a state dict")
    return dict(obj)


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ImportError(f"reading {path} needs the safetensors package: pip install 'modeopt[hf]'") from None
    return load_file(str(path))


def why_unreadable(path: str | os.PathLike, e: BaseException) -> str:
    """One line on why torch could not read ``path`` after it raised ``e``.

    torch's own messages span many lines and, for a weights-only refusal, advise
    ``weights_only=False``: wrong here, modeopt never unpickles code.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        size = path.stat().st_size
    except OSError:
        head, size = b"", -1
    if size == 0:
        return "the file is empty"
    if isinstance(e, pickle.UnpicklingError) and "Unsupported global" in str(e):
        return ("it holds pickled Python objects (e.g. a model or optimizer saved whole), not tensors; "
                "modeopt reads only tensors (save state dicts: torch.save(model.state_dict(), path))")
    if head.startswith(b"PK"):
        if not zipfile.is_zipfile(path):
            return "the file is truncated (a torch.save zip archive without its end): copy or save it again"
        return "the file is damaged (a torch.save zip archive whose contents cannot be read): copy or save it again"
    if path.suffix == ".safetensors":
        return "the file is truncated or damaged (not a readable .safetensors file): copy or save it again"
    if isinstance(e, (OSError, EOFError)):
        return "the file is truncated or damaged: copy or save it again"
    return "not a file written by torch.save"
