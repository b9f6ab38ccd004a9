"""Weight-tile loaders of the packed formats (:mod:`lowbit.packing`), one ``@triton.jit`` function per format with
one signature, passed to :func:`kernels.packed_gemm.packed_gemm_kernel` as ``LOAD_W``.

Each returns the int8 codes ``w [BLOCK_N, BLOCK_K]`` of rows ``offs_n`` and columns ``k0 .. k0 + BLOCK_K`` (zero
for ``n >= N`` and past the plane's bytes; codes in ``K .. K_pad`` are whatever the file holds, 0 by
:mod:`lowbit.packing`, and never matter: the GEMM zeroes the activations at ``k >= K``). The bytes are loaded as a ``[BLOCK_N, BLOCK_K / per_byte]`` tile (contiguous along
K), the codes of each byte extracted with shifts and interleaved back into K order with ``tl.join`` (in-thread), so
no per-code address arithmetic and no wide intermediate tile is ever formed.
"""
import triton
import triton.language as tl


@triton.jit
def _bytes(ptr, stride, offs_n, mask_n, k0, K, PER_BYTE: tl.constexpr, BLOCK_K: tl.constexpr):
    """uint8 ``[BN, BLOCK_K / PER_BYTE]`` of the plane's bytes covering ``k0 .. k0 + BLOCK_K``."""
    offs_b = k0 // PER_BYTE + tl.arange(0, BLOCK_K // PER_BYTE)
    kb = tl.cdiv(K, PER_BYTE)
    mask = mask_n[:, None] & (offs_b[None, :] < kb)
    return tl.load(ptr + offs_n[:, None] * stride + offs_b[None, :], mask=mask, other=0)


@triton.jit
def _interleave2(x0, x1):
    """``[R, C]`` pairs -> ``[R, 2C]`` with ``out[:, 2c + j] = xj[:, c]``."""
    return tl.reshape(tl.join(x0, x1), (x0.shape[0], 2 * x0.shape[1]))


@triton.jit
def load_2bit(w0_ptr, w1_ptr, stride_w0, stride_w1, offs_n, mask_n, k0, K, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """``2bit``: code ``k`` in bits ``2 (k % 4)`` of byte ``k // 4``; padding codes are 0 in the file."""
    b = _bytes(w0_ptr, stride_w0, offs_n, mask_n, k0, K, 4, BLOCK_K).to(tl.int8)
    w02 = _interleave2(b & 3, (b >> 4) & 3)
    w13 = _interleave2((b >> 2) & 3, (b >> 6) & 3)
    return _interleave2(w02, w13)


@triton.jit
def load_int4(w0_ptr, w1_ptr, stride_w0, stride_w1, offs_n, mask_n, k0, K, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """``int4``: code ``k`` in bits ``4 (k % 2)`` of byte ``k // 2``."""
    b = _bytes(w0_ptr, stride_w0, offs_n, mask_n, k0, K, 2, BLOCK_K).to(tl.int8)
    return _interleave2(b & 15, (b >> 4) & 15)


@triton.jit
def load_int3(w0_ptr, w1_ptr, stride_w0, stride_w1, offs_n, mask_n, k0, K, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """``int3``: ``lo`` plane in the ``2bit`` layout, ``hi`` bit of code ``k`` at bit ``k % 8`` of byte ``k // 8``."""
    lo = load_2bit(w0_ptr, w1_ptr, stride_w0, stride_w1, offs_n, mask_n, k0, K, BLOCK_N, BLOCK_K)
    h = _bytes(w1_ptr, stride_w1, offs_n, mask_n, k0, K, 8, BLOCK_K).to(tl.int8)
    h04 = _interleave2(h & 1, (h >> 4) & 1)
    h26 = _interleave2((h >> 2) & 1, (h >> 6) & 1)
    h15 = _interleave2((h >> 1) & 1, (h >> 5) & 1)
    h37 = _interleave2((h >> 3) & 1, (h >> 7) & 1)
    hi = _interleave2(_interleave2(h04, h26), _interleave2(h15, h37))
    return lo | (hi << 2)


@triton.jit
def load_int8(w0_ptr, w1_ptr, stride_w0, stride_w1, offs_n, mask_n, k0, K, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """``int8``: one signed code per byte."""
    return _bytes(w0_ptr, stride_w0, offs_n, mask_n, k0, K, 1, BLOCK_K)
