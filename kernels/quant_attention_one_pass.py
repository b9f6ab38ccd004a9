"""Quantized attention in one pass over the keys, for sequences whose keys fit one tile (``L <= BLOCK_N``, at most
256: ViT / DeiT at 224 px with 197 tokens, Swin's 49-token windows).

The two-pass kernels (:mod:`kernels.quant_attention`, :mod:`kernels.quant_attention_sulq`) compute the scores twice:
once for the row max ``m`` and sum ``l``, once more for the probability codes, because ``P = softmax(S)`` must be
normalised before it is quantized. When a whole key row is one ``[BLOCK_M, BLOCK_N]`` tile, the scores ``S2``
(base 2, :func:`kernels.quant_attention._scores`) are formed once, ``m = max S2`` and ``l = sum 2^(S2 - m)`` are
exact in registers, and the exponentials ``e = 2^(S2 - m)`` serve both ``l`` and the codes:

* uniform ``P``: ``c = min(round(e / (l sp)), qmax - zp)``, ``O = pv_scale (c V - zv rowsum(c))`` in int32
  (:func:`kernels.quant_attention.pv_tile`);
* SULQ ``P``: ``p = e / l``, its codes and table levels, ``O = sv P_hat (v - zv)``
  (:func:`kernels.quant_attention_sulq.sulq_pv_tile`).

Keys past ``L`` score ``-inf`` (``e = 0``, code 0). The same layouts, zero points and output (float32 or the next
linear's requantized int8 codes) as the two-pass kernels; one ``Q K^T`` and one ``P V`` per program.
"""
import triton
import triton.language as tl

from ._helpers import exp2
from .quant_attention import (
    _scores,
    load_query_tile,
    pv_operands,
    pv_output,
    pv_tile,
    score_operands,
    store_output,
)
from .quant_attention_sulq import sulq_pv_tile


@triton.jit
def whole_row(q_ptr, k_ptr, bias_ptr, mask_ptr, zq_ptr, zk_ptr, qk_scale_ptr, H, L, NW, stride_b, stride_h,
              stride_l, D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, FAST_EXP: tl.constexpr):
    """This program's query rows against every key: ``(base, offs_m, offs_d, valid_m, offs_n, e [BM, BN], l [BM])``
    with ``e = 2^(S2 - max S2)`` and ``l`` its row sums."""
    base, offs_m, offs_d, valid_m, q, rowsum_q, bias_base, mask_base = load_query_tile(
        q_ptr, bias_ptr, mask_ptr, H, L, NW, stride_b, stride_h, stride_l, D, BLOCK_M)
    zq_h1, zq_h2, rc, c2 = score_operands(q, rowsum_q, zq_ptr, zk_ptr, qk_scale_ptr, D, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    s = _scores(q, zq_h1, zq_h2, rc, k_ptr + base, stride_l, bias_base, mask_base, offs_m, offs_n, offs_d, L, c2,
                HAS_BIAS, HAS_MASK, True)
    e = exp2(s - tl.max(s, axis=1)[:, None], FAST_EXP)
    return base, offs_m, offs_d, valid_m, offs_n, e, tl.sum(e, axis=1)


@triton.jit
def quant_attention_one_pass_kernel(q_ptr, k_ptr, v_ptr, out_ptr, bias_ptr, mask_ptr, zq_ptr, zk_ptr, zv_ptr,
                                    qk_scale_ptr, sp_ptr, zp_ptr, pv_scale_ptr, r_ptr, shift_ptr, rq_s_ptr, rq_z_ptr,
                                    H, L, NW, stride_b, stride_h, stride_l, stride_ob, stride_oh, stride_ol,
                                    D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
                                    P_QMAX: tl.constexpr, P_OFFSET: tl.constexpr, HAS_R: tl.constexpr,
                                    HAS_SHIFT: tl.constexpr, REQUANT: tl.constexpr, RQ_QMAX: tl.constexpr,
                                    RQ_OFFSET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                    FAST_EXP: tl.constexpr):
    """:func:`kernels.quant_attention.quant_attention_kernel`'s arguments and output, ``L <= BLOCK_N``; grid
    ``(cdiv(L, BLOCK_M), B * H)``."""
    base, offs_m, offs_d, valid_m, offs_n, e, l_i = whole_row(
        q_ptr, k_ptr, bias_ptr, mask_ptr, zq_ptr, zk_ptr, qk_scale_ptr, H, L, NW, stride_b, stride_h, stride_l, D,
        HAS_BIAS, HAS_MASK, BLOCK_M, BLOCK_N, FAST_EXP)
    zp, zp_s, inv, h1_t, h2_t = pv_operands(zp_ptr, sp_ptr, l_i, P_OFFSET, BLOCK_M, BLOCK_N)
    acc, rs = pv_tile(tl.zeros((BLOCK_M, D), tl.int32), tl.zeros((BLOCK_M,), tl.int32), e, inv, v_ptr + base,
                      stride_l, offs_n, offs_d, L, zp, zp_s, h1_t, h2_t, P_QMAX, True)
    store_output(pv_output(acc, rs, zv_ptr, pv_scale_ptr), out_ptr, H, offs_m, offs_d, valid_m, stride_ob,
                 stride_oh, stride_ol, r_ptr, shift_ptr, rq_s_ptr, rq_z_ptr, D, HAS_R, HAS_SHIFT, REQUANT, RQ_QMAX,
                 RQ_OFFSET)


@triton.jit
def quant_attention_sulq_one_pass_kernel(q_ptr, k_ptr, v_ptr, out_ptr, bias_ptr, mask_ptr, zq_ptr, zk_ptr, zv_ptr,
                                         qk_scale_ptr, eta_ptr, x0_ptr, sp_ptr, zp_ptr, table_ptr, sv_ptr, r_ptr,
                                         shift_ptr, rq_s_ptr, rq_z_ptr, H, L, NW, stride_b, stride_h, stride_l,
                                         stride_ob, stride_oh, stride_ol, D: tl.constexpr, HAS_BIAS: tl.constexpr,
                                         HAS_MASK: tl.constexpr, P_QMAX: tl.constexpr, P_OFFSET: tl.constexpr,
                                         HAS_R: tl.constexpr, HAS_SHIFT: tl.constexpr, REQUANT: tl.constexpr,
                                         RQ_QMAX: tl.constexpr, RQ_OFFSET: tl.constexpr, BLOCK_M: tl.constexpr,
                                         BLOCK_N: tl.constexpr, FAST_EXP: tl.constexpr):
    """:func:`kernels.quant_attention_sulq.quant_attention_sulq_kernel`'s arguments and output, ``L <= BLOCK_N``."""
    base, offs_m, offs_d, valid_m, offs_n, e, l_i = whole_row(
        q_ptr, k_ptr, bias_ptr, mask_ptr, zq_ptr, zk_ptr, qk_scale_ptr, H, L, NW, stride_b, stride_h, stride_l, D,
        HAS_BIAS, HAS_MASK, BLOCK_M, BLOCK_N, FAST_EXP)
    p = tl.math.div_rn(e, l_i[:, None])
    acc = sulq_pv_tile(tl.zeros((BLOCK_M, D), tl.float32), p, tl.load(eta_ptr), tl.load(x0_ptr), tl.load(sp_ptr),
                       tl.load(zp_ptr), table_ptr, tl.load(zv_ptr), v_ptr + base, stride_l, offs_n, offs_d, L,
                       P_QMAX, P_OFFSET)
    store_output(acc * tl.load(sv_ptr), out_ptr, H, offs_m, offs_d, valid_m, stride_ob, stride_oh, stride_ol, r_ptr,
                 shift_ptr, rq_s_ptr, rq_z_ptr, D, HAS_R, HAS_SHIFT, REQUANT, RQ_QMAX, RQ_OFFSET)
