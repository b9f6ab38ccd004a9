"""``torch.library`` registration (namespace ``lowbit``) of the Triton kernels: launchers plus fake (meta) impls,
so ``torch.compile`` traces through them. Quantizer parameters travel as tensors (no host sync): ``s`` float32,
zero points already rounded (``zr``: unsigned, ``z*_s``: signed storage form), ``bits`` as a float (1.58 = ternary).
Call these through :mod:`kernels.ops`, which validates inputs and prepares the parameters.
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch
import triton
from torch import Tensor

from quant import primitives as P

from .fake_quantize import fake_quantize_bwd_kernel, fake_quantize_fwd_kernel
from .gemm_int3 import gemm_int3_kernel
from .gemm_int4 import gemm_int4_kernel
from .gemm_int8 import gemm_int8_kernel
from .gemm_ternary import gemm_ternary_kernel
from .layernorm_quantize import layernorm_quantize_kernel
from .quant_attention import quant_attention_kernel
from .quant_attention_sulq import quant_attention_sulq_kernel
from .rescale_quantize import rescale_quantize_kernel


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pow2(n: int, lo: int = 16, hi: int = 1 << 30) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _store_dtype(dt: torch.dtype) -> torch.dtype:
    """The interpreter truncates fp32 -> bf16; there the kernel stores fp32 and torch rounds to nearest."""
    return torch.float32 if dt == torch.bfloat16 and _interpreted() else dt


def _dummy(t: Tensor) -> Tensor:
    return torch.empty(1, dtype=torch.float32, device=t.device)


def _rows(x: Tensor) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _elementwise_blocks(c: int) -> Tuple[int, int]:
    bc = _pow2(c, 16, 1024 if _interpreted() else 256)
    return max(1, (4096 if _interpreted() else 2048) // bc), bc


# ---------------------------------------------------------------------------------------------- quantize


@torch.library.custom_op("lowbit::rescale_quantize", mutates_args=())
def rescale_quantize(x: Tensor, r: Optional[Tensor], shift: Optional[Tensor], s: Tensor, zr: Tensor,
                     bits: float) -> Tensor:
    x2 = _rows(x)
    m, c = x2.shape
    out = torch.empty((m, c), dtype=torch.int8, device=x.device)
    bm, bc = _elementwise_blocks(c)
    grid = (triton.cdiv(m, bm), triton.cdiv(c, bc))
    if m and c:
        d = _dummy(x)
        rescale_quantize_kernel[grid](x2, out, r if r is not None else d, shift if shift is not None else d, s, zr,
                                      m, c, x2.stride(0), out.stride(0), HAS_R=r is not None,
                                      HAS_SHIFT=shift is not None, QMAX=P.qmax(bits), OFFSET=P.code_offset(bits),
                                      BLOCK_M=bm, BLOCK_C=bc)
    return out.reshape(x.shape)


@rescale_quantize.register_fake
def _(x, r, shift, s, zr, bits):
    return torch.empty_like(x, dtype=torch.int8)


@torch.library.custom_op("lowbit::layernorm_quantize", mutates_args=())
def layernorm_quantize(x: Tensor, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], eps: float,
                       r: Optional[Tensor], shift: Optional[Tensor], s: Tensor, zr: Tensor, bits: float) -> Tensor:
    x2 = _rows(x)
    m, c = x2.shape
    out = torch.empty((m, c), dtype=torch.int8, device=x.device)
    bc = _pow2(c)
    bm = max(1, min(64 if _interpreted() else 8, 8192 // bc))
    d = _dummy(x)
    if m and c:
        layernorm_quantize_kernel[(triton.cdiv(m, bm),)](
            x2, out, ln_weight if ln_weight is not None else d, ln_bias if ln_bias is not None else d,
            r if r is not None else d, shift if shift is not None else d, s, zr, m, c, float(eps), x2.stride(0),
            out.stride(0), HAS_LNW=ln_weight is not None, HAS_LNB=ln_bias is not None, HAS_R=r is not None,
            HAS_SHIFT=shift is not None, QMAX=P.qmax(bits), OFFSET=P.code_offset(bits), BLOCK_M=bm, BLOCK_C=bc)
    return out.reshape(x.shape)


@layernorm_quantize.register_fake
def _(x, ln_weight, ln_bias, eps, r, shift, s, zr, bits):
    return torch.empty_like(x, dtype=torch.int8)


# ---------------------------------------------------------------------------------------------- fake quant


@torch.library.custom_op("lowbit::fake_quantize_fwd", mutates_args=())
def fake_quantize_fwd(x: Tensor, r: Optional[Tensor], shift: Optional[Tensor], s: Tensor, z: Tensor,
                      bits: float) -> Tensor:
    """float32 ``x_hat`` of ``x [..., C]``; ``s, z`` hold 1 (per tensor) or ``M = numel / C`` (per row) values."""
    x2 = _rows(x)
    m, c = x2.shape
    out = torch.empty((m, c), dtype=torch.float32, device=x.device)
    bm, bc = _elementwise_blocks(c)
    d = _dummy(x)
    if m and c:
        fake_quantize_fwd_kernel[(triton.cdiv(m, bm), triton.cdiv(c, bc))](
            x2, out, r if r is not None else d, shift if shift is not None else d, s, z, m, c, x2.stride(0),
            0 if s.numel() == 1 else 1, HAS_R=r is not None, HAS_SHIFT=shift is not None, QMAX=P.qmax(bits),
            BLOCK_M=bm, BLOCK_C=bc)
    return out.reshape(x.shape)


@fake_quantize_fwd.register_fake
def _(x, r, shift, s, z, bits):
    return torch.empty_like(x, dtype=torch.float32)


@torch.library.custom_op("lowbit::fake_quantize_bwd", mutates_args=())
def fake_quantize_bwd(g: Tensor, x: Tensor, r: Optional[Tensor], shift: Optional[Tensor], s: Tensor, z: Tensor,
                      bits: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(gx [x.shape, x.dtype], gr [C], gshift [C], gs_rows [M], gz_rows [M])`` (s, z gradients summed per row)."""
    x2 = _rows(x)
    m, c = x2.shape
    g2 = g.reshape(m, c).float().contiguous()
    bm, bc = _elementwise_blocks(c)
    nm, nc = triton.cdiv(m, bm), triton.cdiv(c, bc)
    gx = torch.empty((m, c), dtype=_store_dtype(x.dtype), device=x.device)
    gr_p = torch.zeros((nm, c), dtype=torch.float32, device=x.device)
    gsh_p = torch.zeros((nm, c), dtype=torch.float32, device=x.device)
    gs_p = torch.zeros((m, nc), dtype=torch.float32, device=x.device)
    gz_p = torch.zeros((m, nc), dtype=torch.float32, device=x.device)
    d = _dummy(x)
    if m and c:
        fake_quantize_bwd_kernel[(nm, nc)](
            x2, g2, r if r is not None else d, shift if shift is not None else d, s, z, gx, gr_p, gsh_p, gs_p, gz_p,
            m, c, x2.stride(0), 0 if s.numel() == 1 else 1, HAS_R=r is not None, HAS_SHIFT=shift is not None,
            QMAX=P.qmax(bits), BLOCK_M=bm, BLOCK_C=bc)
    return gx.to(x.dtype).reshape(x.shape), gr_p.sum(0), gsh_p.sum(0), gs_p.sum(1), gz_p.sum(1)


@fake_quantize_bwd.register_fake
def _(g, x, r, shift, s, z, bits):
    c = x.shape[-1]
    m = x.numel() // c if c else 0
    f32 = dict(dtype=torch.float32, device=x.device)
    return (torch.empty_like(x), torch.empty(c, **f32), torch.empty(c, **f32), torch.empty(m, **f32),
            torch.empty(m, **f32))


# ---------------------------------------------------------------------------------------------- packed GEMM

_GEMM_KERNELS = {"2bit": gemm_ternary_kernel, "int4": gemm_int4_kernel, "int3": gemm_int3_kernel,
                 "int8": gemm_int8_kernel}


def _gemm_blocks(m: int, n: int) -> Tuple[int, int, int, dict]:
    if _interpreted():
        return _pow2(m, 16, 128), _pow2(n, 16, 128), 128, {}
    bm = _pow2(m, 16, 64)
    return bm, 128, 128, dict(num_warps=8 if bm >= 64 else 4, num_stages=3)


@torch.library.custom_op("lowbit::packed_linear", mutates_args=())
def packed_linear(a: Tensor, planes: List[Tensor], fmt: str, k: int, colsum: Tensor, sa: Tensor, za: Tensor,
                  sw: Tensor, zw: Tensor, bias: Optional[Tensor], gelu: bool, out_dtype: torch.dtype,
                  rq_s: Optional[Tensor], rq_zr: Optional[Tensor], rq_bits: float) -> Tensor:
    """``a [..., K]`` int8 codes times the packed weight ``planes`` (format ``fmt``); ``zw`` the zero point of the
    stored weight codes, ``colsum`` their row sums over K (int32 [N]). Requantizes when ``rq_s`` is given."""
    a2 = _rows(a)
    m = a2.shape[0]
    n = sw.numel()
    requant = rq_s is not None
    out = torch.empty((m, n), dtype=torch.int8 if requant else _store_dtype(out_dtype), device=a.device)
    bm, bn, bk, opts = _gemm_blocks(m, n)
    d = _dummy(a)
    if m and n:
        kern = _GEMM_KERNELS[fmt]
        kern[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
            a2, *planes, out, colsum, sa, za, sw, zw, bias if bias is not None else d,
            rq_s if requant else d, rq_zr if requant else d, m, n, k, a2.stride(0), *[t.stride(0) for t in planes],
            out.stride(0), HAS_BIAS=bias is not None, GELU=gelu, REQUANT=requant,
            RQ_QMAX=P.qmax(rq_bits) if requant else 0, RQ_OFFSET=P.code_offset(rq_bits) if requant else 0,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **opts)
    return out.to(torch.int8 if requant else out_dtype).reshape(*a.shape[:-1], n)


@packed_linear.register_fake
def _(a, planes, fmt, k, colsum, sa, za, sw, zw, bias, gelu, out_dtype, rq_s, rq_zr, rq_bits):
    dt = torch.int8 if rq_s is not None else out_dtype
    return a.new_empty((*a.shape[:-1], sw.numel()), dtype=dt)


# ---------------------------------------------------------------------------------------------- attention


@torch.library.custom_op("lowbit::quant_attention", mutates_args=())
def quant_attention(q: Tensor, k: Tensor, v: Tensor, rel_bias: Optional[Tensor], mask: Optional[Tensor],
                    zq: Tensor, zk: Tensor, zv: Tensor, qk_scale: Tensor, sp: Tensor, zp: Tensor, pv_scale: Tensor,
                    p_bits: float) -> Tensor:
    """float32 ``O [B, H, L, D]`` from int8 ``q, k, v [B, H, L, D]`` (see :mod:`kernels.quant_attention`)."""
    b, h, l, d = q.shape
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty((b, h, l, d), dtype=torch.float32, device=q.device)
    bm = 64
    dummy = _dummy(q)
    nw = mask.shape[0] if mask is not None else 1
    if b and h and l:
        quant_attention_kernel[(triton.cdiv(l, bm), b * h)](
            q, k, v, out, rel_bias.contiguous() if rel_bias is not None else dummy,
            mask.contiguous() if mask is not None else dummy, zq, zk, zv, qk_scale, sp, zp, pv_scale, h, l, nw, D=d,
            HAS_BIAS=rel_bias is not None, HAS_MASK=mask is not None, P_QMAX=P.qmax(p_bits),
            P_OFFSET=P.code_offset(p_bits), BLOCK_M=bm, BLOCK_N=64)
    return out


@quant_attention.register_fake
def _(q, k, v, rel_bias, mask, zq, zk, zv, qk_scale, sp, zp, pv_scale, p_bits):
    return torch.empty(q.shape, dtype=torch.float32, device=q.device)


@torch.library.custom_op("lowbit::quant_attention_sulq", mutates_args=())
def quant_attention_sulq(q: Tensor, k: Tensor, v: Tensor, rel_bias: Optional[Tensor], mask: Optional[Tensor],
                         zq: Tensor, zk: Tensor, zv: Tensor, qk_scale: Tensor, eta: Tensor, sp: Tensor, zp: Tensor,
                         table: Tensor, sv: Tensor, p_bits: float) -> Tensor:
    """float32 ``O [B, H, L, D]`` with SULQ probability codes (see :mod:`kernels.quant_attention_sulq`)."""
    b, h, l, d = q.shape
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty((b, h, l, d), dtype=torch.float32, device=q.device)
    bm = 64
    dummy = _dummy(q)
    nw = mask.shape[0] if mask is not None else 1
    if b and h and l:
        quant_attention_sulq_kernel[(triton.cdiv(l, bm), b * h)](
            q, k, v, out, rel_bias.contiguous() if rel_bias is not None else dummy,
            mask.contiguous() if mask is not None else dummy, zq, zk, zv, qk_scale, eta, sp, zp, table.contiguous(),
            sv, h, l, nw, D=d, HAS_BIAS=rel_bias is not None, HAS_MASK=mask is not None, P_QMAX=P.qmax(p_bits),
            P_OFFSET=P.code_offset(p_bits), BLOCK_M=bm, BLOCK_N=64)
    return out


@quant_attention_sulq.register_fake
def _(q, k, v, rel_bias, mask, zq, zk, zv, qk_scale, eta, sp, zp, table, sv, p_bits):
    return torch.empty(q.shape, dtype=torch.float32, device=q.device)
