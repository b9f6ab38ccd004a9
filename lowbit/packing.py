"""Packed weight formats. Weights are ``[N, K]`` unsigned codes ``q`` (see :mod:`lowbit.primitives`), packed
row by row along K into ``uint8`` planes ``[N, K_pad / per_byte]``; ``K_pad`` rounds K up to the format's
``k_multiple`` and the padding codes are 0 (kernels mask ``k >= K``, so padding never contributes).

``2bit`` (ternary, codes ``w + 1`` in {0, 1, 2}; also plain 2-bit), 4 codes per byte, first code lowest::

    byte j of row n:  bit 7..6 | 5..4 | 3..2 | 1..0
                      q[4j+3]  q[4j+2] q[4j+1] q[4j]

``int4``, 2 codes per byte::

    byte j:  bit 7..4 | 3..0
             q[2j+1]  | q[2j]

``int3``, two planes (``k_multiple = 8``): ``lo`` holds ``q & 3`` in the ``2bit`` layout, ``hi`` holds
``q >> 2`` one bit per code, 8 per byte::

    hi byte j:  bit 7 .. bit 0
                q[8j+7]>>2 .. q[8j]>>2

``int8`` (6- and 8-bit weights): one code per byte, stored signed ``q - offset`` as ``int8`` (no padding).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

import torch
from torch import Tensor

from . import primitives as P


@dataclass(frozen=True)
class Format:
    name: str
    k_multiple: int
    planes: tuple  # (plane name, codes per byte)


FORMATS: Dict[str, Format] = {
    "2bit": Format("2bit", 4, (("lo", 4),)),
    "int4": Format("int4", 2, (("lo", 2),)),
    "int3": Format("int3", 8, (("lo", 4), ("hi", 8))),
    "int8": Format("int8", 1, (("q", 1),)),
}


def format_for_bits(bits) -> str:
    """Packed format used for weights of ``bits``: 1.58/2 -> 2bit, 3 -> int3, 4 -> int4, 5..8 -> int8."""
    P.check_bits(bits)
    if bits in (P.TERNARY, 2):
        return "2bit"
    if bits == 3:
        return "int3"
    if bits == 4:
        return "int4"
    return "int8"


def padded_k(k: int, fmt: str) -> int:
    m = FORMATS[fmt].k_multiple
    return (k + m - 1) // m * m


@dataclass
class PackedWeight:
    """Packed ``[N, K]`` weight codes: ``planes`` maps plane name -> ``uint8``/``int8`` tensor."""

    fmt: str
    bits: float
    n: int
    k: int
    planes: Dict[str, Tensor] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.planes.values())

    def to(self, device) -> "PackedWeight":
        return PackedWeight(self.fmt, self.bits, self.n, self.k, {k: v.to(device) for k, v in self.planes.items()})


def _pack_fields(q: Tensor, width: int) -> Tensor:
    per = 8 // width
    n, kp = q.shape
    q = q.to(torch.int32).reshape(n, kp // per, per)
    shifts = torch.arange(per, device=q.device, dtype=torch.int32) * width
    return (q << shifts).sum(dim=-1).to(torch.uint8)


def _unpack_fields(b: Tensor, width: int) -> Tensor:
    per = 8 // width
    n, nb = b.shape
    shifts = torch.arange(per, device=b.device, dtype=torch.int32) * width
    return ((b.to(torch.int32)[..., None] >> shifts) & ((1 << width) - 1)).reshape(n, nb * per)


def pack(q: Tensor, bits) -> PackedWeight:
    """Pack unsigned codes ``q [N, K]`` (values in ``[0, qmax(bits)]``) into the format for ``bits``."""
    if not torch.is_tensor(q) or q.dim() != 2:
        raise ValueError(f"codes must be a 2-D [N, K] tensor, got {getattr(q, 'shape', type(q))}")
    if q.is_floating_point() or q.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got {q.dtype}; quantize first (lowbit.primitives.quantize)")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > P.qmax(bits)):
        raise ValueError(f"codes out of range for {bits}-bit weights: [{int(q.min())}, {int(q.max())}] "
                         f"not within [0, {P.qmax(bits)}]")
    fmt = format_for_bits(bits)
    n, k = q.shape
    kp = padded_k(k, fmt)
    qp = torch.zeros(n, kp, dtype=torch.int32, device=q.device)
    qp[:, :k] = q.to(torch.int32)
    if fmt == "2bit":
        planes = {"lo": _pack_fields(qp, 2)}
    elif fmt == "int4":
        planes = {"lo": _pack_fields(qp, 4)}
    elif fmt == "int3":
        planes = {"lo": _pack_fields(qp & 3, 2), "hi": _pack_fields(qp >> 2, 1)}
    else:
        planes = {"q": (qp - P.code_offset(bits)).to(torch.int8)}
    return PackedWeight(fmt, bits, n, k, planes)


def unpack(pw: PackedWeight) -> Tensor:
    """Unsigned codes ``[N, K]`` (``uint8``) from a :class:`PackedWeight`."""
    if pw.fmt not in FORMATS:
        raise ValueError(f"unknown packed format {pw.fmt!r}; known: {sorted(FORMATS)}")
    expect = {name: (pw.n, padded_k(pw.k, pw.fmt) // per) for name, per in FORMATS[pw.fmt].planes}
    for name, shape in expect.items():
        t = pw.planes.get(name)
        if t is None or tuple(t.shape) != shape:
            raise ValueError(f"plane {name!r} of format {pw.fmt} must have shape {shape}, "
                             f"got {None if t is None else tuple(t.shape)}")
    if pw.fmt == "2bit":
        q = _unpack_fields(pw.planes["lo"], 2)
    elif pw.fmt == "int4":
        q = _unpack_fields(pw.planes["lo"], 4)
    elif pw.fmt == "int3":
        q = _unpack_fields(pw.planes["lo"], 2) | (_unpack_fields(pw.planes["hi"], 1) << 2)
    else:
        q = pw.planes["q"].to(torch.int32) + P.code_offset(pw.bits)
    return q[:, : pw.k].to(torch.uint8)
