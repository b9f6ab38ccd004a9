"""Packed GEMM W3A*: ``int3`` planes (2-bit ``lo`` + 1-bit ``hi``).

``out[m, n] = epilogue(sum_k a[m, k] * w[n, k])`` with int8 activation codes ``a [M, K]``, the weight codes
unpacked in registers to int8, ``tl.dot`` int32 accumulation, and the zero-point / scale / bias / GELU /
requant epilogue of :func:`kernels._helpers.gemm_epilogue` (``colsum`` of the stored weight codes precomputed).
"""
import triton
import triton.language as tl

from ._helpers import gemm_epilogue, load_act_tile, unpack_int3_t


@triton.jit
def gemm_int3_kernel(a_ptr, lo_ptr, hi_ptr, out_ptr, colsum_ptr, sa_ptr, za_ptr, sw_ptr, zw_ptr,
                     bias_ptr, rq_s_ptr, rq_z_ptr, M, N, K, stride_am, stride_lo, stride_hi, stride_om,
                     HAS_BIAS: tl.constexpr, GELU: tl.constexpr, REQUANT: tl.constexpr, RQ_QMAX: tl.constexpr,
                     RQ_OFFSET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    rowsum = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = load_act_tile(a_ptr, offs_m, offs_k, stride_am, M, K)
        wmask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
        w = unpack_int3_t(lo_ptr, hi_ptr, offs_k, offs_n, stride_lo, stride_hi, wmask)
        acc += tl.dot(a, w.to(tl.int8), out_dtype=tl.int32)
        rowsum += tl.sum(a.to(tl.int32), axis=1)
    gemm_epilogue(acc, rowsum, offs_m, offs_n, M, N, K, out_ptr, stride_om, colsum_ptr, sa_ptr, za_ptr,
                  sw_ptr, zw_ptr, bias_ptr, rq_s_ptr, rq_z_ptr, HAS_BIAS, GELU, REQUANT, RQ_QMAX, RQ_OFFSET)
