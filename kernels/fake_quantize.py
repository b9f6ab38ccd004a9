"""Fake-quant (quantize-dequantize) of ``x' = (x - shift) / r`` with its STE / LSQ backward.

Forward: ``x_hat = (clamp(round(x' / s) + zi, 0, qmax) - zi) * s``, ``zi = clamp(round(z), 0, qmax)``.
Backward (:func:`lowbit.primitives.lsq_grads`, then the chain rule through the rescale):
``g' = g * inside``; ``dx = g' / r``; ``dshift = -g' / r``; ``dr = -g' * (x' / r)``;
``ds = g * (inside ? round(x'/s) - x'/s : (below ? -zi : qmax - zi))``; ``dz = g * (inside ? 0 : -s) * live(z)``.
``s, z`` are per row (``stride_s = 1``: weights ``[N, 1]``) or per tensor (``stride_s = 0``).
"""
import triton
import triton.language as tl

from ._helpers import div_rcp, rcp_rn, rescale, rne, rne_small


@triton.jit
def _zero_point(z, QMAX: tl.constexpr):
    zr = rne(z)
    return tl.minimum(tl.maximum(zr, 0.0), QMAX), (zr >= 0.0) & (zr <= QMAX)


@triton.jit
def fake_quantize_fwd_kernel(x_ptr, out_ptr, r_ptr, shift_ptr, s_ptr, z_ptr, M, C, stride_xm, stride_s,
                             HAS_R: tl.constexpr, HAS_SHIFT: tl.constexpr, QMAX: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """``x [M, C]`` -> float32 ``out [M, C]`` (contiguous)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_m = offs_m < M
    mask_c = offs_c < C
    mask = mask_m[:, None] & mask_c[None, :]
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
    x = rescale(x, r_ptr, shift_ptr, offs_c, mask_c, HAS_R, HAS_SHIFT)
    s = tl.load(s_ptr + offs_m * stride_s, mask=mask_m, other=1.0).to(tl.float32)[:, None]
    zi, _ = _zero_point(tl.load(z_ptr + offs_m * stride_s, mask=mask_m, other=0.0).to(tl.float32)[:, None], QMAX)
    n = rne_small(tl.minimum(tl.maximum(div_rcp(x, s, rcp_rn(s)), -zi), QMAX - zi))
    tl.store(out_ptr + offs_m[:, None] * C + offs_c[None, :], n * s, mask=mask)


@triton.jit
def fake_quantize_bwd_kernel(x_ptr, g_ptr, r_ptr, shift_ptr, s_ptr, z_ptr, gx_ptr, gr_part_ptr, gsh_part_ptr,
                             gs_part_ptr, gz_part_ptr, M, C, stride_xm, stride_s,
                             HAS_R: tl.constexpr, HAS_SHIFT: tl.constexpr, QMAX: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """``gx [M, C]``; column partial sums ``gr_part, gsh_part [M / BLOCK_M, C]``; row partial sums
    ``gs_part, gz_part [M, C / BLOCK_C]`` (reduced by the caller)."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_m = offs_m < M
    mask_c = offs_c < C
    mask = mask_m[:, None] & mask_c[None, :]
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs_m[:, None] * C + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
    xr = rescale(x, r_ptr, shift_ptr, offs_c, mask_c, HAS_R, HAS_SHIFT)
    s = tl.load(s_ptr + offs_m * stride_s, mask=mask_m, other=1.0).to(tl.float32)[:, None]
    zi, live = _zero_point(tl.load(z_ptr + offs_m * stride_s, mask=mask_m, other=0.0).to(tl.float32)[:, None],
                           QMAX)
    xs = div_rcp(xr, s, rcp_rn(s))
    rr = rne_small(tl.minimum(tl.maximum(xs, -zi - 1.0), QMAX + 1.0 - zi))
    v = rr + zi
    below = v < 0.0
    inside = (v >= 0.0) & (v <= QMAX)
    gxr = tl.where(inside, g, 0.0)
    gs = g * tl.where(inside, rr - xs, tl.where(below, -zi, QMAX - zi))
    gz = tl.where(inside | (live == 0), 0.0, g * -s)
    gs = tl.where(mask, gs, 0.0)
    gz = tl.where(mask, gz, 0.0)
    n_cb = tl.num_programs(1)
    tl.store(gs_part_ptr + offs_m * n_cb + pid_c, tl.sum(gs, axis=1), mask=mask_m)
    tl.store(gz_part_ptr + offs_m * n_cb + pid_c, tl.sum(gz, axis=1), mask=mask_m)
    if HAS_R:
        r = tl.load(r_ptr + offs_c, mask=mask_c, other=1.0).to(tl.float32)[None, :]
        rcp_r = rcp_rn(r)
        gx = div_rcp(gxr, r, rcp_r)
        gr = -(gxr * div_rcp(xr, r, rcp_r))
        tl.store(gr_part_ptr + pid_m * C + offs_c, tl.sum(tl.where(mask, gr, 0.0), axis=0), mask=mask_c)
    else:
        gx = gxr
    if HAS_SHIFT:
        tl.store(gsh_part_ptr + pid_m * C + offs_c, tl.sum(tl.where(mask, -gx, 0.0), axis=0), mask=mask_c)
    gx = gx.to(gx_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
    tl.store(gx_ptr + offs_m[:, None] * C + offs_c[None, :], gx, mask=mask)
