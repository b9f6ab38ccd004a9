"""Quantized attention with SULQ probability codes (I&S-ViT), two passes over the keys like
:mod:`kernels.quant_attention`.

Pass 2 forms the exact normalised ``P``, its unsigned SULQ codes ``clamp(round((-log2(P + eta) - x0) / sp) + zp, 0,
qmax)`` (held as int8 ``q - P_OFFSET``; int32 for the published 8-bit grid's 257 levels) and dequantizes them
through the ``n_levels``-entry table of :func:`lowbit.primitives.sulq_table` (``2^(-t) - eta`` with
``t = (q - zp) sp + x0``, rounded for the published power-of-two form; a gather), then
``O = sv * sum_j P_hat[j] (v[j] - zv)``. ``P_hat`` is not an integer grid, so ``P V`` is a float dot: ``P_hat`` is
split into fp16 ``hi + lo`` halves and ``v - zv`` (integers up to 255, exact in fp16) multiplies both on the fp16
tensor cores with fp32 accumulation (about fp32 accuracy). Cost against the uniform kernel's single int8 ``tl.dot``:
two fp16 dots (each half the int8 rate on Ampere/Hopper, so ~4x the P V tensor-core time), the table gather and a
``log2`` per score; ``Q K^T`` and pass 1 are unchanged.
"""
import triton
import triton.language as tl

from ._helpers import exp2, quantize_int32, quantize_signed
from .quant_attention import _scores, load_query_tile, row_max_sum, score_operands, store_output


@triton.jit
def split_dot_f16(a, b16):
    """``a @ b16`` for float32 ``a`` and exactly-fp16 ``b16``: ``a = hi + lo`` (fp16 each), two fp16 dots, fp32 sum."""
    hi = a.to(tl.float16)
    lo = (a - hi.to(tl.float32)).to(tl.float16)
    return tl.dot(hi, b16, out_dtype=tl.float32) + tl.dot(lo, b16, out_dtype=tl.float32)


@triton.jit
def sulq_pv_tile(acc, p, eta, x0, sp, zp, table_ptr, zv, v_base, stride_l, offs_n, offs_d, L, P_QMAX: tl.constexpr,
                 P_OFFSET: tl.constexpr):
    """One key tile of ``P V`` from the normalised ``p``: SULQ codes, the table's ``P_hat`` (0 past ``L``),
    ``acc += P_hat (v - zv)`` by :func:`split_dot_f16`."""
    if P_QMAX > 255:  # the published 8-bit grid: 257 codes, kept in int32
        idx = quantize_int32(-tl.log2(p + eta) - x0, sp, zp, P_QMAX, 0)
    else:  # (int8 codes: as many registers as the uniform kernel's; int32 spills at D = 32 on sm_80)
        idx = quantize_signed(-tl.log2(p + eta) - x0, sp, zp, P_QMAX, P_OFFSET).to(tl.int32) + P_OFFSET
    valid_n = offs_n < L
    ph = tl.where(valid_n[None, :], tl.load(table_ptr + idx), 0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_l + offs_d[None, :], mask=valid_n[:, None], other=0)
    return acc + split_dot_f16(ph, (v.to(tl.float32) - zv).to(tl.float16))


@triton.jit
def quant_attention_sulq_kernel(q_ptr, k_ptr, v_ptr, out_ptr, bias_ptr, mask_ptr, zq_ptr, zk_ptr, zv_ptr,
                                qk_scale_ptr, eta_ptr, x0_ptr, sp_ptr, zp_ptr, table_ptr, sv_ptr, r_ptr, shift_ptr,
                                rq_s_ptr, rq_z_ptr, H, L, NW, stride_b, stride_h, stride_l, stride_ob, stride_oh,
                                stride_ol, D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
                                P_QMAX: tl.constexpr, P_OFFSET: tl.constexpr, HAS_R: tl.constexpr,
                                HAS_SHIFT: tl.constexpr, REQUANT: tl.constexpr, RQ_QMAX: tl.constexpr,
                                RQ_OFFSET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                FAST_EXP: tl.constexpr):
    """int8 ``q, k, v`` views ``[B, H, L, D]`` -> ``out`` (float32 or requantized int8, as
    :func:`kernels.quant_attention.store_output`); grid ``(cdiv(L, BLOCK_M), B * H)``. ``zq, zk, zv`` signed zero
    points; ``eta, x0, sp, zp`` (rounded, unsigned) the SULQ quantizer; ``table [P_QMAX + 1]``."""
    base, offs_m, offs_d, valid_m, q, rowsum_q, bias_base, mask_base = load_query_tile(
        q_ptr, bias_ptr, mask_ptr, H, L, NW, stride_b, stride_h, stride_l, D, BLOCK_M)
    zq_h1, zq_h2, rc, c2 = score_operands(q, rowsum_q, zq_ptr, zk_ptr, qk_scale_ptr, D, BLOCK_M)
    zv = tl.load(zv_ptr)
    eta = tl.load(eta_ptr)
    x0 = tl.load(x0_ptr)
    sp = tl.load(sp_ptr)
    zp = tl.load(zp_ptr)
    k_base = k_ptr + base
    v_base = v_ptr + base

    m_i, l_i = row_max_sum(q, zq_h1, zq_h2, rc, k_base, stride_l, bias_base, mask_base, offs_m, offs_d, L, c2,
                           HAS_BIAS, HAS_MASK, BLOCK_M, BLOCK_N, FAST_EXP)

    acc = tl.zeros((BLOCK_M, D), tl.float32)
    for n0 in range(0, L, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        s = _scores(q, zq_h1, zq_h2, rc, k_base, stride_l, bias_base, mask_base, offs_m, offs_n, offs_d, L, c2,
                    HAS_BIAS, HAS_MASK, True)
        p = tl.math.div_rn(exp2(s - m_i[:, None], FAST_EXP), l_i[:, None])
        acc = sulq_pv_tile(acc, p, eta, x0, sp, zp, table_ptr, zv, v_base, stride_l, offs_n, offs_d, L, P_QMAX,
                           P_OFFSET)
    o = acc * tl.load(sv_ptr)
    store_output(o, out_ptr, H, offs_m, offs_d, valid_m, stride_ob, stride_oh, stride_ol, r_ptr, shift_ptr,
                 rq_s_ptr, rq_z_ptr, D, HAS_R, HAS_SHIFT, REQUANT, RQ_QMAX, RQ_OFFSET)
