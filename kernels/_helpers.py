"""Shared ``@triton.jit`` helpers: rounding, the uniform quantizer, the rescale, GELU and the
integer-GEMM epilogue. Every formula is the one of :mod:`lowbit.primitives`, evaluated in the same float32 order."""
import triton
import triton.language as tl


@triton.jit
def rne(x):
    """Round half to even (``torch.round``); ``libdevice.rint`` is unavailable under the interpreter."""
    r = tl.floor(x + 0.5)
    tie = (r - x) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def rne_small(v):
    """``round(v)`` half to even for ``|v| <= 2^22``: float32 addition of ``1.5 * 2^23`` rounds ``v`` to an integer
    (two instructions; callers clamp ``v`` first)."""
    return (v + 12582912.0) - 12582912.0


@triton.jit
def round_int(v):
    """``round(v)`` half to even as int32 for ``|v| <= 2^22``, read from the low mantissa bits of ``v + 1.5 * 2^23``."""
    return (v + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000


@triton.jit
def rcp_rn(b):
    """``1 / b`` rounded to nearest (IEEE), from the approximate ``1.0 / b`` refined by :func:`rcp_refine`, without
    ``div.rn``'s slow-path subroutine (a ``CALL`` that makes ptxas 12.9 spill around it)."""
    return rcp_refine(b, 1.0 / b)


@triton.jit
def rcp_refine(b, y):
    """The float32 nearest ``1 / b`` from ``y`` within 64 ulps of it (``div.full.f32``: within 2^-22): one Newton
    step ``y + y (1 - b y)`` (then within an ulp), then ``y``'s neighbour on the side of ``1 / b`` when its exact
    residual ``1 - b y`` is smaller. Equal to IEEE ``1 / b`` for ``2^-125 <= |b| <= 2^125`` (every float32 mantissa
    checked, ``tests/kernels/test_triton_helpers.py``)."""
    y = tl.fma(tl.fma(-b, y, 1.0), y, y)
    r = tl.fma(-b, y, 1.0)
    n = (y.to(tl.int32, bitcast=True) + tl.where(r > 0, 1, -1)).to(tl.float32, bitcast=True)
    return tl.where(tl.abs(tl.fma(-b, n, 1.0)) < tl.abs(r), n, y)


@triton.jit
def sqrt_rn(a):
    """``sqrt(a)`` rounded to nearest (IEEE: ``tl.sqrt_rn``, torch's CUDA sqrt) without ``sqrt.rn``'s slow-path
    subroutine (a ``CALL`` around which ptxas 12.9 spills a LayerNorm tile's registers): the fast path ptxas itself
    emits for ``sqrt.rn`` on ``[2^-101, 2^128)``, ``s = a r``, then ``s + (a - s^2) (r / 2)`` by two FMAs from
    ``r = rsqrt.approx(a)`` (``MUFU.RSQ``); ``a < 2^-100`` (denormals too) scaled by ``2^100`` first and the root by
    ``2^-50`` after (both exact); ``0`` and ``+inf`` returned as they are (negative ``a`` and NaN give NaN)."""
    small = a < 7.888609052210118e-31
    b = tl.where(small, a * 1.2676506002282294e30, a)
    r = tl.math.rsqrt(b)
    s = b * r
    y = tl.fma(tl.fma(-s, s, b), r * 0.5, s)
    y = tl.where(small, y * 8.881784197001252e-16, y)
    return tl.where((a + a == a) & (a >= 0.0), a, y)


@triton.jit
def div_rcp(a, b, rb):
    """``a / b`` rounded to nearest from ``rb = 1 / b`` (rounded to nearest, computed once per row, column or
    tensor): ``q0 = a rb``, then Markstein's correction ``q0 + (a - q0 b) rb`` by two FMAs. Equal to IEEE division
    for ``|a| >= 2^-100`` (the residual ``a - q0 b`` is then exact), within an ulp below; three instructions per
    element where ``div_rn`` takes ten (reciprocal, range check and a branch each time); ``rb`` from :func:`rcp_rn`."""
    q0 = a * rb
    return tl.fma(tl.fma(-q0, b, a), rb, q0)


@triton.jit
def exp2(x, FAST_EXP: tl.constexpr):
    """``2^x``. ``FAST_EXP`` (compiled): one ``ex2.approx.ftz.f32``, results below ``2^-126`` flushed to 0, where
    ``tl.math.exp2`` becomes ptxas's non-ftz sequence (a range test and two predicated multiplies around the same
    ``MUFU.EX2``); the interpreter runs no PTX and takes ``tl.math.exp2``."""
    if FAST_EXP:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        return tl.math.exp2(x)


@triton.jit
def quantize_signed(x, s, zr, QMAX: tl.constexpr, OFFSET: tl.constexpr):
    """Signed int8 codes ``clamp(round(x / s) + zr, 0, QMAX) - OFFSET`` (``zr``: the rounded zero point, an integer
    in ``[0, QMAX]``), computed as ``round(clamp(x / s, -zr, QMAX - zr)) + zr - OFFSET`` (equal, the bounds being
    integers), rounded by :func:`round_int`."""
    return quantize_int32(x, s, zr, QMAX, OFFSET).to(tl.int8)


@triton.jit
def quantize_int32(x, s, zr, QMAX: tl.constexpr, OFFSET: tl.constexpr):
    """:func:`quantize_signed` kept in int32 (grids of more than 256 levels)."""
    v = tl.minimum(tl.maximum(div_rcp(x, s, rcp_rn(s)), -zr), QMAX - zr)
    return round_int(v) + (zr.to(tl.int32) - OFFSET)


@triton.jit
def rescale(x, r_ptr, shift_ptr, offs_c, mask_c, HAS_R: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """``(x - shift[c]) / r[c]`` on a ``[BM, BC]`` float32 tile: :func:`rescale_values` of the loaded vectors."""
    sh, r, rr = load_rescale(r_ptr, shift_ptr, offs_c, mask_c, HAS_R, HAS_SHIFT)
    return rescale_values(x, sh, r, rr, HAS_R, HAS_SHIFT)


@triton.jit
def load_rescale(r_ptr, shift_ptr, offs_c, mask_c, HAS_R: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """:func:`rescale_values`' ``(sh, r, rr)``: ``shift[c]``, ``r[c]`` and ``rcp_rn(r[c])`` as ``[1, BC]`` float32
    rows (``0, 1, 1`` where absent), loaded once per column block."""
    sh = 0.0
    r = 1.0
    rr = 1.0
    if HAS_SHIFT:
        sh = tl.load(shift_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    if HAS_R:
        rv = tl.load(r_ptr + offs_c, mask=mask_c, other=1.0).to(tl.float32)
        r = rv[None, :]
        rr = rcp_rn(rv)[None, :]
    return sh, r, rr


@triton.jit
def rescale_values(x, sh, r, rr, HAS_R: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """:func:`rescale`'s ``(x - sh) / r`` from values already loaded (float32, broadcastable to ``x``), with
    ``rr = rcp_rn(r)``: kernels that load the per-column vectors once for many rows."""
    if HAS_SHIFT:
        x = x - sh
    if HAS_R:
        x = div_rcp(x, r, rr)
    return x


@triton.jit
def gelu_erf(y):
    """Exact GELU ``y / 2 * (1 + erf(y / sqrt(2)))``."""
    return 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))


@triton.jit
def tile_coords(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)`` of output tile number ``tile``: row tiles taken ``GROUP_M`` at a time down each column of
    tiles, so the programs in flight share weight tiles in L2."""
    grid_m = tl.cdiv(M, BLOCK_M)
    width = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (tile // width) * GROUP_M
    group_m = tl.minimum(grid_m - first_m, GROUP_M)
    return first_m + (tile % width) % group_m, (tile % width) // group_m


@triton.jit
def gemm_epilogue(acc, rowsum, offs_m, offs_n, M, N, K, out_ptr, stride_om, colsum_ptr, sa_ptr, za_ptr,
                  sw_ptr, zw_ptr, bias_ptr, rq_s_ptr, rq_z_ptr, res_ptr, stride_rm,
                  HAS_BIAS: tl.constexpr, GELU: tl.constexpr, REQUANT: tl.constexpr,
                  RQ_QMAX: tl.constexpr, RQ_OFFSET: tl.constexpr, RQ_PER_COL: tl.constexpr,
                  W_CENTERED: tl.constexpr, HAS_RES: tl.constexpr):
    """Zero-point algebra of ``lowbit.primitives.int_gemm``, scales, bias, GELU; store float or requantized codes.

    ``y = (sa * sw[n]) * (acc - zw[n] rowsum[m] - za colsum[n] + K za zw[n]) + bias[n]``, without the rowsum term
    when ``W_CENTERED`` (``acc`` then sums ``a (w - zw)``); the requant quantizer is per tensor, or per output column
    (``RQ_PER_COL``: e.g. the Q, K and V quantizers of a qkv projection). ``HAS_RES`` (float output): stores
    ``res[m, n] + y``, ``y`` first rounded to the output dtype, the sum in float32: torch's ``res + y``.
    """
    mask_n = offs_n < N
    za = tl.load(za_ptr).to(tl.int32)
    sa = tl.load(sa_ptr).to(tl.float32)
    zw = tl.load(zw_ptr + offs_n, mask=mask_n, other=0).to(tl.int32)
    colsum = tl.load(colsum_ptr + offs_n, mask=mask_n, other=0)
    sw = tl.load(sw_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if not W_CENTERED:
        acc = acc - zw[None, :] * rowsum[:, None]
    acc = acc - za * colsum[None, :] + (K * za) * zw[None, :]
    y = acc.to(tl.float32) * (sa * sw)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if GELU:
        y = gelu_erf(y)
    out_mask = (offs_m[:, None] < M) & mask_n[None, :]
    ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    if REQUANT:
        if RQ_PER_COL:
            rs = tl.load(rq_s_ptr + offs_n, mask=mask_n, other=1.0).to(tl.float32)[None, :]
            rz = tl.load(rq_z_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        else:
            rs = tl.load(rq_s_ptr).to(tl.float32)
            rz = tl.load(rq_z_ptr).to(tl.float32)
        tl.store(ptrs, quantize_signed(y, rs, rz, RQ_QMAX, RQ_OFFSET), mask=out_mask)
    else:
        y = y.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
        if HAS_RES:
            res = tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=out_mask, other=0.0)
            y = (y.to(tl.float32) + res.to(tl.float32)).to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
        tl.store(ptrs, y, mask=out_mask)
