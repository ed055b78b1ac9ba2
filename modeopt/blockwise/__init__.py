"""Trainer - :class:`BlockwiseCMD`: one block (layer) trained at a time, each finished block kept moving in
its own modes; :func:`find_blocks` (the default order), :func:`embed_block` (a block's compact CMD straight
to a mode space), and its checkpoint checks (:mod:`.state`)."""

from .embedding import embed_block
from .optimizer import BlockwiseCMD, find_blocks

__all__ = ["BlockwiseCMD", "embed_block", "find_blocks"]
