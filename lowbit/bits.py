"""Bit configurations: ``w{W}a{A}`` specs such as ``w1.58a8`` or ``w4a4``.

Weight bits: 1.58 (ternary), 2, 3, 4, 6, 8. Activation bits: 3, 4, 6, 8, 16 (16 = left in float).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

WEIGHT_BITS = (1.58, 2, 3, 4, 6, 8)
ACT_BITS = (3, 4, 6, 8, 16)
NAMED = ("w1.58a8", "w3a3", "w4a4", "w6a6", "w8a8", "w4a8")

_SPEC = re.compile(r"^w(\d+(?:\.\d+)?)a(\d+)$")


def _accepted() -> str:
    w = "/".join(_fmt(b) for b in WEIGHT_BITS)
    a = "/".join(str(b) for b in ACT_BITS)
    return f"accepted forms: w<W>a<A> with W in {w} and A in {a}, e.g. {', '.join(NAMED)}"


def _fmt(b: float) -> str:
    return "1.58" if b == 1.58 else str(int(b))


@dataclass(frozen=True)
class BitConfig:
    """Weight and activation bit-widths; ``w_bits == 1.58`` means ternary weights."""

    w_bits: float
    a_bits: int

    def __post_init__(self):
        if self.w_bits not in WEIGHT_BITS or self.a_bits not in ACT_BITS:
            raise ValueError(f"unsupported bit configuration w{self.w_bits}a{self.a_bits}; {_accepted()}")

    @property
    def ternary(self) -> bool:
        return self.w_bits == 1.58

    @property
    def act_float(self) -> bool:
        return self.a_bits == 16

    @property
    def name(self) -> str:
        return f"w{_fmt(self.w_bits)}a{self.a_bits}"

    def __str__(self) -> str:
        return self.name


def parse_bits(spec: "str | BitConfig") -> BitConfig:
    """Parse ``w1.58a8`` / ``W4A4`` / ``w4-a4`` into a :class:`BitConfig`; raise ``ValueError`` otherwise."""
    if isinstance(spec, BitConfig):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"bit spec must be a string, got {type(spec).__name__}; {_accepted()}")
    m = _SPEC.match(spec.strip().lower().replace("-", "").replace("_", ""))
    if m is None:
        raise ValueError(f"cannot parse bit spec {spec!r}; {_accepted()}")
    w, a = float(m.group(1)), int(m.group(2))
    if w not in WEIGHT_BITS or a not in ACT_BITS:
        raise ValueError(f"unsupported bit spec {spec!r}; {_accepted()}")
    return BitConfig(w if w == 1.58 else int(w), a)
