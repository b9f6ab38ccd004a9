"""``torch.library`` registration (namespace ``lowbit``) of the Triton kernels: launchers plus fake (meta) impls,
so ``torch.compile`` traces through them. Quantizer parameters travel as tensors (no host sync): ``s`` float32,
zero points already rounded (``zr``: unsigned, ``z*_s``: signed storage form), ``bits`` as a float (1.58 = ternary).
Call these through :mod:`kernels.ops`, which validates inputs and prepares the parameters.
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch
import triton
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from lowbit import primitives as P

from . import configs as C
from . import unpack
from .configs import Target
from .fake_quantize import fake_quantize_bwd_kernel, fake_quantize_fwd_kernel
from .int8_gemm_tma import int8_gemm_tma_kernel
from .keep import kept
from .launch import Launch
from .layernorm_quantize import layernorm_quantize_kernel
from .packed_gemm import packed_gemm_kernel
from .quant_attention import quant_attention_kernel
from .quant_attention_one_pass import quant_attention_one_pass_kernel, quant_attention_sulq_one_pass_kernel
from .quant_attention_sulq import quant_attention_sulq_kernel
from .rescale_quantize import rescale_quantize_kernel
from .unpack_codes import unpack_codes_kernel


class LowbitOp:
    """A kernel entry point registered as ``torch.ops.lowbit.<name>`` (``.op``, what ``torch.compile`` traces and
    ``torch.library.opcheck`` checks) whose eager calls on plain tensors run the Python body directly: the
    ``torch.library`` dispatch (autograd fallthrough, redispatch, alias checks) costs more host time per call than
    building the launch, and the exported models make ~200 such calls per forward."""

    def __init__(self, name: str, fn):
        self.fn, self.qualname = fn, f"lowbit::{name}"
        self.op = torch.library.custom_op(self.qualname, mutates_args=())(fn)
        self.__doc__, self.__name__ = fn.__doc__, fn.__name__

    def register_fake(self, fake):
        return self.op.register_fake(fake)

    def __call__(self, *args):
        if torch.compiler.is_compiling() or type(args[0]) is not torch.Tensor:
            return self.op(*args)
        if torch._C._autograd._profiler_enabled():  # keep the op's name in profiles
            with torch.profiler.record_function(self.qualname):
                return self.fn(*args)
        return self.fn(*args)


def lowbit_op(name: str):
    """Decorator: ``fn`` as a :class:`LowbitOp` named ``lowbit::<name>``."""
    return lambda fn: LowbitOp(name, fn)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _store_dtype(dt: torch.dtype) -> torch.dtype:
    """The interpreter truncates fp32 -> bf16; there the kernel stores fp32 and torch rounds to nearest."""
    return torch.float32 if dt == torch.bfloat16 and _interpreted() else dt


_DUMMIES = {}


def _dummy(t: Tensor) -> Tensor:
    """A one-element float32 placeholder for an absent pointer argument (one per device, never read)."""
    d = _DUMMIES.get(t.device)
    if d is None:
        d = _DUMMIES[t.device] = torch.empty(1, dtype=torch.float32, device=t.device)
    return d


def _opt(t: Optional[Tensor], like: Tensor) -> Tensor:
    return t if t is not None else _dummy(like)


def _rows(x: Tensor) -> Tensor:
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


# ---------------------------------------------------------------------------------------------- quantize


def rescale_quantize_launch(x2: Tensor, out: Tensor, r: Optional[Tensor], shift: Optional[Tensor], s: Tensor,
                            zr: Tensor, bits: float, target: Target,
                            config: Optional[Tuple[int, ...]] = None) -> Launch:
    """``config``: ``(BLOCK_M, BLOCK_C, num_warps, STAGES, persistent)`` in place of
    :func:`kernels.configs.quantize_blocks`'s (``bench.gpu`` times others beside it; ``persistent=False``: one
    program per row tile, the former layout being ``(8, 256, 4, 1, False)`` at C = 768)."""
    m, c = x2.shape
    bm, bc, rows, stages, opts = C.quantize_blocks(c, m, target, x2.element_size())
    if config is not None:
        bm, bc, warps, stages, persistent = config
        opts = {**opts, "num_warps": warps} if opts else opts
        rows = C.quantize_programs(m, bm, C.cdiv(c, bc), target) if persistent else C.cdiv(m, bm)
    return Launch(rescale_quantize_kernel, (rows, C.cdiv(c, bc)),
                  dict(x_ptr=x2, out_ptr=out, r_ptr=_opt(r, x2), shift_ptr=_opt(shift, x2), s_ptr=s, z_ptr=zr, M=m,
                       C=c, stride_xm=x2.stride(0), stride_om=out.stride(0)),
                  dict(HAS_R=r is not None, HAS_SHIFT=shift is not None, QMAX=P.qmax(bits),
                       OFFSET=P.code_offset(bits), BLOCK_M=bm, BLOCK_C=bc, EVEN_C=c % bc == 0, STAGES=stages), opts)


@lowbit_op("rescale_quantize")
def rescale_quantize(x: Tensor, r: Optional[Tensor], shift: Optional[Tensor], s: Tensor, zr: Tensor,
                     bits: float) -> Tensor:
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=torch.int8, device=x.device)
    if x2.numel():
        rescale_quantize_launch(x2, out, r, shift, s, zr, bits, Target.of(x))()
    return out.reshape(x.shape)


@rescale_quantize.register_fake
def _(x, r, shift, s, zr, bits):
    return torch.empty_like(x, dtype=torch.int8)


def layernorm_quantize_launch(x2: Tensor, out: Tensor, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
                              eps: float, r: Optional[Tensor], shift: Optional[Tensor], s: Tensor, zr: Tensor,
                              bits: float, target: Target, config: Optional[Tuple[int, ...]] = None,
                              delta: Optional[Tensor] = None, x_new: Optional[Tensor] = None) -> Launch:
    """The LayerNorm-quantize launch; with ``delta`` (``[M, C]``, unit column stride) the residual-fused one, which
    also writes ``x_new = x2 + delta`` (in ``x_new``'s dtype). ``config``: ``(BLOCK_M, BLOCK_C, CHUNKS,
    num_warps)`` in place of :func:`kernels.configs.layernorm_blocks`'s (``bench.gpu`` times others beside it; the
    former layout is ``(2, pow2(C), 1, 4)``)."""
    m, c = x2.shape
    bm, bc, chunks, opts = C.layernorm_blocks(c, target, m)
    if config is not None:
        bm, bc, chunks, warps = config
        opts = {**opts, "num_warps": warps} if opts else opts
    res = delta is not None
    return Launch(layernorm_quantize_kernel, (C.cdiv(m, bm),),
                  dict(x_ptr=x2, d_ptr=delta if res else _dummy(x2), xn_ptr=x_new if res else _dummy(x2),
                       out_ptr=out, lnw_ptr=_opt(ln_weight, x2), lnb_ptr=_opt(ln_bias, x2), r_ptr=_opt(r, x2),
                       shift_ptr=_opt(shift, x2), s_ptr=s, z_ptr=zr, M=m, C=c, eps=float(eps),
                       stride_xm=x2.stride(0), stride_dm=delta.stride(0) if res else 0,
                       stride_nm=x_new.stride(0) if res else 0, stride_om=out.stride(0)),
                  dict(HAS_LNW=ln_weight is not None, HAS_LNB=ln_bias is not None, HAS_R=r is not None,
                       HAS_SHIFT=shift is not None, RESIDUAL=res, QMAX=P.qmax(bits), OFFSET=P.code_offset(bits),
                       BLOCK_M=bm, BLOCK_C=bc, CHUNKS=chunks, EVEN_C=c == chunks * bc), opts)


@lowbit_op("layernorm_quantize")
def layernorm_quantize(x: Tensor, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], eps: float,
                       r: Optional[Tensor], shift: Optional[Tensor], s: Tensor, zr: Tensor, bits: float) -> Tensor:
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=torch.int8, device=x.device)
    if x2.numel():
        layernorm_quantize_launch(x2, out, ln_weight, ln_bias, eps, r, shift, s, zr, bits, Target.of(x))()
    return out.reshape(x.shape)


@layernorm_quantize.register_fake
def _(x, ln_weight, ln_bias, eps, r, shift, s, zr, bits):
    return torch.empty_like(x, dtype=torch.int8)


@lowbit_op("add_layernorm_quantize")
def add_layernorm_quantize(x: Tensor, delta: Tensor, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
                           eps: float, r: Optional[Tensor], shift: Optional[Tensor], s: Tensor, zr: Tensor,
                           bits: float) -> Tuple[Tensor, Tensor]:
    """``(x_new, codes)``: ``x_new = x + delta`` (float32 sum rounded to ``x``'s dtype) and the int8 codes of
    ``(LN(x_new) - shift) / r``, in one pass (``delta``: ``x``'s shape, any float dtype)."""
    x2 = _rows(x)
    d2 = _rows(delta)
    x_new = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    out = torch.empty(x2.shape, dtype=torch.int8, device=x.device)
    if x2.numel():
        layernorm_quantize_launch(x2, out, ln_weight, ln_bias, eps, r, shift, s, zr, bits, Target.of(x), delta=d2,
                                  x_new=x_new)()
    return x_new.reshape(x.shape), out.reshape(x.shape)


@add_layernorm_quantize.register_fake
def _(x, delta, ln_weight, ln_bias, eps, r, shift, s, zr, bits):
    return torch.empty_like(x), torch.empty_like(x, dtype=torch.int8)


# ---------------------------------------------------------------------------------------------- fake quant


def fake_quantize_fwd_launch(x2: Tensor, out: Tensor, r: Optional[Tensor], shift: Optional[Tensor], s: Tensor,
                             z: Tensor, bits: float, target: Target) -> Launch:
    m, c = x2.shape
    bm, bc, opts = C.elementwise_blocks(c, target)
    return Launch(fake_quantize_fwd_kernel, (C.cdiv(m, bm), C.cdiv(c, bc)),
                  dict(x_ptr=x2, out_ptr=out, r_ptr=_opt(r, x2), shift_ptr=_opt(shift, x2), s_ptr=s, z_ptr=z, M=m,
                       C=c, stride_xm=x2.stride(0), stride_s=0 if s.numel() == 1 else 1),
                  dict(HAS_R=r is not None, HAS_SHIFT=shift is not None, QMAX=P.qmax(bits), BLOCK_M=bm,
                       BLOCK_C=bc), opts)


@lowbit_op("fake_quantize_fwd")
def fake_quantize_fwd(x: Tensor, r: Optional[Tensor], shift: Optional[Tensor], s: Tensor, z: Tensor,
                      bits: float) -> Tensor:
    """float32 ``x_hat`` of ``x [..., C]``; ``s, z`` hold 1 (per tensor) or ``M = numel / C`` (per row) values."""
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=torch.float32, device=x.device)
    if x2.numel():
        fake_quantize_fwd_launch(x2, out, r, shift, s, z, bits, Target.of(x))()
    return out if out.shape == x.shape else out.reshape(x.shape)


@fake_quantize_fwd.register_fake
def _(x, r, shift, s, z, bits):
    return torch.empty_like(x, dtype=torch.float32)


def fake_quantize_bwd_launch(g2: Tensor, x2: Tensor, r: Optional[Tensor], shift: Optional[Tensor], s: Tensor,
                             z: Tensor, bits: float, target: Target) -> Tuple[Launch, Tuple[Tensor, ...]]:
    """The launch and its outputs ``(gx, rc_part [n, nM, C], sz_part [2, M, nC])``: column partial sums of the
    ``r`` and ``shift`` gradients (``n`` = how many of the two there are; None without either), row partial sums
    of the ``s`` and ``z`` gradients. Every partial sum is written (no zero fill)."""
    m, c = x2.shape
    bm, bc, opts = C.fake_quantize_bwd_blocks(c, target)
    nm, nc = C.cdiv(m, bm), C.cdiv(c, bc)
    f32 = dict(dtype=torch.float32, device=x2.device)
    gx = torch.empty((m, c), dtype=_store_dtype(x2.dtype), device=x2.device)
    n_rc = (r is not None) + (shift is not None)
    rc = torch.empty((n_rc, nm, c), **f32) if n_rc else None
    sz = torch.empty((2, m, nc), **f32)
    launch = Launch(fake_quantize_bwd_kernel, (nm, nc),
                    dict(x_ptr=x2, g_ptr=g2, r_ptr=_opt(r, x2), shift_ptr=_opt(shift, x2), s_ptr=s, z_ptr=z,
                         gx_ptr=gx, gr_part_ptr=sz if r is None else rc[0], gsh_part_ptr=sz if shift is None else rc[-1],
                         gs_part_ptr=sz[0], gz_part_ptr=sz[1], M=m, C=c, stride_xm=x2.stride(0),
                         stride_s=0 if s.numel() == 1 else 1),
                    dict(HAS_R=r is not None, HAS_SHIFT=shift is not None, QMAX=P.qmax(bits), BLOCK_M=bm,
                         BLOCK_C=bc), opts)
    return launch, (gx, rc, sz)


@lowbit_op("fake_quantize_bwd")
def fake_quantize_bwd(g: Tensor, x: Tensor, r: Optional[Tensor], shift: Optional[Tensor], s: Tensor, z: Tensor,
                      bits: float) -> Tuple[Tensor, Tensor, Tensor]:
    """``(gx [x.shape, x.dtype], g_rc [n, C], g_sz [2, M])``: the gradients of ``r`` then ``shift`` (``n`` = how
    many of the two are given, 0-2 rows) and, per row, of ``s`` and ``z``."""
    x2 = _rows(x)
    g2 = P.f32(g if g.shape == x2.shape else g.reshape(x2.shape)).contiguous()
    launch, (gx, rc, sz) = fake_quantize_bwd_launch(g2, x2, r, shift, s, z, bits, Target.of(x))
    if x2.numel():
        launch()
    else:
        sz.zero_()
        if rc is not None:
            rc.zero_()
    g_rc = rc.sum(1) if rc is not None else torch.empty((0, x2.shape[1]), dtype=torch.float32, device=x.device)
    gx = gx if gx.dtype == x.dtype else gx.to(x.dtype)
    return gx if gx.shape == x.shape else gx.reshape(x.shape), g_rc, sz.sum(2)


@fake_quantize_bwd.register_fake
def _(g, x, r, shift, s, z, bits):
    c = x.shape[-1]
    m = x.numel() // c if c else 0
    f32 = dict(dtype=torch.float32, device=x.device)
    return torch.empty_like(x), torch.empty(((r is not None) + (shift is not None), c), **f32), torch.empty(2, m, **f32)


# ---------------------------------------------------------------------------------------------- packed GEMM

#: the weight-tile loader of each packed format (:mod:`kernels.unpack`)
GEMM_LOADERS = {"2bit": unpack.load_2bit, "int3": unpack.load_int3, "int4": unpack.load_int4,
                "int8": unpack.load_int8}

_autotuned = None


def _autotuned_gemm():
    """``packed_gemm_kernel`` autotuned over :data:`kernels.configs.GEMM_CANDIDATES` (sm_90 shapes without a row)."""
    global _autotuned
    if _autotuned is None:
        cands = [triton.Config(c.meta(), num_warps=c.num_warps, num_stages=c.num_stages) for c in C.GEMM_CANDIDATES]
        _autotuned = triton.autotune(configs=cands, key=["M", "N", "K"])(packed_gemm_kernel)
    return _autotuned


def _epilogue_args(a2: Tensor, colsum: Tensor, sa: Tensor, za: Tensor, sw: Tensor, zw: Tensor, bias: Optional[Tensor],
                   gelu: bool, out: Tensor, rq_s: Optional[Tensor], rq_zr: Optional[Tensor], rq_bits: float,
                   res: Optional[Tensor], centered: bool) -> Tuple[dict, dict]:
    """``(args, meta)`` of :func:`kernels._helpers.gemm_epilogue` shared by both GEMM kernels."""
    if res is not None and rq_s is not None:
        raise ValueError("the residual add applies to a float output, not to requantized codes")
    requant = rq_s is not None
    args = dict(out_ptr=out, colsum_ptr=colsum, sa_ptr=sa, za_ptr=za, sw_ptr=sw, zw_ptr=zw, bias_ptr=_opt(bias, a2),
                rq_s_ptr=_opt(rq_s, a2), rq_z_ptr=_opt(rq_zr, a2), res_ptr=_opt(res, a2), M=a2.shape[0],
                N=sw.numel(), K=a2.shape[1], stride_om=out.stride(0), stride_rm=res.stride(0) if res is not None else 0)
    meta = dict(HAS_BIAS=bias is not None, GELU=gelu, REQUANT=requant,
                RQ_QMAX=P.qmax(rq_bits) if requant else 0, RQ_OFFSET=P.code_offset(rq_bits) if requant else 0,
                RQ_PER_COL=requant and rq_s.numel() > 1, W_CENTERED=centered, HAS_RES=res is not None)
    return args, meta


def packed_gemm_launch(a2: Tensor, planes: List[Tensor], fmt: str, k: int, colsum: Tensor, sa: Tensor, za: Tensor,
                       sw: Tensor, zw: Tensor, bias: Optional[Tensor], gelu: bool, out: Tensor,
                       rq_s: Optional[Tensor], rq_zr: Optional[Tensor], rq_bits: float, target: Target,
                       config: Optional[C.GemmConfig] = None, centered: bool = False,
                       res: Optional[Tensor] = None) -> Launch:
    """The launch of ``out [M, N] = a2 [M, K] @ planes^T`` with its epilogue; ``config`` overrides the table
    (``None`` from the table means autotune: the launch then carries no block sizes); ``centered``: the ``int8``
    planes hold ``w - zw[n]`` (``colsum`` and ``zw`` still those of the codes ``w``); ``res [M, N]``: added to the
    float output."""
    if centered and fmt != "int8":
        raise ValueError(f"centred weight codes come as an int8 plane, got format {fmt!r}")
    m, n = a2.shape[0], sw.numel()
    cfg = config or C.gemm_config(fmt, m, n, k, target)
    w1 = planes[1] if len(planes) > 1 else _dummy(a2)
    epi, meta = _epilogue_args(a2, colsum, sa, za, sw, zw, bias, gelu, out, rq_s, rq_zr, rq_bits, res, centered)
    args = dict(a_ptr=a2, w0_ptr=planes[0], w1_ptr=w1, **epi, stride_am=a2.stride(0), stride_w0=planes[0].stride(0),
                stride_w1=planes[1].stride(0) if len(planes) > 1 else 0)
    meta = dict(LOAD_W=GEMM_LOADERS[fmt], **meta)
    if cfg is None:
        def grid(mt):
            return (C.cdiv(m, mt["BLOCK_M"]) * C.cdiv(n, mt["BLOCK_N"]),)
        return Launch(_autotuned_gemm(), grid, args, meta, dict(C.GPU_OPTIONS))
    grid = (C.cdiv(m, cfg.block_m) * C.cdiv(n, cfg.block_n),)
    return Launch(packed_gemm_kernel, grid, args, {**meta, **cfg.meta()}, cfg.options())


def _descriptor(t: Tensor, block: List[int]) -> TensorDescriptor:
    """A host-side TMA descriptor of the 2-D ``t`` (unit last stride) in ``block`` boxes."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block)


def weight_descriptor(w8: Tensor, block: List[int]) -> TensorDescriptor:
    """:func:`_descriptor` of a weight, kept on the weight tensor while it is unchanged (one per box shape)."""
    return kept(w8, f"_lowbit_desc_{block[0]}x{block[1]}", (w8,), lambda: _descriptor(w8, block))


def tma_ready(a2: Tensor, w8: Tensor) -> bool:
    """Whether both int8 operands can be TMA sources: 16-byte aligned bases and row strides, unit last strides."""
    return all(t.stride(-1) == 1 and t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0 for t in (a2, w8))


def int8_gemm_tma_launch(a2: Tensor, w8: Tensor, colsum: Tensor, sa: Tensor, za: Tensor, sw: Tensor, zw: Tensor,
                         bias: Optional[Tensor], gelu: bool, out: Tensor, rq_s: Optional[Tensor],
                         rq_zr: Optional[Tensor], rq_bits: float, target: Target, config: C.TmaGemmConfig,
                         centered: bool = False, res: Optional[Tensor] = None) -> Launch:
    """The launch of :mod:`kernels.int8_gemm_tma`: ``out [M, N] = a2 [M, K] @ w8 [N, K]^T`` with
    :func:`packed_gemm_launch`'s epilogue; ``min(tiles, SMs)`` programs (tiles of ``config``)."""
    epi, meta = _epilogue_args(a2, colsum, sa, za, sw, zw, bias, gelu, out, rq_s, rq_zr, rq_bits, res, centered)
    tiles = C.cdiv(a2.shape[0], config.block_m) * C.cdiv(sw.numel(), config.block_n)
    programs = max(1, min(tiles, target.num_sms))
    args = dict(a_desc=_descriptor(a2, [config.block_m, config.block_k]),
                w_desc=weight_descriptor(w8, [config.block_n, config.block_k]), **epi)
    return Launch(int8_gemm_tma_kernel, (programs,), args, {**meta, **config.meta(), "NUM_SMS": programs},
                  config.options())


def unpack_codes_launch(planes: List[Tensor], fmt: str, k: int, zw: Tensor, out: Tensor, target: Target) -> Launch:
    """The launch that writes the centred int8 codes ``out [N, K] = w - zw[n]`` of a ``fmt`` weight's ``planes``
    (``zw`` int32 ``[N]``)."""
    n = out.shape[0]
    bn, bk, opts = C.unpack_blocks(target)
    w1 = planes[1] if len(planes) > 1 else _dummy(out)
    return Launch(unpack_codes_kernel, (C.cdiv(n, bn), C.cdiv(k, bk)),
                  dict(w0_ptr=planes[0], w1_ptr=w1, zw_ptr=zw, out_ptr=out, N=n, K=k, stride_w0=planes[0].stride(0),
                       stride_w1=planes[1].stride(0) if len(planes) > 1 else 0, stride_o=out.stride(0)),
                  dict(LOAD_W=GEMM_LOADERS[fmt], BLOCK_N=bn, BLOCK_K=bk), opts)


@lowbit_op("unpack_codes")
def unpack_codes(planes: List[Tensor], fmt: str, k: int, zw: Tensor) -> Tensor:
    """The centred int8 codes ``[N, K] = w - zw[n]`` of a packed ``fmt`` weight (``zw`` int32 ``[N]``)."""
    out = torch.empty((zw.numel(), k), dtype=torch.int8, device=zw.device)
    if out.numel():
        unpack_codes_launch(planes, fmt, k, zw, out, Target.of(zw))()
    return out


@unpack_codes.register_fake
def _(planes, fmt, k, zw):
    return zw.new_empty((zw.numel(), k), dtype=torch.int8)


def gemm_launch(a2: Tensor, planes: List[Tensor], fmt: str, k: int, colsum: Tensor, sa: Tensor, za: Tensor,
                sw: Tensor, zw: Tensor, bias: Optional[Tensor], gelu: bool, out: Tensor, rq_s: Optional[Tensor],
                rq_zr: Optional[Tensor], rq_bits: float, target: Target, centered: bool = False,
                res: Optional[Tensor] = None) -> Launch:
    """The GEMM the dispatcher runs: the persistent TMA kernel where :func:`kernels.configs.tma_gemm_config` has a
    tile for an int8 weight and both operands are TMA sources, else the packed (pointer-load) kernel."""
    if fmt == "int8":
        cfg = C.tma_gemm_config(a2.shape[0], sw.numel(), k, target, centered)
        if cfg is not None and tma_ready(a2, planes[0]):
            return int8_gemm_tma_launch(a2, planes[0], colsum, sa, za, sw, zw, bias, gelu, out, rq_s, rq_zr, rq_bits,
                                        target, cfg, centered, res)
    return packed_gemm_launch(a2, planes, fmt, k, colsum, sa, za, sw, zw, bias, gelu, out, rq_s, rq_zr, rq_bits,
                              target, centered=centered, res=res)


@lowbit_op("packed_linear")
def packed_linear(a: Tensor, planes: List[Tensor], fmt: str, k: int, colsum: Tensor, sa: Tensor, za: Tensor,
                  sw: Tensor, zw: Tensor, bias: Optional[Tensor], gelu: bool, out_dtype: torch.dtype,
                  rq_s: Optional[Tensor], rq_zr: Optional[Tensor], rq_bits: float, centered: bool = False,
                  residual: Optional[Tensor] = None) -> Tensor:
    """``a [..., K]`` int8 codes times the packed weight ``planes`` (format ``fmt``); ``zw`` the zero point of the
    stored weight codes, ``colsum`` their row sums over K (int32 [N]); ``centered``: the ``int8`` plane holds
    ``w - zw[n]`` instead. Requantizes when ``rq_s`` is given, else adds ``residual [..., N]`` (when given) to the
    output in its epilogue. From :data:`kernels.configs.UNPACK_MIN_M` rows a packed weight is first unpacked to
    centred int8 codes."""
    a2 = _rows(a)
    m, n = a2.shape[0], sw.numel()
    requant = rq_s is not None
    if residual is not None and requant:
        raise ValueError("the residual add applies to a float output, not to requantized codes")
    store = torch.int8 if requant else _store_dtype(out_dtype)
    out = torch.empty((m, n), dtype=store, device=a.device)
    res = None if residual is None else _rows(residual)
    late_res = res is not None and store != out_dtype  # the interpreter's bf16: torch adds after rounding
    if m and n:
        target = Target.of(a)
        if C.unpack_first(fmt, m):
            planes, fmt, centered = [unpack_codes(planes, fmt, k, zw)], "int8", True
        gemm_launch(a2, planes, fmt, k, colsum, sa, za, sw, zw, bias, gelu, out, rq_s, rq_zr, rq_bits, target,
                    centered, None if late_res else res)()
    dt = torch.int8 if requant else out_dtype
    out = out if out.dtype == dt else out.to(dt)
    if late_res:
        out = out + res
    return out.reshape(*a.shape[:-1], n)


@packed_linear.register_fake
def _(a, planes, fmt, k, colsum, sa, za, sw, zw, bias, gelu, out_dtype, rq_s, rq_zr, rq_bits, centered=False,
      residual=None):
    dt = torch.int8 if rq_s is not None else out_dtype
    return a.new_empty((*a.shape[:-1], sw.numel()), dtype=dt)


# ---------------------------------------------------------------------------------------------- attention


def quant_attention_launch(q: Tensor, k: Tensor, v: Tensor, out: Tensor, rel_bias: Optional[Tensor],
                           mask: Optional[Tensor], zq: Tensor, zk: Tensor, zv: Tensor, qk_scale: Tensor,
                           p_args: dict, p_bits: float, target: Target, rq_r: Optional[Tensor] = None,
                           rq_shift: Optional[Tensor] = None, rq_s: Optional[Tensor] = None,
                           rq_z: Optional[Tensor] = None, rq_bits: float = 8.0,
                           one_pass: Optional[bool] = None) -> Launch:
    """Any attention kernel: ``p_args`` holds ``sp, zp, pv_scale`` (uniform) or ``eta, x0, sp, zp, table, sv``
    (SULQ), keyed by the kernel's pointer names. ``q, k, v`` share strides (last one 1); ``out`` is ``[B, H, L, D]``
    in any strides (last one 1), int8 when requantizing (``rq_s`` given). ``one_pass``: the one-pass kernel
    (:mod:`kernels.quant_attention_one_pass`; default :func:`kernels.configs.attention_one_pass`) or the two-pass
    kernel."""
    b, h, l, d = q.shape
    sulq = "table_ptr" in p_args
    requant = rq_s is not None
    biased = rel_bias is not None or mask is not None
    if one_pass is None:
        one_pass = C.attention_one_pass(l, sulq)
    if one_pass and l > C.ONE_PASS_MAX_L:
        raise ValueError(f"the one-pass attention takes at most {C.ONE_PASS_MAX_L} tokens, got {l}")
    if one_pass:
        bm, bn, opts = C.one_pass_config(l, d, target, biased, sulq)
        kernel = quant_attention_sulq_one_pass_kernel if sulq else quant_attention_one_pass_kernel
    else:
        bm, bn, opts = C.attention_config(l, d, target, biased, sulq)
        kernel = quant_attention_sulq_kernel if sulq else quant_attention_kernel
    sb, sh, sl, _ = q.stride()
    ob, oh, ol, _ = out.stride()
    return Launch(kernel, (C.cdiv(l, bm), b * h),
                  dict(q_ptr=q, k_ptr=k, v_ptr=v, out_ptr=out, bias_ptr=_opt(rel_bias, q), mask_ptr=_opt(mask, q),
                       zq_ptr=zq, zk_ptr=zk, zv_ptr=zv, qk_scale_ptr=qk_scale, **p_args, r_ptr=_opt(rq_r, q),
                       shift_ptr=_opt(rq_shift, q), rq_s_ptr=_opt(rq_s, q), rq_z_ptr=_opt(rq_z, q), H=h, L=l,
                       NW=mask.shape[0] if mask is not None else 1, stride_b=sb, stride_h=sh, stride_l=sl,
                       stride_ob=ob, stride_oh=oh, stride_ol=ol),
                  dict(D=d, HAS_BIAS=rel_bias is not None, HAS_MASK=mask is not None, P_QMAX=P.qmax(p_bits),
                       P_OFFSET=P.code_offset(p_bits), HAS_R=rq_r is not None, HAS_SHIFT=rq_shift is not None,
                       REQUANT=requant, RQ_QMAX=P.qmax(rq_bits) if requant else 0,
                       RQ_OFFSET=P.code_offset(rq_bits) if requant else 0, BLOCK_M=bm, BLOCK_N=bn,
                       FAST_EXP=C.ptx_asm(target)), opts)


def _qkv_views(q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``q, k, v`` as they are when they share strides with a unit last one (e.g. slices of one qkv tensor), else
    contiguous copies."""
    if q.stride() == k.stride() == v.stride() and q.stride(-1) == 1:
        return q, k, v
    return q.contiguous(), k.contiguous(), v.contiguous()


def _attention_out(q: Tensor, heads_last: bool, requant: bool) -> Tuple[Tensor, Tensor]:
    """``(out, its [B, H, L, D] view)``: ``out`` is ``[B, L, H, D]`` when ``heads_last``, int8 when ``requant``."""
    b, h, l, d = q.shape
    dt = torch.int8 if requant else torch.float32
    if heads_last:
        out = torch.empty((b, l, h, d), dtype=dt, device=q.device)
        return out, out.permute(0, 2, 1, 3)
    out = torch.empty((b, h, l, d), dtype=dt, device=q.device)
    return out, out


def _attention(q, k, v, rel_bias, mask, zq, zk, zv, qk_scale, p_args, p_bits, heads_last, rq_r, rq_shift, rq_s,
               rq_z, rq_bits) -> Tensor:
    q, k, v = _qkv_views(q, k, v)
    rel_bias = rel_bias.contiguous() if rel_bias is not None else None
    mask = mask.contiguous() if mask is not None else None
    out, view = _attention_out(q, heads_last, rq_s is not None)
    if q.numel():
        quant_attention_launch(q, k, v, view, rel_bias, mask, zq, zk, zv, qk_scale, p_args, p_bits, Target.of(q),
                               rq_r, rq_shift, rq_s, rq_z, rq_bits)()
    return out


def _attention_fake(q, heads_last, rq_s):
    return _attention_out(q, heads_last, rq_s is not None)[0]


@lowbit_op("quant_attention")
def quant_attention(q: Tensor, k: Tensor, v: Tensor, rel_bias: Optional[Tensor], mask: Optional[Tensor],
                    zq: Tensor, zk: Tensor, zv: Tensor, qk_scale: Tensor, sp: Tensor, zp: Tensor, pv_scale: Tensor,
                    p_bits: float, heads_last: bool, rq_r: Optional[Tensor], rq_shift: Optional[Tensor],
                    rq_s: Optional[Tensor], rq_z: Optional[Tensor], rq_bits: float) -> Tensor:
    """``O`` from int8 ``q, k, v [B, H, L, D]`` (see :mod:`kernels.quant_attention`): float32 ``[B, H, L, D]``, or
    ``[B, L, H, D]`` when ``heads_last``; int8 codes of ``(O - rq_shift) / rq_r`` when ``rq_s`` is given."""
    return _attention(q, k, v, rel_bias, mask, zq, zk, zv, qk_scale,
                      dict(sp_ptr=sp, zp_ptr=zp, pv_scale_ptr=pv_scale), p_bits, heads_last, rq_r, rq_shift, rq_s,
                      rq_z, rq_bits)


@quant_attention.register_fake
def _(q, k, v, rel_bias, mask, zq, zk, zv, qk_scale, sp, zp, pv_scale, p_bits, heads_last, rq_r, rq_shift, rq_s,
      rq_z, rq_bits):
    return _attention_fake(q, heads_last, rq_s)


@lowbit_op("quant_attention_sulq")
def quant_attention_sulq(q: Tensor, k: Tensor, v: Tensor, rel_bias: Optional[Tensor], mask: Optional[Tensor],
                         zq: Tensor, zk: Tensor, zv: Tensor, qk_scale: Tensor, eta: Tensor, x0: Tensor, sp: Tensor,
                         zp: Tensor, table: Tensor, sv: Tensor, p_bits: float, heads_last: bool,
                         rq_r: Optional[Tensor], rq_shift: Optional[Tensor], rq_s: Optional[Tensor],
                         rq_z: Optional[Tensor], rq_bits: float) -> Tensor:
    """:func:`quant_attention` with SULQ probability codes (see :mod:`kernels.quant_attention_sulq`)."""
    return _attention(q, k, v, rel_bias, mask, zq, zk, zv, qk_scale,
                      dict(eta_ptr=eta, x0_ptr=x0, sp_ptr=sp, zp_ptr=zp, table_ptr=table.contiguous(), sv_ptr=sv),
                      p_bits, heads_last, rq_r, rq_shift, rq_s, rq_z, rq_bits)


@quant_attention_sulq.register_fake
def _(q, k, v, rel_bias, mask, zq, zk, zv, qk_scale, eta, x0, sp, zp, table, sv, p_bits, heads_last, rq_r, rq_shift,
      rq_s, rq_z, rq_bits):
    return _attention_fake(q, heads_last, rq_s)
