"""Quantized attention on int8 codes, two passes over the keys (the ``[L, L]`` matrix is never stored).

Scores in base 2: ``S2 = log2(e) (qk_scale (q - zq)(k - zk)^T + rel_bias[h] + mask[b % nW])``, the integer part as
``q k^T + h1 1 k^T + h2 1 k^T`` (int8 dots, ``h1 + h2 = -zq``: no column sums of ``k`` on the ALU) ``- zk rowsum(q -
zq)`` (once per row). Pass 1 keeps the running row max ``m`` and ``l = sum 2^(S2 - m)``; pass 2 recomputes ``S2``
and forms the centred probability codes ``c = min(round(2^(S2 - m) / (l sp)), qmax - zp)`` (``code - zp`` of the
normalised ``P = softmax(S)``, equal to the reference's but at rounding ties; ``P >= 0`` makes the lower clamp
void), then ``O = pv_scale (c (v - zv))`` in int32:
``c V`` by int8 dots (``c`` itself when it fits int8, else the signed code ``c + zp - offset`` and two constant
dots adding ``(offset - zp) 1 V``), ``- zv rowsum(c)``. Key tiles run unmasked but the last partial one.

Layout: ``q, k, v`` are ``[B, H, L, D]`` views with one set of strides ``(stride_b, stride_h, stride_l, 1)``, e.g.
the three slices of a qkv GEMM's int8 output ``[B, L, 3, H, D]`` (no copies); ``out`` is written through its own
strides (``[B, H, L, D]`` or heads-last ``[B, L, H, D]``), as float32, or (``REQUANT``) as the int8 codes of the
next linear's input, ``quantize((O - shift[c]) / r[c])`` with channel ``c = h * D + d`` (:func:`store_output`).
"""
import triton
import triton.language as tl

from ._helpers import exp2, quantize_signed, rescale, round_int

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _scores(q, zq_h1, zq_h2, rc, k_base, stride_l, bias_base, mask_base, offs_m, offs_n, offs_d, L, c2,
            HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, MASK_N: tl.constexpr):
    """Base-2 scores ``S2 [BM, BN]`` for keys ``offs_n`` (``c2 = log2(e) qk_scale``, ``rc = -zk rowsum(q - zq)``);
    ``MASK_N``: keys ``>= L`` read as 0 and scored ``-inf``."""
    ptrs = k_base + offs_n[:, None] * stride_l + offs_d[None, :]
    if MASK_N:
        valid_n = offs_n < L
        k = tl.load(ptrs, mask=valid_n[:, None], other=0)
        lm = (offs_m[:, None] < L) & valid_n[None, :]
    else:
        k = tl.load(ptrs)
        lm = offs_m[:, None] < L
    kt = tl.trans(k)
    acc = tl.dot(zq_h1, kt, tl.dot(q, kt, out_dtype=tl.int32), out_dtype=tl.int32)
    acc = tl.dot(zq_h2, kt, acc, out_dtype=tl.int32) + rc[:, None]
    s = acc.to(tl.float32) * c2
    if HAS_BIAS:
        s = tl.fma(tl.load(bias_base + offs_m[:, None] * L + offs_n[None, :], mask=lm, other=0.0).to(tl.float32),
                   LOG2E, s)
    if HAS_MASK:
        s = tl.fma(tl.load(mask_base + offs_m[:, None] * L + offs_n[None, :], mask=lm, other=0.0).to(tl.float32),
                   LOG2E, s)
    if MASK_N:
        s = tl.where(valid_n[None, :], s, float("-inf"))
    return s


@triton.jit
def _max_sum(m_i, l_i, s, FAST_EXP: tl.constexpr):
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    l_i = l_i * exp2(m_i - m_new, FAST_EXP) + tl.sum(exp2(s - m_new[:, None], FAST_EXP), axis=1)
    return m_new, l_i


@triton.jit
def row_max_sum(q, zq_h1, zq_h2, rc, k_base, stride_l, bias_base, mask_base, offs_m, offs_d, L, c2,
                HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                FAST_EXP: tl.constexpr):
    """Pass 1: row max ``m`` of ``S2`` and ``l = sum 2^(S2 - m)`` over all keys."""
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    n_full = L - L % BLOCK_N
    for n0 in range(0, n_full, BLOCK_N):
        s = _scores(q, zq_h1, zq_h2, rc, k_base, stride_l, bias_base, mask_base, offs_m, n0 + tl.arange(0, BLOCK_N),
                    offs_d, L, c2, HAS_BIAS, HAS_MASK, False)
        m_i, l_i = _max_sum(m_i, l_i, s, FAST_EXP)
    if n_full < L:
        s = _scores(q, zq_h1, zq_h2, rc, k_base, stride_l, bias_base, mask_base, offs_m,
                    n_full + tl.arange(0, BLOCK_N), offs_d, L, c2, HAS_BIAS, HAS_MASK, True)
        m_i, l_i = _max_sum(m_i, l_i, s, FAST_EXP)
    return m_i, l_i


@triton.jit
def neg_halves(z, M: tl.constexpr, N: tl.constexpr):
    """Two ``[M, N]`` int8 tiles, constant ``h1`` and ``h2`` with ``h1 + h2 = -z`` for an int32 ``z`` in
    ``[-128, 127]`` (``-z`` may be 128, which int8 does not hold): dotted with an int8 tile ``x``, they add
    ``-z 1 x`` on the tensor cores."""
    h1 = (-z) >> 1
    return tl.full((M, N), h1, tl.int8), tl.full((M, N), -z - h1, tl.int8)


@triton.jit
def score_operands(q, rowsum_q, zq_ptr, zk_ptr, qk_scale_ptr, D: tl.constexpr, BLOCK_M: tl.constexpr):
    """``(zq_h1, zq_h2, rc, c2)`` of :func:`_scores`: :func:`neg_halves` of ``zq`` (``[BM, D]``),
    ``rc = -zk rowsum(q - zq)`` and ``c2 = log2(e) qk_scale``."""
    zq = tl.load(zq_ptr).to(tl.int32)
    zk = tl.load(zk_ptr).to(tl.int32)
    zq_h1, zq_h2 = neg_halves(zq, BLOCK_M, D)
    return zq_h1, zq_h2, zk * (D * zq - rowsum_q), tl.load(qk_scale_ptr) * LOG2E


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
def pv_tile(acc, rs, e, inv, v_base, stride_l, offs_n, offs_d, L, zp, zp_s, h1_t, h2_t,
            P_QMAX: tl.constexpr, MASK_N: tl.constexpr):
    """One key tile of the ``P V`` product from ``e = 2^(S2 - m)``: centred codes ``c = min(round(e inv), P_QMAX -
    zp)`` (``inv = 1 / (l sp)``), ``acc += c V``, ``rs += rowsum(c)``."""
    c = round_int(tl.minimum(e * inv[:, None], P_QMAX - zp))
    ptrs = v_base + offs_n[:, None] * stride_l + offs_d[None, :]
    if MASK_N:
        v = tl.load(ptrs, mask=(offs_n < L)[:, None], other=0)
    else:
        v = tl.load(ptrs)
    if P_QMAX <= 127:
        acc = tl.dot(c.to(tl.int8), v, acc, out_dtype=tl.int32)
    else:
        acc = tl.dot((c + zp_s).to(tl.int8), v, acc, out_dtype=tl.int32)
        acc = tl.dot(h1_t, v, acc, out_dtype=tl.int32)
        acc = tl.dot(h2_t, v, acc, out_dtype=tl.int32)
    return acc, rs + tl.sum(c, axis=1)


@triton.jit
def pv_operands(zp_ptr, sp_ptr, l_i, P_OFFSET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``(zp, zp_s, inv, h1_t, h2_t)`` of :func:`pv_tile`: the rounded unsigned and the signed P zero point,
    ``inv = 1 / (l sp)``, :func:`neg_halves` of ``zp_s``."""
    zp = tl.load(zp_ptr)
    inv = tl.math.div_rn(1.0, l_i * tl.load(sp_ptr))
    zp_s = zp.to(tl.int32) - P_OFFSET
    h1_t, h2_t = neg_halves(zp_s, BLOCK_M, BLOCK_N)
    return zp, zp_s, inv, h1_t, h2_t


@triton.jit
def pv_output(acc, rs, zv_ptr, pv_scale_ptr):
    """float32 ``O = pv_scale (acc - zv rowsum(c))``."""
    return (acc - tl.load(zv_ptr).to(tl.int32) * rs[:, None]).to(tl.float32) * tl.load(pv_scale_ptr)


@triton.jit
def quant_attention_kernel(q_ptr, k_ptr, v_ptr, out_ptr, bias_ptr, mask_ptr, zq_ptr, zk_ptr, zv_ptr, qk_scale_ptr,
                           sp_ptr, zp_ptr, pv_scale_ptr, r_ptr, shift_ptr, rq_s_ptr, rq_z_ptr, H, L, NW,
                           stride_b, stride_h, stride_l, stride_ob, stride_oh, stride_ol,
                           D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, P_QMAX: tl.constexpr,
                           P_OFFSET: tl.constexpr, HAS_R: tl.constexpr, HAS_SHIFT: tl.constexpr,
                           REQUANT: tl.constexpr, RQ_QMAX: tl.constexpr, RQ_OFFSET: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FAST_EXP: tl.constexpr):
    """int8 ``q, k, v`` views ``[B, H, L, D]`` -> ``out`` (float32 or requantized int8); grid
    ``(cdiv(L, BLOCK_M), B * H)``. ``zq, zk, zv`` are signed zero points, ``zp`` the rounded unsigned zero point
    of the P quantizer, ``rq_s, rq_z`` (rounded, unsigned) the requant quantizer."""
    base, offs_m, offs_d, valid_m, q, rowsum_q, bias_base, mask_base = load_query_tile(
        q_ptr, bias_ptr, mask_ptr, H, L, NW, stride_b, stride_h, stride_l, D, BLOCK_M)
    zq_h1, zq_h2, rc, c2 = score_operands(q, rowsum_q, zq_ptr, zk_ptr, qk_scale_ptr, D, BLOCK_M)
    k_base = k_ptr + base
    v_base = v_ptr + base

    m_i, l_i = row_max_sum(q, zq_h1, zq_h2, rc, k_base, stride_l, bias_base, mask_base, offs_m, offs_d, L, c2,
                           HAS_BIAS, HAS_MASK, BLOCK_M, BLOCK_N, FAST_EXP)
    zp, zp_s, inv, h1_t, h2_t = pv_operands(zp_ptr, sp_ptr, l_i, P_OFFSET, BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M, D), tl.int32)
    rs = tl.zeros((BLOCK_M,), tl.int32)
    n_full = L - L % BLOCK_N
    for n0 in range(0, n_full, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        s = _scores(q, zq_h1, zq_h2, rc, k_base, stride_l, bias_base, mask_base, offs_m, offs_n, offs_d, L, c2,
                    HAS_BIAS, HAS_MASK, False)
        acc, rs = pv_tile(acc, rs, exp2(s - m_i[:, None], FAST_EXP), inv, v_base, stride_l, offs_n, offs_d, L, zp,
                          zp_s, h1_t, h2_t, P_QMAX, False)
    if n_full < L:
        offs_n = n_full + tl.arange(0, BLOCK_N)
        s = _scores(q, zq_h1, zq_h2, rc, k_base, stride_l, bias_base, mask_base, offs_m, offs_n, offs_d, L, c2,
                    HAS_BIAS, HAS_MASK, True)
        acc, rs = pv_tile(acc, rs, exp2(s - m_i[:, None], FAST_EXP), inv, v_base, stride_l, offs_n, offs_d, L, zp,
                          zp_s, h1_t, h2_t, P_QMAX, True)
    o = pv_output(acc, rs, zv_ptr, pv_scale_ptr)
    store_output(o, out_ptr, H, offs_m, offs_d, valid_m, stride_ob, stride_oh, stride_ol, r_ptr, shift_ptr,
                 rq_s_ptr, rq_z_ptr, D, HAS_R, HAS_SHIFT, REQUANT, RQ_QMAX, RQ_OFFSET)
