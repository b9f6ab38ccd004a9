"""Values derived from tensors, kept on an object while those tensors are unchanged: one rule for every such cache
of the quantized ops (a packed weight's column sums, its unpacked codes)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch


def kept(owner, tag: str, sources: Sequence[torch.Tensor], build: Callable):
    """``build()``, stored on ``owner`` under ``tag`` and returned again while ``sources`` are the same tensors at the
    same versions (an inference tensor, which has no version counter, by identity; the entry keeps the sources alive
    so their ids stay theirs). Rebuilt, not stored, while ``torch.compile`` traces."""
    if torch.compiler.is_compiling():
        return build()
    key = tuple((id(t), -1 if t.is_inference() else t._version) for t in sources)
    hit = owner.__dict__.get(tag)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = build()
    object.__setattr__(owner, tag, (key, value, tuple(sources)))
    return value
