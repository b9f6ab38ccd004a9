"""Fast CPU path of a loaded checkpoint: bit for bit the integer arithmetic of :mod:`kernels.reference`.

:func:`prepare` (called by :func:`export.load` on the CPU) computes once, from the packed tensors, everything that
depends only on the weights and the quantizers; per call only the activation work remains. Validation (step sizes
finite and > 0, zero points finite, probe of the integer GEMM) happens there, not per call.

Linear ``[N, K]``, unsigned activation codes ``a`` (zero point ``za``, step ``sa``), weight codes ``w`` (``zw[n]``,
``sw[n]``)::

    acc[m, n] = sum_k (a[m,k] - za)(w[n,k] - zw[n])          the exact integer of primitives.int_gemm
    y         = acc * (sa * sw[n]) + bias[n]                 the reference's float epilogue, same op order

Backends (``backend``):

* ``"int8"`` (default where ``torch._int_mm`` is exact, probed once): int8 codes ``a_t = a - c`` (``c = za`` when
  ``qmax(a) <= 127``, else the storage offset 128) and weights ``w_t = w - zw[n]`` (``<= 7`` bits; 8-bit: the
  signed storage ``w - 128``, ``cw[n] = 128 - zw[n]``), so ``acc = _int_mm(a_t, w_t^T) + cw[n] * rowsum(a_t)[m]
  + col[n]`` with ``col[n] = ca * colsum(w_t)[n] + K * ca * cw[n]``, ``ca = c - za`` (terms that are 0 are skipped).
* ``"float"``: centred codes ``a - za`` and ``w - zw[n]`` in a float GEMM that is exact: float32 where
  ``K * max|a - za| * max|w - zw|`` < 2^24, else float64.

Attention: Q, K, V centred codes ``clamp(round(x / s), -z, qmax - z)`` from one pass over the qkv output, written
head-major; ``S = (Qc Kc^T) * (scale sq sk)`` and ``O = (Pc Vc) * (sp sv)`` with exact float32 batched GEMMs (float64
where ``D`` or ``L`` times the code ranges reaches 2^24); SULQ probabilities dequantized through the precomputed
``primitives.sulq_table`` and multiplied as the reference does. Swin's relative position bias is gathered once.
The float GEMMs assume IEEE float32 matmul (PyTorch's default ``float32_matmul_precision("highest")``).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from quant import packing
from quant import primitives as P

BACKENDS = ("int8", "float")
EXACT_F32 = 2 ** 24


class Codes(NamedTuple):
    """How one activation quantizer emits codes on the fast path: ``clamp(round(x / s) + add, lo, hi)``, cast to
    int8 when ``int8`` (``lo = -c``, ``hi = qmax - c``, ``add = round(z) - c``); ``span = max|code - (z - c)|``."""

    add: float
    lo: float
    hi: float
    int8: bool
    span: int


@functools.lru_cache(maxsize=None)
def int_mm_exact() -> bool:
    """Whether ``torch._int_mm`` on this CPU returns the exact int32 product of full-range int8 matrices (some
    int8 GEMMs saturate 16-bit partial sums without VNNI). Probed once per process."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (32, 256), dtype=torch.int8, generator=g)
    w = torch.randint(-128, 128, (48, 256), dtype=torch.int8, generator=g)
    a[0], w[0], a[1], w[1] = -128, -128, 127, 127  # the extremes: 2 * 128 * 128 overflows int16
    try:
        got = torch._int_mm(a, w.t())
    except (RuntimeError, AttributeError):
        return False
    return torch.equal(got.long(), a.long() @ w.long().t())


def default_backend() -> str:
    return "int8" if int_mm_exact() else "float"


def check_backend(backend: Optional[str]) -> str:
    if backend is None:
        return default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"fast-path backend must be one of {BACKENDS} (or None: automatic), got {backend!r}")
    if backend == "int8" and not int_mm_exact():
        raise ValueError("backend 'int8': torch._int_mm is not exact on this CPU; use backend 'float'")
    return backend


def check_qparams(name: str, s: Tensor, z: Tensor) -> None:
    """The per-call checks of :func:`quant.primitives.quantize` on the quantizer, done once (ValueError naming it)."""
    try:
        P.check_step(torch.as_tensor(s, dtype=torch.float32))
        P._check_finite("zero point z", torch.as_tensor(z, dtype=torch.float32))
    except ValueError as e:
        raise ValueError(f"{name} input quantizer: {str(e).split(';')[0]}") from None


def act_codes(s: Tensor, z: Tensor, bits, int8: bool, name: str) -> Codes:
    """:class:`Codes` of a per-tensor quantizer: int8 codes ``a - c`` (``int8``), else float centred ``a - z``."""
    check_qparams(name, s, z)
    zr, qmax = int(P.round_zero_point(torch.as_tensor(z, dtype=torch.float32), bits)), P.qmax(bits)
    c = (zr if qmax <= 127 else P.code_offset(bits)) if int8 else zr
    return Codes(float(zr - c), float(-c), float(qmax - c), int8, max(zr, qmax - zr))


def codes_(t: Tensor, s: Tensor, c: Codes, inplace: bool = True) -> Tensor:
    """Codes of float32 ``t`` (overwritten when ``inplace``): ``clamp(round(t / s) + add, lo, hi)`` as in
    ``primitives.quantize`` (the integer sum is exact below 2^24 and saturates the same way above)."""
    t = t.div_(s) if inplace else t / s
    t.round_()
    if c.add:
        t.add_(c.add)
    t.clamp_(c.lo, c.hi)
    return t.to(torch.int8) if c.int8 else t


def f32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float32 else x.float()


def layernorm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """:func:`kernels.reference.layernorm` with the same float ops, in place on its own temporaries."""
    x = f32(x)
    xc = x - x.mean(dim=-1, keepdim=True)
    y = xc.div_((xc * xc).mean(dim=-1, keepdim=True).add_(eps).sqrt_())
    if weight is not None:
        y.mul_(weight)
    if bias is not None:
        y.add_(bias)
    return y


def gemm_dtype(k: int, span_a: int, span_b: int) -> torch.dtype:
    """float32 when every partial sum of ``k`` products of integers of magnitude ``<= span_a``, ``<= span_b`` is
    exact in it, else float64 (``primitives._exact_matmul``'s rule on the centred codes)."""
    bound = k * span_a * span_b
    if bound >= 2 ** 53:
        raise ValueError(f"integer GEMM too large to accumulate exactly (K={k})")
    return torch.float32 if bound < EXACT_F32 else torch.float64


def exact_matmul(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """float32 ``a @ b`` of integer-valued float32 tensors, computed in ``dtype`` (exact by :func:`gemm_dtype`)."""
    if dtype == torch.float32:
        return torch.matmul(a, b)
    return torch.matmul(a.to(dtype), b.to(dtype)).float()


class LinearPlan(NamedTuple):
    """Load-time constants of one linear (Python values; its tensors are buffers of the module)."""

    backend: str
    codes: Codes
    dtype: torch.dtype  # float backend: GEMM dtype
    rowsum: bool        # int8 backend, 8-bit weights: cw[n] * rowsum(a_t)
    col: bool           # int8 backend: + col[n]


def linear_tensors(pw: packing.PackedWeight, w_scale: Tensor, w_zero: Tensor, in_s: Tensor, in_z: Tensor, a_bits,
                   backend: str, name: str):
    """``(plan, tensors)`` of a packed linear: ``tensors`` maps buffer name -> tensor (``fast_w [K, N]``: int8, the
    transposed view of a contiguous ``[N, K]``, or float; ``fast_scale [1, N]`` = ``float(sa) * sw``; ``fast_cw``, ``fast_col`` int32 ``[N]``)."""
    P._check_finite(f"{name} weight scale", w_scale.float())
    codes = act_codes(in_s, in_z, a_bits, backend == "int8", name)
    n, k = pw.n, pw.k
    qw = packing.unpack(pw).to(torch.int32)
    zw = P.round_zero_point(torch.as_tensor(w_zero, dtype=torch.float32), pw.bits).reshape(-1).to(torch.int32)
    centred = qw - zw[:, None]
    # the reference's epilogue constant: acc.float() * (float(sa) * sw.reshape(1, -1))
    t = {"fast_scale": float(in_s) * torch.as_tensor(w_scale, dtype=torch.float32).reshape(1, -1)}
    span_w = int(centred.abs().max()) if centred.numel() else 0
    if backend == "float":
        dtype = gemm_dtype(k, codes.span, span_w)
        t["fast_w"] = centred.t().to(dtype).contiguous()
        return LinearPlan(backend, codes, dtype, False, False), t
    if P.qmax(pw.bits) <= 127:
        w_t, cw = centred, torch.zeros(n, dtype=torch.int32)
    else:
        off = P.code_offset(pw.bits)
        w_t, cw = qw - off, off - zw
    ca = int(-codes.lo) - int(P.round_zero_point(torch.as_tensor(in_z, dtype=torch.float32), a_bits))  # c - za
    col = ca * w_t.sum(dim=1, dtype=torch.int32) + k * ca * cw
    t["fast_w"] = w_t.to(torch.int8).contiguous().t()
    plan = LinearPlan(backend, codes, torch.int32, bool(cw.any()), bool(col.any()))
    if plan.rowsum:
        t["fast_cw"] = cw.reshape(1, -1).contiguous()
    if plan.col:
        t["fast_col"] = col.to(torch.int32).reshape(1, -1).contiguous()
    return plan, t


def linear(a: Tensor, plan: LinearPlan, w: Tensor, scale: Tensor, bias: Optional[Tensor], cw: Optional[Tensor],
           col: Optional[Tensor]) -> Tensor:
    """float32 ``y [M, N]`` of codes ``a [M, K]`` (int8 or float as ``plan`` says)."""
    if plan.backend == "int8":
        acc = torch._int_mm(a, w)
        if plan.rowsum:
            acc.add_(a.sum(dim=-1, keepdim=True, dtype=torch.int32) * cw)
        if plan.col:
            acc.add_(col)
        y = acc.view(torch.float32).copy_(acc)  # acc.float() in place (same conversion, no new buffer)
        y.mul_(scale)
    else:
        y = exact_matmul(a, w, plan.dtype).mul_(scale)
    if bias is not None:
        y.add_(bias)
    return y


class AttentionPlan(NamedTuple):
    """Load-time constants of one attention: centred-code bounds, ``qk = scale * sq * sk``, ``pv = sp * sv`` (the
    reference's Python-float products), ``spans`` of q, k, v, p codes, ``sulq``."""

    qk: float
    pv: float
    spans: tuple
    p_codes: Optional[Codes]
    sulq: bool


def attention(qkv: Tensor, b: int, n: int, heads: int, plan: AttentionPlan, s3: Tensor, lo3: Tensor, hi3: Tensor,
              p_s: Tensor, p_eta: Optional[Tensor], p_table: Optional[Tensor], rel_bias: Optional[Tensor],
              mask: Optional[Tensor]) -> Tensor:
    """float32 ``[b, n, C]`` attention output from the float qkv output ``[b * n, 3C]`` (overwritten).

    Same float ops as :func:`kernels.reference.quant_attention` on the codes of ``ops.quantize`` of Q, K, V."""
    d = qkv.shape[-1] // (3 * heads)
    bh = b * heads
    # one pass reads the [b, n, 3, H, D] layout and writes head-major [3, b, H, n, D] codes (contiguous GEMM operands)
    t = qkv.view(b, n, 3, heads, d).permute(2, 0, 3, 1, 4)
    if torch.compiler.is_compiling():  # (out= into a permuted layout trips the compiler's reshape; it fuses anyway)
        t = (t / s3).contiguous()
    else:
        t = torch.div(t, s3, out=qkv.new_empty(3, b, heads, n, d))
    # clamp_min_/clamp_max_: clamp_ with tensor bounds is several times slower on the CPU (same values)
    q, k, v = t.round_().clamp_min_(lo3).clamp_max_(hi3).reshape(3, bh, n, d).unbind(0)  # reshape: a view here
    sq, sk, sv, sp = plan.spans
    s = exact_matmul(q, k.transpose(1, 2), gemm_dtype(d, sq, sk)).mul_(plan.qk)
    if rel_bias is not None:
        s.view(b, heads, n, n).add_(rel_bias)
    if mask is not None:
        nw = mask.shape[0]
        s.view(b // nw, nw, heads, n, n).add_(mask.float()[None, :, None])
    p = torch.softmax(s, dim=-1)
    if plan.sulq:
        u = codes_(p.add_(p_eta).log2_().neg_(), p_s, plan.p_codes).long()
        o = torch.matmul(p_table[u], v)
    else:
        o = exact_matmul(codes_(p, p_s, plan.p_codes), v, gemm_dtype(n, sp, sv))
    return attention_output(o.view(b, heads, n, d), plan.pv)


def attention_output(o: Tensor, pv: float) -> Tensor:
    """``(o * pv)`` of ``o [b, H, n, D]`` written token-major ``[b, n, H * D]`` in the same pass."""
    b, h, n, d = o.shape
    if torch.compiler.is_compiling():
        return (o * pv).transpose(1, 2).reshape(b, n, h * d)
    return torch.mul(o.transpose(1, 2), pv, out=o.new_empty(b, n, h, d)).reshape(b, n, h * d)


def attention_tensors(qps: dict, scale: float, name: str):
    """``(plan, tensors)`` of an attention's quantizers ``qps`` (``q, k, v``: :class:`QParams`, ``p``: QParams or
    SULQParams); ``tensors``: ``fast_s3/lo3/hi3 [3]`` (step, clamp bounds of Q, K, V), ``fast_p_table``."""
    codes = {k: act_codes(qps[k].s, qps[k].z, qps[k].bits, False, f"{name} {k}") for k in "qkv"}
    t = {"fast_s3": torch.stack([torch.as_tensor(qps[k].s, dtype=torch.float32).reshape(()) for k in "qkv"]),
         "fast_lo3": torch.tensor([codes[k].lo for k in "qkv"]), "fast_hi3": torch.tensor([codes[k].hi for k in "qkv"])}
    p = qps["p"]
    sulq = isinstance(p, P.SULQParams)
    if sulq:
        eta = torch.as_tensor(p.eta, dtype=torch.float32)
        if eta.numel() != 1 or not float(eta) > 0:
            raise ValueError(f"{name}: SULQ shift eta must be one value > 0, got {eta.tolist()}")
        check_qparams(f"{name} p", p.s, p.z)
        zr = float(P.round_zero_point(torch.as_tensor(p.z, dtype=torch.float32), p.bits))
        p_codes = Codes(zr, 0.0, float(P.qmax(p.bits)), False, P.qmax(p.bits))  # unsigned codes, table index
        t["fast_p_table"] = P.sulq_table(p.eta, p.s, p.z, p.bits)
    else:
        p_codes = act_codes(p.s, p.z, p.bits, False, f"{name} p")
    plan = AttentionPlan(float(scale) * float(qps["q"].s) * float(qps["k"].s), float(p.s) * float(qps["v"].s)
                         if not sulq else float(qps["v"].s),
                         (codes["q"].span, codes["k"].span, codes["v"].span, p_codes.span), p_codes, sulq)
    return plan, t
