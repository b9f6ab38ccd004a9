"""The shared ``@triton.jit`` helpers against torch's float32 arithmetic (interpreter on CPU)."""
import pytest
import torch
import triton
import triton.language as tl

from kernels._helpers import div_rcp, quantize_signed, rcp_refine, rcp_rn, rne_small, sqrt_rn
from kernels.launch import Launch


@triton.jit
def _div_kernel(a_ptr, b_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask, other=1.0)
    b = tl.load(b_ptr + offs, mask=mask, other=1.0)
    tl.store(out_ptr + offs, div_rcp(a, b, tl.math.div_rn(1.0, b)), mask=mask)


@triton.jit
def _rcp_kernel(b_ptr, y_ptr, refined_ptr, rcp_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    b = tl.load(b_ptr + offs, mask=mask, other=1.0)
    tl.store(refined_ptr + offs, rcp_refine(b, tl.load(y_ptr + offs, mask=mask, other=1.0)), mask=mask)
    tl.store(rcp_ptr + offs, rcp_rn(b), mask=mask)


@triton.jit
def _sqrt_kernel(a_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, sqrt_rn(tl.load(a_ptr + offs, mask=mask, other=1.0)), mask=mask)


@triton.jit
def _round_kernel(x_ptr, out_ptr, codes_ptr, s_ptr, z_ptr, n, QMAX: tl.constexpr, OFFSET: tl.constexpr,
                  BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, rne_small(tl.minimum(tl.maximum(x, -4194304.0), 4194304.0)), mask=mask)
    tl.store(codes_ptr + offs, quantize_signed(x, tl.load(s_ptr), tl.load(z_ptr), QMAX, OFFSET), mask=mask)


def _run(kernel, n, *args, **meta):
    """Launched as the dispatcher launches (:class:`kernels.launch.Launch`: an exact ``tl.fma`` under every
    interpreter)."""
    block = meta.pop("BLOCK", 4096)
    Launch(kernel, (triton.cdiv(n, block),), dict(zip(kernel.arg_names, [*args, n])), dict(BLOCK=block, **meta))()


def test_div_rcp_is_ieee_division():
    """Markstein's correction from a rounded reciprocal equals ``a / b`` bit for bit: random mantissas over 2^+-60,
    numerators next to powers of two, and quotients at and next to .5 ties (where ``a * (1 / b)`` is wrong)."""
    g = torch.Generator().manual_seed(0)
    n = 1 << 17
    mant = lambda: 1.0 + torch.rand(n, generator=g, dtype=torch.float64)
    expo = lambda: torch.randint(-60, 61, (n,), generator=g).double()
    sign = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
    a = (sign * mant() * 2.0 ** expo()).float()
    b = (mant() * 2.0 ** expo()).float()
    edge = (2.0 ** torch.randint(-20, 21, (n,), generator=g).double()).float()
    a_edge = torch.nextafter(edge, torch.zeros(n))
    k = torch.randint(-300, 301, (n,), generator=g).float()
    a_tie = (k + 0.5) * b
    a_near = torch.nextafter(a_tie, a_tie * 2)
    a_all, b_all = torch.cat([a, a_edge, a_tie, a_near]), torch.cat([b, b, b, b])
    out = torch.empty_like(a_all)
    _run(_div_kernel, a_all.numel(), a_all, b_all, out)
    ref = a_all / b_all
    assert torch.equal(out, ref), f"{int((out != ref).sum())} of {ref.numel()} quotients differ"
    assert not torch.equal(a_tie * (1.0 / b), a_tie / b)  # the cases where multiplying by 1 / b rounds wrong


def test_rcp_is_ieee_reciprocal_on_every_mantissa():
    """``rcp_refine`` from a start up to 8 ulps off (a GPU's ``div.full.f32`` is within 2^-22) gives the IEEE
    reciprocal for every float32 mantissa (the result only scales with the exponent), at the ends of the exponent
    range it covers, and ``rcp_rn`` too; a plain Newton step would miss some (the test can fail)."""
    g = torch.Generator().manual_seed(2)
    mant = (torch.arange(1 << 23, dtype=torch.int32) | 0x3F800000).view(torch.float32)
    expo = 2.0 ** torch.randint(-125, 126, (1 << 16,), generator=g).float()
    b = torch.cat([mant, mant[torch.randint(0, 1 << 23, (1 << 16,), generator=g)] * expo,
                   -mant[: 1 << 16], torch.tensor([2.0 ** -125, 2.0 ** 125, 1.0, 3.0])])
    ref = 1.0 / b
    y = (ref.view(torch.int32) + torch.randint(-8, 9, b.shape, generator=g, dtype=torch.int32)).view(torch.float32)
    refined, rcp = torch.empty_like(b), torch.empty_like(b)
    _run(_rcp_kernel, b.numel(), b, y, refined, rcp, BLOCK=1 << 20)
    assert torch.equal(refined, ref), f"{int((refined != ref).sum())} of {b.numel()} reciprocals differ"
    assert torch.equal(rcp, ref)
    e = torch.addcmul(torch.ones_like(b), -b, y)  # one Newton step alone (two roundings here; the kernel fuses)
    assert not torch.equal(y + y * e, ref)


@pytest.mark.filterwarnings("ignore:(overflow|invalid value|divide by zero) encountered:RuntimeWarning")
def test_sqrt_rn_is_ieee_sqrt_on_every_mantissa():
    """``sqrt_rn`` (ptxas's own ``sqrt.rn`` fast path when compiled, without its slow-path call) is the IEEE square
    root bit for bit (float64's rounded to float32; torch's vectorised CPU float32 sqrt is an ulp off on 14% of
    these): every float32 of ``[1, 4)`` (the root scales with every second exponent), random
    values over the whole range, denormals and both sides of the ``2^-100`` rescaling, 0, -0, inf, -inf, negative
    numbers and NaN."""
    g = torch.Generator().manual_seed(3)
    mant = (torch.arange(1 << 24, dtype=torch.int32) + 0x3F800000).view(torch.float32)  # [1, 4)
    bits = torch.randint(1, 0x7F800000, (1 << 18,), generator=g, dtype=torch.int32)  # positive, denormals included
    tiny = torch.nextafter(torch.tensor([2.0 ** -100] * 2), torch.tensor([0.0, 1.0]))
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), -1.0, -1e-40, float("nan"), 2.0 ** -100,
                            2.0 ** -149, 2.0 ** 127 * 1.9999999, 1e-6, 1e-5])
    a = torch.cat([mant, bits.view(torch.float32), tiny, special])
    out = torch.empty_like(a)
    _run(_sqrt_kernel, a.numel(), a, out, BLOCK=1 << 20)
    ref = a.double().sqrt().float()
    same = (out.view(torch.int32) == ref.view(torch.int32)) | (torch.isnan(out) & torch.isnan(ref))
    assert bool(same.all()), f"{int((~same).sum())} of {a.numel()} roots differ, e.g. at {a[~same][:4].tolist()}"


def test_rounding_and_codes_at_ties():
    """``rne_small`` is ``torch.round`` (half to even) and ``quantize_signed`` is the primitive's formula, at exact
    .5 ties, next to them, and far out of range."""
    g = torch.Generator().manual_seed(1)
    k = torch.randint(-400, 401, (1 << 14,), generator=g).float()
    x = torch.cat([k + 0.5, torch.nextafter(k + 0.5, k), torch.nextafter(k + 0.5, k + 1), k,
                   torch.randn(1 << 14, generator=g) * 1e6, torch.tensor([3e7, -3e7, 4194304.5, -4194303.5])])
    s, zr, qmax, offset = 0.75, 9.0, 15, 8
    out, codes = torch.empty_like(x), torch.empty(x.shape, dtype=torch.int8)
    _run(_round_kernel, x.numel(), x, out, codes, torch.tensor([s]), torch.tensor([zr]), QMAX=qmax, OFFSET=offset)
    xc = x.clamp(-4194304.0, 4194304.0)
    assert torch.equal(out, torch.round(xc))
    ref = (torch.clamp(torch.round(x / s) + zr, 0, qmax) - offset).to(torch.int8)
    assert torch.equal(codes, ref)
