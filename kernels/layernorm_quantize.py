"""LayerNorm fused with rescale-quantize: int8 codes of ``(LN(x) - shift) / r`` in one pass over each row, and
(``RESIDUAL``) the residual add before it: ``x_new = x + delta`` written back and normalised in the same pass.

Layout: a program takes ``BLOCK_M`` whole rows, each as ``CHUNKS`` column chunks of ``BLOCK_C`` (a power of two)
held in registers together, so the widths ``3 * 2^k`` of ViT, DeiT and Swin (96 ... 3072) need no padding
(``EVEN_C``: ``C = CHUNKS * BLOCK_C``, no column masks). The accesses take the row tile's own layout (16 contiguous
columns per thread: 16-byte int8 stores, 16-byte loads), the per-column vectors (affine, rescale) too: they are
loaded as ``[BLOCK_M, BLOCK_C]`` tiles of equal rows (L1 hits). Between threads move only the two row sums (warp
shuffles while a row spans at most 32 threads, ``BLOCK_C <= 512``), ``1 / r`` (computed once per column, then
exchanged through shared memory) and, in the residual kernel, ``x_new`` where its store is narrower than the codes'
(float32: 4 values per 16-byte store against 16 codes).
"""
import triton
import triton.language as tl

from ._helpers import div_rcp, quantize_signed, rcp_rn, rescale_values, sqrt_rn


@triton.jit
def round_bf16(v):
    """float32 ``v`` rounded to the nearest bfloat16 (ties to even), as a float32: integer arithmetic on its bits,
    equal to the hardware's ``cvt.rn.bf16.f32`` for finite values (the interpreter's float32 -> bfloat16 cast
    truncates)."""
    b = v.to(tl.int32, bitcast=True)
    b = b + (0x7FFF + ((b >> 16) & 1))
    return (b & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _tile(ptr, rows, cols, stride, mask_m, C, EVEN_C: tl.constexpr):
    """The ``[BM, BC]`` tile ``ptr[rows, cols]`` (0 outside ``M x C``), in its own dtype."""
    ptrs = ptr + rows[:, None] * stride + cols[None, :]
    if EVEN_C:
        return tl.load(ptrs, mask=mask_m[:, None], other=0.0)
    return tl.load(ptrs, mask=mask_m[:, None] & (cols < C)[None, :], other=0.0)


@triton.jit
def _store(ptr, rows, cols, stride, mask_m, C, v, EVEN_C: tl.constexpr):
    ptrs = ptr + rows[:, None] * stride + cols[None, :]
    if EVEN_C:
        tl.store(ptrs, v, mask=mask_m[:, None])
    else:
        tl.store(ptrs, v, mask=mask_m[:, None] & (cols < C)[None, :])


@triton.jit
def column_tile(ptr, rows, cols, C, other, EVEN_C: tl.constexpr):
    """The per-column vector ``ptr[cols]`` as a float32 ``[BM, BC]`` tile of equal rows (``other`` past ``C``):
    loaded in the row tile's layout, where a ``[BC]`` load would take another and a shared-memory exchange."""
    offs = rows[:, None] * 0 + cols[None, :]
    if EVEN_C:
        return tl.load(ptr + offs).to(tl.float32)
    return tl.load(ptr + offs, mask=offs < C, other=other).to(tl.float32)


@triton.jit
def layernorm_quantize_kernel(x_ptr, d_ptr, xn_ptr, out_ptr, lnw_ptr, lnb_ptr, r_ptr, shift_ptr, s_ptr, z_ptr, M, C,
                              eps, stride_xm, stride_dm, stride_nm, stride_om, HAS_LNW: tl.constexpr,
                              HAS_LNB: tl.constexpr, HAS_R: tl.constexpr, HAS_SHIFT: tl.constexpr,
                              RESIDUAL: tl.constexpr, QMAX: tl.constexpr, OFFSET: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, CHUNKS: tl.constexpr,
                              EVEN_C: tl.constexpr):
    """Rows of ``x [M, C]`` (``CHUNKS * BLOCK_C >= C``): ``(x - mean) / sqrt(var + eps) * w + b`` (biased var,
    float32; :func:`sqrt_rn`, the division by :func:`div_rcp`), then the formula of
    :func:`kernels.rescale_quantize.rescale_quantize_kernel`. ``RESIDUAL``: ``x`` is first ``x + delta`` (the
    float32 sum rounded to ``xn_ptr``'s dtype, ``x``'s: torch's ``(x + delta).to(x.dtype)``), stored to ``xn_ptr``.
    The row sums add the chunks element-wise, then reduce (their order is the layout's, as any ``tl.sum``'s)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_c = tl.arange(0, BLOCK_C)
    xs = ()
    for j in tl.static_range(CHUNKS):
        cols = j * BLOCK_C + offs_c
        x = _tile(x_ptr, offs_m, cols, stride_xm, mask_m, C, EVEN_C).to(tl.float32)
        if RESIDUAL:
            x = x + _tile(d_ptr, offs_m, cols, stride_dm, mask_m, C, EVEN_C).to(tl.float32)
            if xn_ptr.dtype.element_ty == tl.bfloat16:
                x = round_bf16(x)
            elif xn_ptr.dtype.element_ty == tl.float16:
                x = x.to(tl.float16).to(tl.float32)
            _store(xn_ptr, offs_m, cols, stride_nm, mask_m, C, x.to(xn_ptr.dtype.element_ty), EVEN_C)
        xs = xs + (x,)
    acc = xs[0]
    for j in tl.static_range(1, CHUNKS):
        acc = acc + xs[j]
    mean = tl.sum(acc, axis=1) / C
    xcs = ()
    for j in tl.static_range(CHUNKS):
        xc = xs[j] - mean[:, None]
        if not EVEN_C:
            xc = tl.where((j * BLOCK_C + offs_c < C)[None, :], xc, 0.0)
        xcs = xcs + (xc,)
    sq = xcs[0] * xcs[0]
    for j in tl.static_range(1, CHUNKS):
        sq = sq + xcs[j] * xcs[j]
    var = tl.sum(sq, axis=1) / C
    std = sqrt_rn(var + eps)
    rstd = rcp_rn(std)
    s = tl.load(s_ptr).to(tl.float32)
    z = tl.load(z_ptr).to(tl.float32)
    for j in tl.static_range(CHUNKS):
        cols = j * BLOCK_C + offs_c
        y = div_rcp(xcs[j], std[:, None], rstd[:, None])
        if HAS_LNW:
            y = y * column_tile(lnw_ptr, offs_m, cols, C, 0.0, EVEN_C)
        if HAS_LNB:
            y = y + column_tile(lnb_ptr, offs_m, cols, C, 0.0, EVEN_C)
        sh = 0.0
        r = 1.0
        rr = 1.0
        if HAS_SHIFT:
            sh = column_tile(shift_ptr, offs_m, cols, C, 0.0, EVEN_C)
        if HAS_R:
            r = column_tile(r_ptr, offs_m, cols, C, 1.0, EVEN_C)
            # 1 / r on a [BLOCK_C] vector (a few columns per thread, then one exchange through shared memory), not
            # on every element of the tile: 29 instead of 44 instructions per element at C = 768
            rr = rcp_rn(tl.load(r_ptr + cols, mask=cols < C, other=1.0).to(tl.float32))[None, :]
        y = rescale_values(y, sh, r, rr, HAS_R, HAS_SHIFT)
        _store(out_ptr, offs_m, cols, stride_om, mask_m, C, quantize_signed(y, s, z, QMAX, OFFSET), EVEN_C)
