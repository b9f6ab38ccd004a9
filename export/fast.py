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

:func:`vit_block` runs a whole timm ViT block (fused LayerNorms) as one function: at batch 1 the activations are
small and the per-op and per-module Python cost is most of the time, so constants are 0-d tensors and plans
(NamedTuples holding their tensors) replace module attribute reads.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lowbit import packing
from lowbit import primitives as P

BACKENDS = ("int8", "float")
EXACT_F32 = 2 ** 24


class Codes(NamedTuple):
    """How one activation quantizer emits codes on the fast path: ``clamp(round(x / s) + add, lo, hi)``, cast to
    int8 when ``int8`` (``lo = -c``, ``hi = qmax - c``, ``add = round(z) - c``); ``span = max|code - (z - c)|``;
    ``add_t``: ``add`` as a 0-d float32 tensor, None when 0 (a tensor operand costs less per call than a float)."""

    add: float
    lo: float
    hi: float
    int8: bool
    span: int
    add_t: Optional[Tensor] = None


def scalar(v: float) -> Tensor:
    """0-d float32 tensor of ``v``: the value a Python float operand of a float32 op is rounded to."""
    return torch.tensor(float(v), dtype=torch.float32)


def make_codes(add: float, lo: float, hi: float, int8: bool, span: int) -> Codes:
    return Codes(float(add), float(lo), float(hi), int8, span, scalar(add) if add else None)


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
    """The per-call checks of :func:`lowbit.primitives.quantize` on the quantizer, done once (ValueError naming it)."""
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
    return make_codes(zr - c, -c, qmax - c, int8, max(zr, qmax - zr))


def codes_(t: Tensor, s: Tensor, c: Codes, inplace: bool = True, clamp: bool = True) -> Tensor:
    """Codes of float32 ``t`` (overwritten when ``inplace``): ``clamp(round(t / s) + add, lo, hi)`` as in
    ``primitives.quantize`` (the integer sum is exact below 2^24 and saturates the same way above); ``clamp=False``
    where the caller knows the codes are in bounds."""
    t = (t.div_(s) if inplace else t / s).round_()
    if c.add_t is not None:
        t.add_(c.add_t)
    if clamp:
        t.clamp_(c.lo, c.hi)
    return t.to(torch.int8) if c.int8 else t


def f32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float32 else x.float()


class LayerNormPlan(NamedTuple):
    """A fused LayerNorm: ``k`` (its width) and ``eps`` as 0-d float32 tensors, the affine ``weight``, ``bias``."""

    k: Tensor
    eps: Tensor
    weight: Optional[Tensor]
    bias: Optional[Tensor]


def layernorm_plan(k: int, eps: float, weight: Optional[Tensor], bias: Optional[Tensor]) -> LayerNormPlan:
    return LayerNormPlan(scalar(k), scalar(eps), weight, bias)


def layernorm(x: Tensor, ln: LayerNormPlan) -> Tensor:
    """:func:`kernels.reference.layernorm` with the same float ops, in place on its own temporaries (``x.mean(-1)``
    is ATen's CPU mean: the sum divided by the width)."""
    x = f32(x)
    xc = x - x.sum(dim=-1, keepdim=True).div_(ln.k)
    y = xc.div_((xc * xc).sum(dim=-1, keepdim=True).div_(ln.k).add_(ln.eps).sqrt_())
    if ln.weight is not None:
        y.mul_(ln.weight)
    if ln.bias is not None:
        y.add_(ln.bias)
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
    mm = torch.bmm if a.dim() == 3 else torch.matmul
    if dtype == torch.float32:
        return mm(a, b)
    return mm(a.to(dtype), b.to(dtype)).float()


class LinearPlan(NamedTuple):
    """One linear on the fast path: load-time Python constants, then (filled in by the module) the tensors of a call,
    the same objects as the module's buffers: ``w``, ``scale``, ``cw``, ``col_t`` (:func:`linear_tensors`),
    ``bias``, and the input's step ``in_s``, fused LayerNorm ``ln`` or rescale ``r`` / ``shift``."""

    backend: str
    codes: Codes
    dtype: torch.dtype  # float backend: GEMM dtype
    rowsum: bool        # int8 backend, 8-bit weights: cw[n] * rowsum(a_t)
    col: bool           # int8 backend: + col[n]
    w: Optional[Tensor] = None
    scale: Optional[Tensor] = None
    cw: Optional[Tensor] = None
    col_t: Optional[Tensor] = None
    bias: Optional[Tensor] = None
    in_s: Optional[Tensor] = None
    ln: Optional[LayerNormPlan] = None
    r: Optional[Tensor] = None
    shift: Optional[Tensor] = None


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


def input_codes(x: Tensor, p: LinearPlan, fresh: bool = False) -> Tensor:
    """Codes ``[M, K]`` of ``LN'(x)``, ``(x - shift) / r`` or ``x`` (``x [M, K]``; overwritten when ``fresh``)."""
    if p.ln is not None:
        return codes_(layernorm(x, p.ln), p.in_s, p.codes)
    if p.r is None and p.shift is None:
        return codes_(f32(x), p.in_s, p.codes, inplace=fresh and x.dtype == torch.float32)
    return codes_(P.apply_rescale(f32(x), p.r, p.shift), p.in_s, p.codes)


def linear(a: Tensor, p: LinearPlan, gelu: bool = False) -> Tensor:
    """float32 ``y [M, N]`` of codes ``a [M, K]`` (int8 or float as ``p`` says); exact-erf GELU when ``gelu``."""
    if p.backend == "int8":
        acc = torch._int_mm(a, p.w)
        if p.rowsum:
            acc.add_(a.sum(dim=-1, keepdim=True, dtype=torch.int32) * p.cw)
        if p.col:
            acc.add_(p.col_t)
        y = acc.view(torch.float32).copy_(acc)  # acc.float() in place (same conversion, no new buffer)
        y.mul_(p.scale)
    else:
        y = exact_matmul(a, p.w, p.dtype).mul_(p.scale)
    if p.bias is not None:
        y.add_(p.bias)
    return torch._C._nn.gelu_(y) if gelu else y  # F.gelu (exact erf) in place on the fresh y


class AttentionPlan(NamedTuple):
    """One attention on the fast path: ``qk = scale * sq * sk`` and ``pv = sp * sv`` (the reference's Python-float
    products; ``qk_t``, ``pv_t`` as 0-d tensors), ``spans`` of q, k, v, p codes, ``p_codes``, ``sulq``,
    ``bounds``: the Q, K, V clamp bounds when they are one pair, ``p_clamp``: whether the probability codes need
    their clamp (not when every ``P`` in ``[0, 1]`` already rounds into the bounds), then the tensors
    (:func:`attention_tensors`; the module's buffers): ``s3``, ``lo3``, ``hi3 [3, 1, 1, 1, 1]``, ``p_s``, ``p_eta``, ``p_x0``,
    ``p_table``, ``rel_bias``."""

    qk: float
    pv: float
    spans: tuple
    p_codes: Optional[Codes]
    sulq: bool
    bounds: Optional[tuple] = None
    p_clamp: bool = True
    qk_t: Optional[Tensor] = None
    pv_t: Optional[Tensor] = None
    s3: Optional[Tensor] = None
    lo3: Optional[Tensor] = None
    hi3: Optional[Tensor] = None
    p_s: Optional[Tensor] = None
    p_eta: Optional[Tensor] = None
    p_x0: Optional[Tensor] = None
    p_table: Optional[Tensor] = None
    rel_bias: Optional[Tensor] = None


def attention(qkv: Tensor, b: int, n: int, heads: int, plan: AttentionPlan, mask: Optional[Tensor] = None) -> Tensor:
    """float32 ``[b, n, C]`` attention output from the float qkv output ``[b * n, 3C]`` (overwritten).

    Same float ops as :func:`kernels.reference.quant_attention` on the codes of ``ops.quantize`` of Q, K, V."""
    d = qkv.shape[-1] // (3 * heads)
    bh = b * heads
    # one pass reads the [b, n, 3, H, D] layout and writes head-major [3, b, H, n, D] codes (contiguous GEMM operands)
    t = qkv.view(b, n, 3, heads, d).permute(2, 0, 3, 1, 4)
    if torch.compiler.is_compiling():  # (out= into a permuted layout trips the compiler's reshape; it fuses anyway)
        t = (t / plan.s3).contiguous()
    else:
        t = torch.div(t, plan.s3, out=qkv.new_empty(3, b, heads, n, d))
    t.round_()
    if plan.bounds is not None:
        t.clamp_(*plan.bounds)
    else:  # clamp_min_/clamp_max_: clamp_ with tensor bounds is several times slower on the CPU (same values)
        t.clamp_min_(plan.lo3).clamp_max_(plan.hi3)
    q, k, v = t.view(3, bh, n, d).unbind(0)
    sq, sk, sv, sp = plan.spans
    s = exact_matmul(q, k.transpose(1, 2), gemm_dtype(d, sq, sk)).mul_(plan.qk_t)
    if plan.rel_bias is not None:
        s.view(b, heads, n, n).add_(plan.rel_bias)
    if mask is not None:
        nw = mask.shape[0]
        s.view(b // nw, nw, heads, n, n).add_(mask.float()[None, :, None])
    p = torch.softmax(s, dim=-1)
    if plan.sulq:
        u = codes_(p.add_(plan.p_eta).log2_().neg_().sub_(plan.p_x0), plan.p_s, plan.p_codes).long()
        o = torch.matmul(plan.p_table[u], v)
    else:
        o = exact_matmul(codes_(p, plan.p_s, plan.p_codes, clamp=plan.p_clamp), v, gemm_dtype(n, sp, sv))
    return attention_output(o.view(b, heads, n, d), plan.pv_t)


def attention_output(o: Tensor, pv: Tensor) -> Tensor:
    """``(o * pv)`` of ``o [b, H, n, D]`` written token-major ``[b, n, H * D]`` in the same pass."""
    b, h, n, d = o.shape
    if torch.compiler.is_compiling():
        return (o * pv).transpose(1, 2).reshape(b, n, h * d)
    return torch.mul(o.transpose(1, 2), pv, out=o.new_empty(b, n, h, d)).view(b, n, h * d)


def probabilities_in_bounds(s: Tensor, c: Codes) -> bool:
    """Whether ``round(p / s) + add`` lies in ``[lo, hi]`` for every float32 ``p`` in ``[0, 1 + 2^-20]`` (softmax
    outputs, with a margin for its rounding), so the clamp of the probability codes changes nothing."""
    top = torch.tensor(1.0 + 2.0 ** -20, dtype=torch.float32) / torch.as_tensor(s, dtype=torch.float32)
    return c.lo <= c.add and float(top.round()) + c.add <= c.hi


def attention_tensors(qps: dict, scale: float, name: str):
    """``(plan, tensors)`` of an attention's quantizers ``qps`` (``q, k, v``: :class:`QParams`, ``p``: QParams or
    SULQParams); ``tensors``: ``fast_s3/lo3/hi3 [3]`` (step, clamp bounds of Q, K, V), ``fast_p_table``; the plan's
    tensor fields are left for the module to fill in."""
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
        p_codes = make_codes(zr, 0, P.qmax(p.bits), False, P.qmax(p.bits))  # unsigned codes, table index
        t["fast_p_table"] = P.sulq_table(p.eta, p.s, p.z, p.bits, p.x0, bool(p.pow2))
    else:
        p_codes = act_codes(p.s, p.z, p.bits, False, f"{name} p")
    qk = float(scale) * float(qps["q"].s) * float(qps["k"].s)
    pv = float(p.s) * float(qps["v"].s) if not sulq else float(qps["v"].s)
    pairs = {(codes[k].lo, codes[k].hi) for k in "qkv"}
    plan = AttentionPlan(qk, pv, (codes["q"].span, codes["k"].span, codes["v"].span, p_codes.span), p_codes, sulq,
                         pairs.pop() if len(pairs) == 1 else None, sulq or not probabilities_in_bounds(p.s, p_codes),
                         scalar(qk), scalar(pv))
    return plan, t


class BlockPlan(NamedTuple):
    """A timm ViT ``Block`` whose LayerNorms are fused into ``qkv`` and ``fc1`` and whose other parts are identities."""

    qkv: LinearPlan
    attn: AttentionPlan
    heads: int
    proj: LinearPlan
    fc1: LinearPlan
    fc2: LinearPlan


def vit_block(x: Tensor, p: BlockPlan) -> Tensor:
    """``x + attn(x)``, then ``+ mlp(.)``, for ``x [b, n, C]``: the block's module calls flattened into one function
    (the same ops as the packed modules' fast path; the residual sums are added in place, ``a + b == b + a``)."""
    b, n, c = x.shape
    x = f32(x).reshape(-1, c)
    o = attention(linear(input_codes(x, p.qkv), p.qkv), b, n, p.heads, p.attn)
    x = linear(input_codes(o.view(b * n, -1), p.proj, fresh=True), p.proj).add_(x)
    h = linear(input_codes(x, p.fc1), p.fc1, gelu=True)
    return linear(codes_(h, p.fc2.in_s, p.fc2.codes), p.fc2).add_(x).view(b, n, -1)
