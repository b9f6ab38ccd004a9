"""LayerNorm fused with rescale-quantize: int8 codes of ``(LN(x) - shift) / r`` in one pass over each row."""
import triton
import triton.language as tl

from ._helpers import div_rcp, quantize_signed, rcp_rn, rescale


@triton.jit
def layernorm_quantize_kernel(x_ptr, out_ptr, lnw_ptr, lnb_ptr, r_ptr, shift_ptr, s_ptr, z_ptr, M, C, eps,
                              stride_xm, stride_om, HAS_LNW: tl.constexpr, HAS_LNB: tl.constexpr,
                              HAS_R: tl.constexpr, HAS_SHIFT: tl.constexpr, QMAX: tl.constexpr,
                              OFFSET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Rows of ``x [M, C]`` (``BLOCK_C >= C``): ``(x - mean) / sqrt(var + eps) * w + b`` (biased var, float32),
    then :func:`kernels.rescale_quantize.rescale_quantize_kernel`'s formula."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask = (offs_m[:, None] < M) & mask_c[None, :]
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / C
    std = tl.sqrt_rn(var + eps)
    y = div_rcp(xc, std[:, None], rcp_rn(std)[:, None])
    if HAS_LNW:
        y = y * tl.load(lnw_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    if HAS_LNB:
        y = y + tl.load(lnb_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    y = rescale(y, r_ptr, shift_ptr, offs_c, mask_c, HAS_R, HAS_SHIFT)
    s = tl.load(s_ptr).to(tl.float32)
    z = tl.load(z_ptr).to(tl.float32)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_c[None, :], quantize_signed(y, s, z, QMAX, OFFSET),
             mask=mask)
