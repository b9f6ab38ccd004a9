"""Quantized attention on int8 codes, two passes over the keys (the ``[L, L]`` matrix is never stored).

``S = qk_scale * (Q K^T - zk rowsum(Q) - zq colsum(K) + D zq zk) + rel_bias[h] + mask[b % nW]`` (int32 -> fp32);
pass 1 keeps the running row max ``m`` and sum ``l = sum exp(S - m)``; pass 2 recomputes ``S``, forms the exact
normalised ``P = exp(S - m) / l``, quantizes it (``clamp(round(P / sp) + zp, 0, qmax) - offset``) and accumulates
``O = pv_scale * (Pq V - zv rowsum(Pq) - zp colsum(V) + L zp zv)`` in int32.

Layout: ``q, k, v`` are ``[B, H, L, D]`` views with one set of strides ``(stride_b, stride_h, stride_l, 1)``, e.g.
the three slices of a qkv GEMM's int8 output ``[B, L, 3, H, D]`` (no copies); ``out`` is written through its own
strides (``[B, H, L, D]`` or heads-last ``[B, L, H, D]``), as float32, or (``REQUANT``) as the int8 codes of the
next linear's input, ``quantize((O - shift[c]) / r[c])`` with channel ``c = h * D + d`` (:func:`store_output`).
"""
import triton
import triton.language as tl

from ._helpers import div_rcp, quantize_signed, rescale


@triton.jit
def _scores(q, rowsum_q, k_base, stride_l, bias_base, mask_base, offs_m, offs_n, offs_d, L, zq, zk, qk_scale,
            D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr):
    """fp32 scores ``[BM, BN]`` for keys ``offs_n``; ``-inf`` for keys ``>= L``."""
    valid_n = offs_n < L
    k = tl.load(k_base + offs_n[:, None] * stride_l + offs_d[None, :], mask=valid_n[:, None], other=0)
    acc = tl.dot(q, tl.trans(k), out_dtype=tl.int32)
    colsum_k = tl.sum(k.to(tl.int32), axis=1)
    acc = acc - zk * rowsum_q[:, None] - zq * colsum_k[None, :] + D * zq * zk
    s = acc.to(tl.float32) * qk_scale
    lm = (offs_m[:, None] < L) & valid_n[None, :]
    if HAS_BIAS:
        s = s + tl.load(bias_base + offs_m[:, None] * L + offs_n[None, :], mask=lm, other=0.0).to(tl.float32)
    if HAS_MASK:
        s = s + tl.load(mask_base + offs_m[:, None] * L + offs_n[None, :], mask=lm, other=0.0).to(tl.float32)
    return tl.where(valid_n[None, :], s, float("-inf"))


@triton.jit
def row_max_sum(q, rowsum_q, k_base, stride_l, bias_base, mask_base, offs_m, offs_d, L, zq, zk, qk_scale,
                D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """Pass 1: running row max ``m`` and ``l = sum exp(S - m)`` over all keys."""
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(0, L, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        s = _scores(q, rowsum_q, k_base, stride_l, bias_base, mask_base, offs_m, offs_n, offs_d, L, zq, zk, qk_scale,
                    D, HAS_BIAS, HAS_MASK)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m_i = m_new
    return m_i, l_i


@triton.jit
def load_query_tile(q_ptr, bias_ptr, mask_ptr, H, L, NW, stride_b, stride_h, stride_l, D: tl.constexpr,
                    BLOCK_M: tl.constexpr):
    """This program's query rows: ``(base, offs_m, offs_d, valid_m, q [BM, D] int8, rowsum(q), bias_base,
    mask_base)`` for grid ``(cdiv(L, BLOCK_M), B * H)`` (``base`` the element offset of ``(b, h)``'s ``[L, D]``)."""
    pid_bh = tl.program_id(1)
    base = (pid_bh // H).to(tl.int64) * stride_b + (pid_bh % H).to(tl.int64) * stride_h
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    valid_m = offs_m < L
    q = tl.load(q_ptr + base + offs_m[:, None] * stride_l + offs_d[None, :], mask=valid_m[:, None], other=0)
    bias_base = bias_ptr + (pid_bh % H).to(tl.int64) * L * L
    mask_base = mask_ptr + ((pid_bh // H) % NW).to(tl.int64) * L * L
    return base, offs_m, offs_d, valid_m, q, tl.sum(q.to(tl.int32), axis=1), bias_base, mask_base


@triton.jit
def store_output(o, out_ptr, H, offs_m, offs_d, valid_m, stride_ob, stride_oh, stride_ol, r_ptr, shift_ptr,
                 rq_s_ptr, rq_z_ptr, D: tl.constexpr, HAS_R: tl.constexpr, HAS_SHIFT: tl.constexpr,
                 REQUANT: tl.constexpr, RQ_QMAX: tl.constexpr, RQ_OFFSET: tl.constexpr):
    """Store float32 ``o [BM, D]`` of this program's ``(b, h)``, or its requantized int8 codes (channel ``h*D + d``)."""
    pid_bh = tl.program_id(1)
    h = pid_bh % H
    ptrs = (out_ptr + (pid_bh // H).to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
            + offs_m[:, None] * stride_ol + offs_d[None, :])
    if REQUANT:
        o = rescale(o, r_ptr, shift_ptr, h * D + offs_d, offs_d < D, HAS_R, HAS_SHIFT)
        rs = tl.load(rq_s_ptr).to(tl.float32)
        rz = tl.load(rq_z_ptr).to(tl.float32)
        tl.store(ptrs, quantize_signed(o, rs, rz, RQ_QMAX, RQ_OFFSET), mask=valid_m[:, None])
    else:
        tl.store(ptrs, o, mask=valid_m[:, None])


@triton.jit
def quant_attention_kernel(q_ptr, k_ptr, v_ptr, out_ptr, bias_ptr, mask_ptr, zq_ptr, zk_ptr, zv_ptr, qk_scale_ptr,
                           sp_ptr, zp_ptr, pv_scale_ptr, r_ptr, shift_ptr, rq_s_ptr, rq_z_ptr, H, L, NW,
                           stride_b, stride_h, stride_l, stride_ob, stride_oh, stride_ol,
                           D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, P_QMAX: tl.constexpr,
                           P_OFFSET: tl.constexpr, HAS_R: tl.constexpr, HAS_SHIFT: tl.constexpr,
                           REQUANT: tl.constexpr, RQ_QMAX: tl.constexpr, RQ_OFFSET: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """int8 ``q, k, v`` views ``[B, H, L, D]`` -> ``out`` (float32 or requantized int8); grid
    ``(cdiv(L, BLOCK_M), B * H)``. ``zq, zk, zv`` are signed zero points, ``zp`` the rounded unsigned zero point
    of the P quantizer, ``rq_s, rq_z`` (rounded, unsigned) the requant quantizer."""
    base, offs_m, offs_d, valid_m, q, rowsum_q, bias_base, mask_base = load_query_tile(
        q_ptr, bias_ptr, mask_ptr, H, L, NW, stride_b, stride_h, stride_l, D, BLOCK_M)
    zq = tl.load(zq_ptr).to(tl.int32)
    zk = tl.load(zk_ptr).to(tl.int32)
    zv = tl.load(zv_ptr).to(tl.int32)
    qk_scale = tl.load(qk_scale_ptr)
    sp = tl.load(sp_ptr)
    zp = tl.load(zp_ptr)
    k_base = k_ptr + base
    v_base = v_ptr + base

    m_i, l_i = row_max_sum(q, rowsum_q, k_base, stride_l, bias_base, mask_base, offs_m, offs_d, L, zq, zk, qk_scale,
                           D, HAS_BIAS, HAS_MASK, BLOCK_M, BLOCK_N)
    rl_i = tl.math.div_rn(1.0, l_i)

    acc = tl.zeros((BLOCK_M, D), tl.int32)
    rowsum_p = tl.zeros((BLOCK_M,), tl.int32)
    colsum_v = tl.zeros((D,), tl.int32)
    zp_s = zp.to(tl.int32) - P_OFFSET
    for n0 in range(0, L, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid_n = offs_n < L
        s = _scores(q, rowsum_q, k_base, stride_l, bias_base, mask_base, offs_m, offs_n, offs_d, L, zq, zk, qk_scale,
                    D, HAS_BIAS, HAS_MASK)
        p = div_rcp(tl.exp(s - m_i[:, None]), l_i[:, None], rl_i[:, None])
        pc = quantize_signed(p, sp, zp, P_QMAX, P_OFFSET)
        pc = tl.where(valid_n[None, :], pc, 0).to(tl.int8)
        v = tl.load(v_base + offs_n[:, None] * stride_l + offs_d[None, :], mask=valid_n[:, None], other=0)
        acc += tl.dot(pc, v, out_dtype=tl.int32)
        rowsum_p += tl.sum(pc.to(tl.int32), axis=1)
        colsum_v += tl.sum(v.to(tl.int32), axis=0)
    acc = acc - zv * rowsum_p[:, None] - zp_s * colsum_v[None, :] + L * zp_s * zv
    o = acc.to(tl.float32) * tl.load(pv_scale_ptr)
    store_output(o, out_ptr, H, offs_m, offs_d, valid_m, stride_ob, stride_oh, stride_ol, r_ptr, shift_ptr,
                 rq_s_ptr, rq_z_ptr, D, HAS_R, HAS_SHIFT, REQUANT, RQ_QMAX, RQ_OFFSET)
