"""The interpreter's float32 ``tl.fma``: rounded once, against exact rational arithmetic."""
from fractions import Fraction

import numpy as np
import torch
import triton
import triton.language as tl

from kernels.interpreter import fma_f32
from kernels.launch import Launch


def _round_f32(v: Fraction) -> np.float32:
    """The float32 nearest to the rational ``v`` (ties to even), from the two float32 neighbours of a guess."""
    c = np.float32(float(v))
    cands = {c, np.nextafter(c, np.float32(np.inf)), np.nextafter(c, np.float32(-np.inf))}
    return min(cands, key=lambda f: (abs(Fraction(float(f)) - v), int(np.float32(f).view(np.int32)) & 1))


def _cases(n=3000, seed=0):
    """Random triples, and triples whose exact result lies next to a float32 rounding midpoint (where a float64
    intermediate rounds twice)."""
    g = np.random.default_rng(seed)
    x = (g.standard_normal(n) * 2.0 ** g.integers(-20, 20, n)).astype(np.float32)
    y = (g.standard_normal(n) * 2.0 ** g.integers(-20, 20, n)).astype(np.float32)
    z = (g.standard_normal(n) * 2.0 ** g.integers(-20, 20, n)).astype(np.float32)
    # hard: z in [1, 2) and x y = 2^-24 (1 + e) with 0 < |e| < 2^-29, so z + x y lies next to the float32 midpoint
    # z + 2^-24, within float64's half ulp: a float64 sum lands exactly on the midpoint and then rounds to even
    k = 64 * n
    hx = (1.0 + g.random(k)).astype(np.float32)
    hy = (1.0 / hx.astype(np.float64)).astype(np.float32) * np.float32(2.0 ** -24)
    e = np.abs(hx.astype(np.float64) * hy * 2.0 ** 24 - 1)
    keep = (e > 0) & (e < 2.0 ** -29)
    hx, hy = hx[keep][:n], hy[keep][:n]
    hz = (1.0 + g.random(hx.size)).astype(np.float32)
    return np.concatenate([x, hx]), np.concatenate([y, hy]), np.concatenate([z, hz])


def test_fma_f32_is_correctly_rounded():
    x, y, z = _cases()
    got = fma_f32(x, y, z)
    ref = np.array([_round_f32(Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c)))
                    for a, b, c in zip(x, y, z)], dtype=np.float32)
    assert np.array_equal(got.view(np.int32), ref.view(np.int32)), f"{int((got != ref).sum())} differ"
    twice = (x.astype(np.float64) * y + z).astype(np.float32)   # float64 intermediate: two roundings
    naive = x * y + z                                          # float32: two roundings
    assert not np.array_equal(twice, ref) and not np.array_equal(naive, ref)  # the cases can tell them apart


def test_fma_f32_special_values():
    inf, nan = np.float32(np.inf), np.float32(np.nan)
    x = np.array([inf, 1.0, 0.0, -2.0, 3.0], dtype=np.float32)
    y = np.array([1.0, nan, inf, 3.0, 0.0], dtype=np.float32)
    z = np.array([1.0, 1.0, 1.0, 6.0, -0.0], dtype=np.float32)
    out = fma_f32(x, y, z)
    assert out[0] == inf and np.isnan(out[1]) and np.isnan(out[2]) and out[3] == 0.0
    assert out[4] == 0.0 and not np.signbit(out[4])


@triton.jit
def _fma_kernel(x_ptr, y_ptr, z_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    a, b, c = (tl.load(p + offs, mask=mask, other=0.0) for p in (x_ptr, y_ptr, z_ptr))
    tl.store(out_ptr + offs, tl.fma(a, b, c), mask=mask)


def test_interpreted_launch_rounds_tl_fma_once():
    """A kernel run as the dispatcher runs it gets the exact fma, whatever Triton's own interpreter does."""
    x, y, z = (torch.from_numpy(v) for v in _cases(256, seed=1))
    out = torch.empty_like(x)
    n = x.numel()
    Launch(_fma_kernel, (1,), dict(x_ptr=x, y_ptr=y, z_ptr=z, out_ptr=out, n=n), dict(BLOCK=triton.next_power_of_2(n)))()
    assert torch.equal(out, torch.from_numpy(fma_f32(x.numpy(), y.numpy(), z.numpy())))
