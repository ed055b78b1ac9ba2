"""tqdm's ``disable=`` from modeopt's ``progress=`` convention.

``progress=True`` shows a bar, ``False`` hides it, ``None`` shows it only on a terminal: tqdm does
that itself for ``disable=None`` (it checks ``isatty()``), so ``None`` must reach tqdm as ``None``
(``progress or ...`` would turn it into ``False``, which prints into logs and pipes).
"""

from __future__ import annotations

__all__ = ["disable"]


def disable(progress: bool | None, n: int | None = None, minimum: int = 0) -> bool | None:
    """``disable=`` for tqdm: hidden when ``progress`` is False, or when ``progress`` is None and the
    work is short (``n < minimum`` items); ``None`` (terminal only) when ``progress`` is None."""
    if progress is not None:
        return not progress
    if n is not None and n < minimum:
        return True
    return None
