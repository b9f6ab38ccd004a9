"""Packed-weight GEMM, one body for every weight format: ``out[m, n] = epilogue(sum_k a[m, k] * w[n, k])``.

``a [M, K]`` int8 activation codes; the weight is stored as byte planes ``[N, K_pad / per_byte]`` (layouts in
:mod:`lowbit.packing`). ``LOAD_W`` is the format's tile loader, a ``@triton.jit`` function passed as a constexpr
(:mod:`kernels.unpack`): it reads the packed bytes of a ``[BLOCK_N, BLOCK_K]`` tile and returns the int8 codes,
unpacked in registers with shifts and in-thread joins. The tile is transposed (K-major, as the tensor cores take
8-bit operands) into ``tl.dot`` with int32 accumulation; the zero-point / scale / bias / GELU / requant / residual epilogue is
:func:`kernels._helpers.gemm_epilogue` (``colsum`` of the stored weight codes precomputed). ``W_CENTERED``: the
loader's codes are already ``w - zw[n]`` (:mod:`kernels.unpack_codes` writes them so), so the ``zw rowsum(a)`` term
vanishes and the main loop never reduces the activation tile (on sm_90 that reduction was about half of the loop's
instructions: byte permutes, adds and shuffles beside four ``IGMMA``).
Grid: ``(cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),)``, row tiles grouped by ``GROUP_M`` for L2 reuse of the weight.
"""
import triton
import triton.language as tl

from ._helpers import gemm_epilogue, tile_coords


@triton.jit
def packed_gemm_kernel(a_ptr, w0_ptr, w1_ptr, out_ptr, colsum_ptr, sa_ptr, za_ptr, sw_ptr, zw_ptr,
                       bias_ptr, rq_s_ptr, rq_z_ptr, res_ptr, M, N, K, stride_am, stride_w0, stride_w1, stride_om,
                       stride_rm, LOAD_W: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
                       REQUANT: tl.constexpr, RQ_QMAX: tl.constexpr, RQ_OFFSET: tl.constexpr,
                       RQ_PER_COL: tl.constexpr, W_CENTERED: tl.constexpr, HAS_RES: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    rowsum = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :],
                    mask=mask_m[:, None] & (offs_k[None, :] < K), other=0)
        w = LOAD_W(w0_ptr, w1_ptr, stride_w0, stride_w1, offs_n, mask_n, k0, K, BLOCK_N, BLOCK_K)
        acc += tl.dot(a, tl.trans(w), out_dtype=tl.int32)
        if not W_CENTERED:
            rowsum += tl.sum(a.to(tl.int32), axis=1)
    gemm_epilogue(acc, rowsum, offs_m, offs_n, M, N, K, out_ptr, stride_om, colsum_ptr, sa_ptr, za_ptr,
                  sw_ptr, zw_ptr, bias_ptr, rq_s_ptr, rq_z_ptr, res_ptr, stride_rm, HAS_BIAS, GELU, REQUANT, RQ_QMAX,
                  RQ_OFFSET, RQ_PER_COL, W_CENTERED, HAS_RES)
