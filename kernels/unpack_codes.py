"""Unpack a packed weight into centred int8 codes: ``out[n, k] = LOAD_W(planes)[n, k] - zw[n]`` for ``n < N, k < K``.

``LOAD_W`` is the format's tile loader of :mod:`kernels.unpack` (the one the packed GEMM calls), so the codes are
exactly those the fused GEMM multiplies, less the integer zero point ``zw`` (int32 ``[N]``; ``|w - zw| <= 15`` for
the packed formats, so int8 holds it). ``out [N, K]`` int8 (row stride ``stride_o``) then goes through the same
GEMM body with :func:`kernels.unpack.load_int8` and ``W_CENTERED`` (no activation row sums in its main loop).
Used where the GEMM is compute-bound (many rows: the weight tile is reused by every row tile, and unpacking in the
main loop starves the tensor cores; see :data:`kernels.configs.UNPACK_MIN_M`).
Grid: ``(cdiv(N, BLOCK_N), cdiv(K, BLOCK_K))``.
"""
import triton
import triton.language as tl


@triton.jit
def unpack_codes_kernel(w0_ptr, w1_ptr, zw_ptr, out_ptr, N, K, stride_w0, stride_w1, stride_o, LOAD_W: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    w = LOAD_W(w0_ptr, w1_ptr, stride_w0, stride_w1, offs_n, mask_n, k0, K, BLOCK_N, BLOCK_K)
    w = w - tl.load(zw_ptr + offs_n, mask=mask_n, other=0).to(tl.int8)[:, None]
    tl.store(out_ptr + offs_n[:, None] * stride_o + offs_k[None, :], w, mask=mask_n[:, None] & (offs_k[None, :] < K))
