"""The Triton interpreter as the kernels need it: ``tl.fma`` rounded once, as on a GPU.

Triton's interpreter before 3.9 evaluates ``tl.fma(x, y, z)`` in float32 as ``x * y`` then ``+ z`` (two
roundings), so a helper that relies on a fused multiply-add (:func:`kernels._helpers.div_rcp`'s exact-quotient
correction) gives other bits under it than compiled. :func:`exact_fma` gives the interpreter a correctly rounded
float32 fma (3.9's own is kept): ``x * y`` is exact in float64, the float64 sum ``s`` and its rounding error ``e``
(TwoSum) give the sum rounded to odd (``s`` moved one ulp towards ``s + e`` when it is inexact and even), and
round-to-odd at 53 bits followed by round-to-nearest at 24 bits is the correctly rounded result (Boldo and
Melquiond, 2008). :class:`kernels.launch.Launch` installs it before an interpreted launch runs.
"""
from __future__ import annotations

import numpy as np
from triton.runtime import interpreter as I

_INSTALLED = False


def fma_f32(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """``x * y + z`` rounded once to float32 (``x``, ``y``, ``z`` float32 arrays or scalars, broadcast)."""
    x, y, z = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (x, y, z)))
    with np.errstate(invalid="ignore", over="ignore"):  # inf and NaN propagate as in IEEE arithmetic
        p = x * y                                # exact: 24 + 24 significant bits fit float64's 53
        s = p + z
        bz = s - p
        e = (p - (s - bz)) + (z - bz)            # TwoSum: s + e == p + z exactly (finite inputs)
    bits = s.view(np.int64)
    odd = np.isfinite(e) & (e != 0) & ((bits & 1) == 0)
    bits = np.where(odd, bits + np.where(np.signbit(e) == np.signbit(s), 1, -1), bits)
    return bits.view(np.float64).astype(np.float32)


def exact_fma() -> None:
    """Make the installed Triton interpreter's float32 ``tl.fma`` round once (idempotent; no-op on Triton >= 3.9,
    whose interpreter does already)."""
    global _INSTALLED
    if _INSTALLED:
        return
    builder = I.InterpreterBuilder
    native = getattr(I, "_interpreter", None) is not None and hasattr(I._interpreter, "fma_fp32")
    if not native:
        naive = builder.create_fma

        def create_fma(self, x, y, z):
            if z.data.dtype == np.float32:
                return I.TensorHandle(fma_f32(x.data, y.data, z.data), z.dtype.scalar)
            return naive(self, x, y, z)

        builder.create_fma = create_fma
    _INSTALLED = True
