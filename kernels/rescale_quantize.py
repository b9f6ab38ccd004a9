"""Fused rescale-quantize: int8 codes ``clamp(round(((x - shift) / r) / s) + z, 0, qmax) - offset``."""
import triton
import triton.language as tl

from ._helpers import quantize_signed, rescale


@triton.jit
def rescale_quantize_kernel(x_ptr, out_ptr, r_ptr, shift_ptr, s_ptr, z_ptr, M, C, stride_xm, stride_om,
                            HAS_R: tl.constexpr, HAS_SHIFT: tl.constexpr, QMAX: tl.constexpr,
                            OFFSET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """``x [M, C]`` (fp32/fp16/bf16, row stride ``stride_xm``) -> ``out [M, C]`` int8; ``z``: rounded zero point."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask = (offs_m[:, None] < M) & mask_c[None, :]
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
    x = rescale(x, r_ptr, shift_ptr, offs_c, mask_c, HAS_R, HAS_SHIFT)
    s = tl.load(s_ptr).to(tl.float32)
    z = tl.load(z_ptr).to(tl.float32)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_c[None, :], quantize_signed(x, s, z, QMAX, OFFSET),
             mask=mask)
