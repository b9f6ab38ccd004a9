"""Input checks of the quantized ops: shapes and dtypes only (no values read back from the device), each error
naming the argument and the fix. :mod:`kernels.ops` runs them where inputs enter; :mod:`kernels.reference` too."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def check_float_input(x: Tensor, name: str = "x") -> None:
    if not torch.is_tensor(x) or x.dtype not in FLOATS:
        raise TypeError(f"{name} must be a float32/float16/bfloat16 tensor, got "
                        f"{x.dtype if torch.is_tensor(x) else type(x).__name__}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have a channel dimension, got a 0-d tensor")


def check_channel_vec(name: str, t: Optional[Tensor], c: int) -> None:
    if t is not None and tuple(t.shape) != (c,):
        raise ValueError(f"{name} must have shape [{c}] (one per channel of x), got {tuple(t.shape)}")


def check_act_codes(a: Tensor, k: Optional[int] = None) -> None:
    """``a`` int8 activation codes whose last dim is the weight's ``k``."""
    if not torch.is_tensor(a) or a.dtype != torch.int8:
        raise TypeError(f"activation codes must be int8 (signed storage), got "
                        f"{a.dtype if torch.is_tensor(a) else type(a).__name__}; quantize them first")
    if k is not None and (a.dim() < 1 or a.shape[-1] != k):
        raise ValueError(f"activation codes have K={a.shape[-1] if a.dim() else None} but the weight has K={k}")


def check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    """``q, k, v`` must be int8 codes of one shape ``[B, H, L, D]``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not torch.is_tensor(t) or t.dtype != torch.int8 or t.dim() != 4:
            raise TypeError(f"{name} must be int8 codes of shape [B, H, L, D], got "
                            f"{t.dtype if torch.is_tensor(t) else type(t).__name__} {tuple(getattr(t, 'shape', ()))}")
    if q.shape != k.shape or k.shape != v.shape:
        raise ValueError(f"q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")


def check_attention_extras(q: Tensor, rel_bias: Optional[Tensor], mask: Optional[Tensor]) -> None:
    """``rel_bias [H, L, L]`` and ``mask [nW, L, L]`` (B divisible by nW) for ``q [B, H, L, D]``."""
    b, h, l, _ = q.shape
    if rel_bias is not None and tuple(rel_bias.shape) != (h, l, l):
        raise ValueError(f"rel_bias must be [H, L, L] = {(h, l, l)}, got {tuple(rel_bias.shape)}")
    if mask is not None and (mask.dim() != 3 or tuple(mask.shape[1:]) != (l, l) or b % mask.shape[0]):
        raise ValueError(f"mask must be [nW, L, L] with B divisible by nW, got {tuple(mask.shape)} for B={b}")


def same_device(ref: Tensor, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and torch.is_tensor(t) and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but the input is on {ref.device}; move it with .to(device)")
