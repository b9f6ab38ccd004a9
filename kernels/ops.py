"""Dispatch for the quantized ops: the one entry point the optimiser, the models and the exporter call.

CUDA tensors run the Triton kernels; CPU tensors run :mod:`kernels.reference` unless ``LOWBIT_TRITON=1`` is set
(then the Triton kernels run on CPU through ``TRITON_INTERPRET=1``), or :func:`use_triton` forces a choice.
Without CUDA, importing this module sets ``TRITON_INTERPRET=1`` (unless already set) so the switch works at any time.
All functions take activation quantizers as :class:`lowbit.primitives.QParams` (per-tensor ``s``, unsigned ``z``).
The Triton kernels are registered as ``torch.ops.lowbit.*`` (:mod:`kernels.library`), so ``torch.compile``
traces through them without graph breaks (argument checks that need host values are skipped while compiling).
"""
from __future__ import annotations

import os
import weakref
from typing import Callable, Optional, Tuple, Union

import torch
from torch import Tensor

from lowbit import packing
from lowbit import primitives as P
from lowbit.primitives import QParams, SULQParams

from . import reference as R
from .configs import ATTENTION_HEAD_DIMS

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from . import library as L  # noqa: E402

_FORCE: Optional[bool] = None
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def use_triton(flag: Optional[bool]) -> None:
    """Force the Triton path on (True) or off (False) for every device; None restores the default."""
    global _FORCE
    _FORCE = flag


def triton_enabled(t: Tensor) -> bool:
    if _FORCE is not None:
        return _FORCE
    return t.is_cuda or os.environ.get("LOWBIT_TRITON", "0") == "1"


# ---------------------------------------------------------------------------------------------- validation


def _checking() -> bool:
    """Value checks run: not while ``torch.compile`` traces, nor inside :func:`lowbit.primitives.unchecked_values`."""
    return not torch.compiler.is_compiling() and P.value_checks()


def _memo(tag: str, values: Tuple, fn: Callable):
    """``fn()``, kept on ``values[0]`` (a tensor) and reused while every tensor of ``values`` is the same object with
    the same storage and version and every number is equal: a deployed quantizer's parameters are checked and
    converted once, not on every call (no host sync, no small kernels). Recomputed under ``torch.compile``, for
    inference tensors (no version counter), and for tensors that require grad while grad is on (the optimiser's)."""
    tensors = [t for t in values if torch.is_tensor(t)]
    if (torch.compiler.is_compiling() or not torch.is_tensor(values[0])
            or not all(torch.is_tensor(v) or isinstance(v, (int, float)) for v in values)
            or any(t.is_inference() for t in tensors)
            or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))):
        return fn()
    key = tuple((v.data_ptr(), v._version) if torch.is_tensor(v) else v for v in values)
    memo = values[0].__dict__.setdefault("_lowbit_memo", {})
    hit = memo.get(tag)
    if hit is not None and hit[1] == key and all(r() is t for r, t in zip(hit[0], tensors)):
        return hit[2]
    out = fn()
    memo[tag] = (tuple(weakref.ref(t) for t in tensors), key, out)
    return out


def _same_device(ref: Tensor, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and torch.is_tensor(t) and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but the input is on {ref.device}; move it with .to(device)")


def _scalar(name: str, v, like: Tensor, n: int = 1) -> Tensor:
    """float32 ``[n]`` of ``v`` on ``like``'s device: a per-tensor scalar, or (``n > 1``) one value per column."""
    t = torch.as_tensor(v, dtype=torch.float32, device=like.device)
    if t.numel() != n:
        raise ValueError(f"{name} must be a per-tensor scalar, got shape {tuple(t.shape)}" if n == 1 else
                         f"{name} must hold one value per output column ({n}), got shape {tuple(t.shape)}")
    return t.reshape(n)


def _act_qparams(x: Tensor, qp: QParams, columns: int = 1):
    """``(s, rounded unsigned z)``, float32 ``[1]``, of a per-tensor activation quantizer, checked; with ``columns``
    a quantizer that holds one step and zero point per output column (``[columns]``: a requant over a qkv
    projection's Q, K, V columns) is taken too."""
    P.check_bits(qp.bits)
    n = columns if columns > 1 and torch.as_tensor(qp.s).numel() > 1 else 1

    def prepare():
        s, z = _scalar("step size s", qp.s, x, n), _scalar("zero point z", qp.z, x, n)
        if _checking():
            P.check_step(s)
            P._check_finite("zero point z", z)
        return s, P.round_zero_point(z, qp.bits)
    return _memo(f"act {qp.bits} {n} {x.device}", (qp.s, qp.z), prepare)


def stacked_qparams(qps, sizes) -> QParams:
    """One per-column quantizer from per-tensor ones of equal bits, ``qps[i]`` repeated ``sizes[i]`` times (the Q, K,
    V quantizers over a qkv projection's output columns, for :func:`packed_linear`'s ``requant``); built once per
    version of the parameters."""
    bits = {float(qp.bits) for qp in qps}
    if len(bits) != 1:
        raise ValueError(f"stacked quantizers must share one bit width, got {sorted(bits)}")
    values = tuple(t for qp in qps for t in (qp.s, qp.z))

    def build():
        with torch.inference_mode(False):  # keys of _act_qparams' memo: inference tensors are never memoized
            return tuple(torch.cat([torch.as_tensor(getattr(qp, f), dtype=torch.float32).reshape(1).expand(int(n))
                                    for qp, n in zip(qps, sizes)]) for f in ("s", "z"))
    s, z = _memo(f"stacked {tuple(sizes)}", values, build)
    return QParams(s, z, qps[0].bits)


def _channel_vecs(x: Tensor, channels: Optional[int] = None, **vecs):
    """float32 contiguous copies (views when already so) of per-channel vectors, checked to have ``channels``
    (default ``x.shape[-1]``) entries; None stays None."""
    c = x.shape[-1] if channels is None else channels
    out = []
    for name, t in vecs.items():
        R._check_channel_vec(name, t, c)
        out.append(None if t is None else t.to(device=x.device, dtype=torch.float32).contiguous())
    return out


def _check_float_input(x: Tensor, name: str = "x") -> None:
    R._check_act_input(x, name)
    if x.dim() < 1:
        raise ValueError(f"{name} must have a channel dimension, got a 0-d tensor")


# ---------------------------------------------------------------------------------------------- quantize


def quantize(x: Tensor, qp: QParams, r: Optional[Tensor] = None, shift: Optional[Tensor] = None) -> Tensor:
    """int8 codes of ``(x - shift) / r`` (see :func:`kernels.reference.rescale_quantize`)."""
    if not triton_enabled(x):
        return R.rescale_quantize(x, qp, r, shift)
    _check_float_input(x)
    _same_device(x, r=r, shift=shift)
    s, zr = _act_qparams(x, qp)
    r, shift = _channel_vecs(x, r=r, shift=shift)
    return L.rescale_quantize(x, r, shift, s, zr, float(qp.bits))


def layernorm_quantize(x: Tensor, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], eps: float,
                       qp: QParams, r: Optional[Tensor] = None, shift: Optional[Tensor] = None) -> Tensor:
    """int8 codes of ``(LayerNorm(x) - shift) / r``."""
    if not triton_enabled(x):
        return R.layernorm_rescale_quantize(x, ln_weight, ln_bias, eps, qp, r, shift)
    _check_float_input(x)
    _same_device(x, ln_weight=ln_weight, ln_bias=ln_bias, r=r, shift=shift)
    s, zr = _act_qparams(x, qp)
    lw, lb, r, shift = _channel_vecs(x, ln_weight=ln_weight, ln_bias=ln_bias, r=r, shift=shift)
    return L.layernorm_quantize(x, lw, lb, float(eps), r, shift, s, zr, float(qp.bits))


# ---------------------------------------------------------------------------------------------- fake quant


def _fq_kernel_args(r, shift, s, z):
    """float32 contiguous ``(r, shift, s, z)`` for the fake-quant kernels (``s, z`` flattened; None stays None)."""
    return (None if r is None else r.float().contiguous(), None if shift is None else shift.float().contiguous(),
            s.float().reshape(-1).contiguous(), z.float().reshape(-1).contiguous())


def _fq_grads(g, x, args, bits, like) -> Tuple:
    """``(gx, gr, gshift, gs, gz)`` of the fake-quant kernels' backward, ``gs, gz`` summed to the shape and dtype of
    ``like = (r, shift, s, z)`` (None where that input is None)."""
    r, shift, s, z = like
    gx, g_rc, g_sz = L.fake_quantize_bwd(g, x, *args, float(bits))
    if args[2].numel() == 1:
        g_sz = g_sz.sum(1)
    gs, gz = g_sz.unbind(0)
    return (gx, None if r is None else g_rc[0].to(r.dtype), None if shift is None else g_rc[-1].to(shift.dtype),
            gs.reshape(s.shape).to(s.dtype), gz.reshape(z.shape).to(z.dtype))


class TritonFakeQuantizeFn(torch.autograd.Function):
    """``fake_quantize((x - shift) / r, s, z)`` by :mod:`kernels.fake_quantize`; ``s, z`` per tensor (1 value) or
    per row of ``x`` viewed as ``[M, C]``. Gradients for x (STE), s, z (LSQ), r and shift, as the reference."""

    @staticmethod
    def forward(ctx, x, r, shift, s, z, bits):
        args = _fq_kernel_args(r, shift, s, z)
        ctx.save_for_backward(x, r, shift, s, z, *args)
        ctx.bits = bits
        return L.fake_quantize_fwd(x, *args, float(bits))

    @staticmethod
    def backward(ctx, g):
        x, r, shift, s, z, *args = ctx.saved_tensors
        grads = _fq_grads(g, x, args, ctx.bits, (r, shift, s, z))
        return (*(t if need else None for t, need in zip(grads, ctx.needs_input_grad)), None)


def _fq_act_inputs(x: Tensor, qp: QParams, r: Optional[Tensor], shift: Optional[Tensor]):
    """The checked per-tensor ``(s, z)`` of an activation fake-quant on the Triton path."""
    _check_float_input(x)
    _same_device(x, r=r, shift=shift, s=qp.s, z=qp.z)
    P.check_bits(qp.bits)
    c = x.shape[-1]
    R._check_channel_vec("r", r, c)
    R._check_channel_vec("shift", shift, c)
    s, z = torch.as_tensor(qp.s, device=x.device), torch.as_tensor(qp.z, device=x.device)
    if s.numel() != 1 or z.numel() != 1:
        raise ValueError(f"activation quantizers are per tensor: s and z must hold one value, got shapes "
                         f"{tuple(s.shape)} and {tuple(z.shape)}")
    if _checking():
        P.check_qparams(x.detach(), s.detach().float(), z.detach().float())
    return s, z


def _fq_weight_inputs(w: Tensor, s: Tensor, z: Tensor, bits):
    """The checked per-channel ``(s, z)`` of a weight fake-quant on the Triton path."""
    P.check_bits(bits)
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(w.shape)}")
    _same_device(w, s=s, z=z)
    s, z = torch.as_tensor(s, device=w.device), torch.as_tensor(z, device=w.device)
    for name, t in (("s", s), ("z", z)):
        if t.numel() not in (1, w.shape[0]) or (t.numel() > 1 and t.shape[0] != w.shape[0]):
            raise ValueError(f"{name} must be per output channel [N, 1] = [{w.shape[0]}, 1] or a scalar, "
                             f"got shape {tuple(t.shape)}")
    if _checking():
        P.check_qparams(w.detach(), s.detach().float(), z.detach().float())
    return s, z


def fake_quantize(x: Tensor, qp: QParams, r: Optional[Tensor] = None, shift: Optional[Tensor] = None) -> Tensor:
    """Differentiable float32 ``fake_quantize((x - shift) / r)`` (per-tensor activation quantizer)."""
    if not triton_enabled(x) or qp.bits == 16:
        return R.rescale_fake_quantize(x, qp, r, shift)
    s, z = _fq_act_inputs(x, qp, r, shift)
    return TritonFakeQuantizeFn.apply(x, r, shift, s, z, qp.bits)


def _weight_path(w: Tensor, bits) -> bool:
    return triton_enabled(w) and bits != 16 and w.dtype in _FLOATS


def fake_quantize_weight(w: Tensor, s: Tensor, z: Tensor, bits) -> Tensor:
    """Differentiable per-channel weight fake-quant, ``s, z`` of shape ``[N, 1]``."""
    if not _weight_path(w, bits):
        return P.fake_quantize(w, s, z, bits)
    s, z = _fq_weight_inputs(w, s, z, bits)
    return TritonFakeQuantizeFn.apply(w, None, None, s, z, bits)


def _autograd_vjp(fn: Callable, inputs: Tuple, needs: Tuple):
    """``(fn(*inputs), vjp)`` through autograd on detached copies of ``inputs`` (requiring grad where ``needs``)."""
    leaves = [None if t is None else t.detach().requires_grad_(bool(n) and t.is_floating_point())
              for t, n in zip(inputs, needs)]
    with torch.enable_grad():
        out = fn(*leaves)

    def vjp(g):
        want = [t for t in leaves if t is not None and t.requires_grad]
        got = iter(torch.autograd.grad(out, want, g, allow_unused=True) if want and out.requires_grad else ())
        return tuple(next(got, None) if t is not None and t.requires_grad else None for t in leaves)
    return out.detach(), vjp


def fake_quantize_vjp(x: Tensor, qp: QParams, r: Optional[Tensor] = None, shift: Optional[Tensor] = None,
                      needs: Tuple[bool, ...] = (True,) * 5):
    """``(x_hat, vjp)``: :func:`fake_quantize`'s value, built without an autograd graph on the Triton path, and
    ``vjp(g) -> (gx, gr, gshift, gs, gz)``, its gradients for an output gradient ``g`` (None where not ``needs``,
    in the order x, r, shift, s, z): one forward and one backward kernel, for backward passes that recompute the
    fake-quant tensors (:mod:`quant.int_forward`). The reference path differentiates
    :func:`kernels.reference.rescale_fake_quantize` with autograd."""
    if not triton_enabled(x) or qp.bits == 16:
        bits = qp.bits
        return _autograd_vjp(lambda x, r, shift, s, z: R.rescale_fake_quantize(x, QParams(s, z, bits), r, shift),
                             (x, r, shift, torch.as_tensor(qp.s), torch.as_tensor(qp.z)), needs)
    s, z = _fq_act_inputs(x, qp, r, shift)
    args = _fq_kernel_args(r, shift, s, z)
    out = L.fake_quantize_fwd(x, *args, float(qp.bits))
    return out, lambda g: tuple(t if n else None for t, n in zip(_fq_grads(g, x, args, qp.bits, (r, shift, s, z)),
                                                                  needs))


def fake_quantize_weight_vjp(w: Tensor, s: Tensor, z: Tensor, bits, needs: Tuple[bool, ...] = (True,) * 3):
    """:func:`fake_quantize_vjp` of :func:`fake_quantize_weight`: ``(w_hat, vjp(g) -> (gw, gs, gz))``."""
    if not _weight_path(w, bits):
        return _autograd_vjp(lambda w, s, z: P.fake_quantize(w, s, z, bits), (w, s, z), needs)
    s, z = _fq_weight_inputs(w, s, z, bits)
    args = _fq_kernel_args(None, None, s, z)
    out = L.fake_quantize_fwd(w, *args, float(bits))

    def vjp(g):
        gw, _, _, gs, gz = _fq_grads(g, w, args, bits, (None, None, s, z))
        return tuple(t if n else None for t, n in zip((gw, gs, gz), needs))
    return out, vjp


# ---------------------------------------------------------------------------------------------- packed GEMM


def weight_colsum(w: packing.PackedWeight) -> Tensor:
    """int32 ``[N]`` sums over K of the stored weight codes (unsigned, or signed for ``int8``), cached on ``w``.

    Pack-time helper for the GEMM epilogue; recomputed if a plane tensor was replaced or modified in place.
    """
    if torch.compiler.is_compiling():
        return _colsum(w)
    key = tuple((id(t), t.data_ptr(), t._version) for t in w.planes.values())
    cached = getattr(w, "_lowbit_colsum", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    cs = _colsum(w)
    object.__setattr__(w, "_lowbit_colsum", (key, cs))
    return cs


def _colsum(w: packing.PackedWeight) -> Tensor:
    return _row_sums(w.planes["q"][:, : w.k] if w.fmt == "int8" else packing.unpack(w))


def _row_sums(q: Tensor) -> Tensor:
    """int32 ``[N]`` sums over K of weight codes ``q [N, K]`` (the GEMM epilogue's ``colsum``)."""
    return q.to(torch.int32).sum(dim=1, dtype=torch.int32).contiguous()


def _check_packed(w: packing.PackedWeight, a: Tensor) -> None:
    if not isinstance(w, packing.PackedWeight):
        raise TypeError(f"w must be a lowbit.packing.PackedWeight (use lowbit.packing.pack), got {type(w).__name__}")
    P.check_bits(w.bits)
    if w.fmt != packing.format_for_bits(w.bits):
        raise ValueError(f"packed format {w.fmt!r} does not match {w.bits}-bit weights "
                         f"(expected {packing.format_for_bits(w.bits)!r}); re-pack with lowbit.packing.pack")
    for name, per in packing.FORMATS[w.fmt].planes:
        t = w.planes.get(name)
        shape = (w.n, packing.padded_k(w.k, w.fmt) // per)
        if t is None or tuple(t.shape) != shape:
            raise ValueError(f"plane {name!r} of format {w.fmt} must have shape {shape}, "
                             f"got {None if t is None else tuple(t.shape)}")
        if t.device != a.device:
            raise ValueError(f"packed weight plane {name!r} is on {t.device} but the activations are on "
                             f"{a.device}; move it with w.to(device)")


def packed_linear(a: Tensor, a_qp: QParams, w: packing.PackedWeight, w_scale: Tensor, w_zero: Tensor,
                  bias: Optional[Tensor] = None, gelu: bool = False, out_dtype: torch.dtype = torch.float32,
                  requant: Optional[QParams] = None) -> Tensor:
    """Integer linear on int8 codes and a packed weight (see :func:`kernels.reference.packed_linear`)."""
    if not triton_enabled(a):
        return R.packed_linear(a, a_qp, w, w_scale, w_zero, bias, gelu, out_dtype, requant)
    _check_act_codes(a)
    _check_packed(w, a)
    planes = [w.planes[name] for name, _ in packing.FORMATS[w.fmt].planes]
    return _int_linear(a, a_qp, planes, w.fmt, w.n, w.k, w.bits, lambda: weight_colsum(w), w_scale, w_zero, bias,
                       gelu, out_dtype, requant)


def linear_codes(a: Tensor, a_qp: QParams, qw: Tensor, w_bits, w_scale: Tensor, w_zero: Tensor,
                 bias: Optional[Tensor] = None, gelu: bool = False, out_dtype: torch.dtype = torch.float32,
                 requant: Optional[QParams] = None) -> Tensor:
    """:func:`packed_linear` on unpacked unsigned weight codes ``qw [N, K]`` (the optimiser's integer forward: no
    packing). On the Triton path the codes go to the GEMM as int8 through the ``int8`` loader, centred ``qw - zw``
    for weights of at most 7 bits (the arithmetic of the unpack-first path, bit-identical to :func:`packed_linear`),
    else stored as ``qw - code_offset(w_bits)``."""
    if not triton_enabled(a):
        return R.linear_codes(a, a_qp, qw, w_bits, w_scale, w_zero, bias, gelu, out_dtype, requant)
    _check_act_codes(a)
    P.check_bits(w_bits)
    if not torch.is_tensor(qw) or qw.dim() != 2 or qw.is_floating_point() or qw.dtype == torch.bool:
        raise TypeError(f"weight codes must be an integer [N, K] tensor, got "
                        f"{qw.dtype if torch.is_tensor(qw) else type(qw).__name__} {tuple(getattr(qw, 'shape', ()))}")
    _same_device(a, qw=qw)
    q8 = (qw.to(torch.int16) - P.code_offset(w_bits)).to(torch.int8).contiguous()
    n, k = q8.shape
    return _int_linear(a, a_qp, [q8], "int8", n, k, w_bits,
                       lambda: _row_sums(q8), w_scale, w_zero, bias, gelu, out_dtype, requant,
                       centered=P.qmax(w_bits) <= 127)


def linear_float_weight(a: Tensor, a_qp: QParams, w: Tensor, w_scale: Tensor, w_zero: Tensor, w_bits,
                        bias: Optional[Tensor] = None) -> Tensor:
    """:func:`linear_codes` of the codes ``quantize(w, w_scale, w_zero, w_bits)`` of a float weight ``w [N, K]``
    (per output channel ``w_scale, w_zero [N, 1]``; the zero point rounded), float32 out: the optimiser's integer
    forward, bit-identical to ``packed_linear`` of the packed codes. On the Triton path the int8 codes the GEMM
    reads come from one pass over ``w`` (centred ``q - zw`` for weights of at most 7 bits), with their sums."""
    if not triton_enabled(a):
        return R.linear_codes(a, a_qp, P.quantize(w.float(), w_scale, w_zero, w_bits), w_bits, w_scale.reshape(-1),
                              P.round_zero_point(w_zero, w_bits).reshape(-1), bias)
    _check_act_codes(a)
    P.check_bits(w_bits)
    if not torch.is_tensor(w) or w.dim() != 2 or not w.is_floating_point():
        raise TypeError(f"w must be a float [N, K] weight, got {getattr(w, 'dtype', type(w).__name__)} "
                        f"{tuple(getattr(w, 'shape', ()))}")
    _same_device(a, w=w, w_scale=w_scale, w_zero=w_zero)
    n, k = w.shape
    f32 = dict(dtype=torch.float32, device=a.device)
    sw = torch.as_tensor(w_scale, **f32).reshape(n, 1)
    zr = P.round_zero_point(torch.as_tensor(w_zero, **f32).reshape(n, 1), w_bits)
    q = P.code_values(w, sw, zr, w_bits)
    centered = P.qmax(w_bits) <= 127
    zw = (zr - P.code_offset(w_bits)).to(torch.int32)  # the zero point of the int8 storage form
    q8 = (q - (zr if centered else P.code_offset(w_bits))).to(torch.int8)
    colsum = q8.sum(1, dtype=torch.int32, keepdim=True)  # sums of the storage codes q - offset:
    if centered:
        colsum = colsum + k * zw  # sum(q - zr) + K (zr - offset)
    return _int_linear(a, a_qp, [q8], "int8", n, k, w_bits, None, w_scale, w_zero, bias, False, torch.float32, None,
                       centered, prepared=(sw.reshape(n), zw.reshape(n), colsum.reshape(n)))


def _check_act_codes(a: Tensor) -> None:
    if not torch.is_tensor(a) or a.dtype != torch.int8:
        raise TypeError(f"activation codes must be int8 (signed storage), got "
                        f"{a.dtype if torch.is_tensor(a) else type(a).__name__}; quantize them first")


def _int_linear(a: Tensor, a_qp: QParams, planes, fmt: str, n: int, k: int, w_bits, colsum: Optional[Callable],
                w_scale, w_zero, bias, gelu: bool, out_dtype: torch.dtype, requant: Optional[QParams],
                centered: bool = False, prepared: Optional[Tuple[Tensor, Tensor, Tensor]] = None) -> Tensor:
    """The checks and parameter preparation shared by :func:`packed_linear`, :func:`linear_codes` and
    :func:`linear_float_weight`; ``planes`` in the layout of ``fmt`` (``int8``: signed storage
    ``q - code_offset(w_bits)``), ``colsum()`` their row sums; ``centered`` (``int8`` codes of at most 7 bits): the
    GEMM gets ``q - zw`` (no activation row sums). ``prepared = (sw, zw, colsum)``: the weight's scales, storage
    zero points and code sums computed by the caller, ``planes`` already centred when ``centered``."""
    if a.dim() < 1 or a.shape[-1] != k:
        raise ValueError(f"activation codes have K={a.shape[-1] if a.dim() else None} but the weight has K={k}")
    if out_dtype not in _FLOATS:
        raise TypeError(f"out_dtype must be float32/float16/bfloat16, got {out_dtype}")
    _same_device(a, w_scale=w_scale, w_zero=w_zero, bias=bias)
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape [{n}], got {tuple(bias.shape)}")

    def weight_params():
        sw = torch.as_tensor(w_scale, dtype=torch.float32, device=a.device).reshape(-1).contiguous()
        zw = P.round_zero_point(torch.as_tensor(w_zero, dtype=torch.float32, device=a.device), w_bits).reshape(-1)
        if zw.numel() != n or sw.numel() != n:
            raise ValueError(f"w_scale and w_zero need one value per output channel ({n})")
        if fmt == "int8":
            zw = zw - P.code_offset(w_bits)
        return sw, zw.to(torch.int32).contiguous()

    def act_params():
        sa = _scalar("activation step s", a_qp.s, a)
        return sa, P.signed_zero_point(_scalar("activation zero point z", a_qp.z, a), a_qp.bits)
    if prepared is None:
        sw, zw = _memo(f"weight {fmt} {w_bits} {a.device}", (w_scale, w_zero), weight_params)
    else:
        sw, zw, sums = prepared
    sa, za = _memo(f"act signed {a_qp.bits} {a.device}", (a_qp.s, a_qp.z), act_params)
    rq_s = rq_zr = None
    rq_bits = 8.0
    if requant is not None:
        rq_s, rq_zr = _act_qparams(a, requant, columns=n)
        rq_bits = float(requant.bits)
    if prepared is None:
        if centered:
            planes = [(planes[0].to(torch.int16) - zw[:, None]).to(torch.int8)]
        sums = colsum()
    return L.packed_linear(a, planes, fmt, k, sums, sa, za, sw, zw, None if bias is None else bias.contiguous(),
                           bool(gelu), out_dtype, rq_s, rq_zr, rq_bits, centered)


# ---------------------------------------------------------------------------------------------- attention


_P_DEFAULTS = {}


def _default_p_qparams(bits, device) -> QParams:
    """The probability quantizer used when none is given: step ``1 / qmax``, zero point 0 (one per bits, device)."""
    key = (float(bits), device)
    if key not in _P_DEFAULTS:
        _P_DEFAULTS[key] = QParams(torch.tensor(1.0 / P.qmax(bits), device=device), torch.tensor(0.0, device=device),
                                   bits)
    return _P_DEFAULTS[key]


def quant_attention(q: Tensor, k: Tensor, v: Tensor, q_qp: QParams, k_qp: QParams, v_qp: QParams, scale: float,
                    p_qp: Optional[Union[QParams, SULQParams]] = None, rel_bias: Optional[Tensor] = None,
                    mask: Optional[Tensor] = None, heads_last: bool = False, requant: Optional[QParams] = None,
                    requant_r: Optional[Tensor] = None, requant_shift: Optional[Tensor] = None) -> Tensor:
    """Attention on int8 codes (see :func:`kernels.reference.quant_attention`); ``p_qp`` a uniform
    :class:`QParams` (integer ``P V``) or :class:`SULQParams` (table-dequantized ``P``, float ``P V``).

    ``q, k, v`` may be strided views (the slices of a qkv output ``[B, L, 3, H, D]`` are read in place). Returns
    float32 ``O [B, H, L, D]``, or ``[B, L, H, D]`` when ``heads_last``; with ``requant`` (the next linear's input
    quantizer, channels ``h * D + d``, optional rescale ``requant_r`` / ``requant_shift``) the int8 codes of
    :func:`quantize` of that output instead, from the kernel's epilogue."""
    if not triton_enabled(q):
        o = R.quant_attention(q, k, v, q_qp, k_qp, v_qp, scale, p_qp, rel_bias, mask)
        if heads_last or requant is not None:
            o = o.transpose(1, 2)
        if requant is not None:
            b, l, h, d = o.shape
            o = R.rescale_quantize(o.reshape(b, l, h * d), requant, requant_r, requant_shift).view(b, l, h, d)
            if not heads_last:
                o = o.transpose(1, 2).contiguous()
        return o
    R.check_qkv(q, k, v)
    _same_device(q, k=k, v=v, rel_bias=rel_bias, mask=mask, requant_r=requant_r, requant_shift=requant_shift)
    b, h, l, d = q.shape
    if d not in ATTENTION_HEAD_DIMS:
        raise ValueError(f"head dim {d} is not supported by the Triton attention kernels (supported: "
                         f"{', '.join(map(str, ATTENTION_HEAD_DIMS))}); use a model whose head dim is one of them, "
                         "or the reference path (kernels.ops.use_triton(False))")
    if rel_bias is not None and tuple(rel_bias.shape) != (h, l, l):
        raise ValueError(f"rel_bias must be [H, L, L] = {(h, l, l)}, got {tuple(rel_bias.shape)}")
    if mask is not None and (mask.dim() != 3 or tuple(mask.shape[1:]) != (l, l) or b % mask.shape[0]):
        raise ValueError(f"mask must be [nW, L, L] with B divisible by nW, got {tuple(mask.shape)} for B={b}")
    if p_qp is None:
        p_qp = _default_p_qparams(q_qp.bits, q.device)
    for qp in (q_qp, k_qp, v_qp, p_qp):
        P.check_bits(qp.bits)
    sulq = isinstance(p_qp, SULQParams)
    rq_s = rq_zr = rq_r = rq_sh = None
    rq_bits = 8.0
    if requant is not None:
        rq_s, rq_zr = _act_qparams(q, requant)
        rq_bits = float(requant.bits)
        rq_r, rq_sh = _channel_vecs(q, h * d, r=requant_r, shift=requant_shift)
    elif requant_r is not None or requant_shift is not None:
        raise ValueError("requant_r / requant_shift rescale the requantized output: pass requant too")

    def prepare():
        sq, sk, sv = (_scalar("step size s", qp.s, q) for qp in (q_qp, k_qp, v_qp))
        zq, zk, zv = (P.signed_zero_point(_scalar("zero point z", qp.z, q), qp.bits) for qp in (q_qp, k_qp, v_qp))
        qk_scale = (sq.double() * float(scale) * sk.double()).float()
        if sulq:
            eta = _scalar("SULQ shift eta", p_qp.eta, q)
            if _checking() and not bool((eta > 0).all()):
                raise ValueError(f"SULQ shift eta must be > 0, got {float(eta)}; re-initialise the quantizer")
            sp, zp = _act_qparams(q, QParams(p_qp.s, p_qp.z, p_qp.bits))
            x0 = _scalar("SULQ origin x0", p_qp.x0, q)
            table = P.sulq_table(eta, sp, zp, p_qp.bits, x0, bool(p_qp.pow2)).to(q.device).contiguous()
            return zq, zk, zv.float(), qk_scale, eta, x0, sp, zp, table, sv
        sp, zp = _act_qparams(q, p_qp)
        return zq, zk, zv, qk_scale, sp, zp, (sp.double() * sv.double()).float()
    params = (q_qp.s, q_qp.z, k_qp.s, k_qp.z, v_qp.s, v_qp.z, p_qp.s, p_qp.z) + ((p_qp.eta, p_qp.x0) if sulq else ())
    tag = f"attention {scale!r} {[qp.bits for qp in (q_qp, k_qp, v_qp, p_qp)]} {sulq and bool(p_qp.pow2)} {q.device}"
    prepared = _memo(tag, params, prepare)
    out = (bool(heads_last), rq_r, rq_sh, rq_s, rq_zr, rq_bits)
    if sulq:
        return L.quant_attention_sulq(q, k, v, rel_bias, mask, *prepared, float(p_qp.bits), *out)
    return L.quant_attention(q, k, v, rel_bias, mask, *prepared, float(p_qp.bits), *out)
