"""Fused rescale-quantize: int8 codes ``clamp(round(((x - shift) / r) / s) + z, 0, qmax) - offset``.

Layout: program ``(i, j)`` takes the columns ``[j BLOCK_C, (j + 1) BLOCK_C)`` and the row tiles ``i, i + G, i + 2G,
...`` (``G`` programs along the rows: a persistent grid of a few programs per SM), ``BLOCK_M x BLOCK_C`` each, 16
contiguous columns per thread (16-byte int8 stores, 16-byte loads). ``shift``, ``r`` and ``1 / r`` are loaded and
computed once per program, before the row loop.
"""
import triton
import triton.language as tl

from ._helpers import load_rescale, quantize_signed, rescale_values


@triton.jit
def rescale_quantize_kernel(x_ptr, out_ptr, r_ptr, shift_ptr, s_ptr, z_ptr, M, C, stride_xm, stride_om,
                            HAS_R: tl.constexpr, HAS_SHIFT: tl.constexpr, QMAX: tl.constexpr,
                            OFFSET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                            EVEN_C: tl.constexpr, STAGES: tl.constexpr):
    """``x [M, C]`` (fp32/fp16/bf16, row stride ``stride_xm``) -> ``out [M, C]`` int8; ``z``: rounded zero point;
    ``EVEN_C``: ``C`` is a multiple of ``BLOCK_C`` (no column masks); ``STAGES > 1``: the row loop is software
    pipelined, the next ``STAGES - 1`` tiles copied to shared memory (``cp.async``) while one is quantized."""
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    sh, r, rr = load_rescale(r_ptr, shift_ptr, offs_c, mask_c, HAS_R, HAS_SHIFT)
    s = tl.load(s_ptr).to(tl.float32)
    z = tl.load(z_ptr).to(tl.float32)
    for tile in tl.range(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.num_programs(0), num_stages=STAGES):
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        if EVEN_C:
            mask = (offs_m < M)[:, None]
        else:
            mask = (offs_m < M)[:, None] & mask_c[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
        x = rescale_values(x, sh, r, rr, HAS_R, HAS_SHIFT)
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_c[None, :], quantize_signed(x, s, z, QMAX, OFFSET),
                 mask=mask)
