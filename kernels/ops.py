"""The one door to the quantized ops: the optimiser, the exported models and the benchmarks call these functions.

Two backends, chosen per call by the input tensor's device: CUDA tensors run the Triton kernels (registered as
``torch.ops.lowbit.*`` by :mod:`kernels.library`, so ``torch.compile`` traces through them without graph breaks),
CPU tensors run the CPU backend (:mod:`kernels.cpu`). One override, :func:`set_backend` (or :func:`using_backend`),
forces either: ``"triton"`` on CPU tensors runs the kernels through Triton's interpreter, which must be switched on
with ``TRITON_INTERPRET=1`` in the environment before Python starts (the test suite does); ``"cpu"`` on CUDA tensors
runs the CPU backend's plain torch code there. Both compute the integer arithmetic of :mod:`lowbit.primitives` bit for
bit (checked against :mod:`kernels.reference` by the tests).

Single ops take activation quantizers as :class:`lowbit.primitives.QParams` (per-tensor ``s``, unsigned ``z``);
codes are signed int8 storage. Layer ops (:func:`linear_layer`, :func:`mlp_layer`, :func:`attention_layer`,
:func:`vit_block`) take the packed layers of :mod:`export.runtime` (duck-typed: their tensors as attributes, listed
at :func:`kernels.cpu.linear_plan` and :func:`kernels.cpu.attention_plan`) and run float in, float out, with the
backend's constants cached on the layer per version of its tensors. Input checks (shapes, dtypes, devices) run here;
values are checked where they enter (a loaded file, the calibration), never with a host read per call.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Iterator, Optional, Tuple, Union

import torch
from torch import Tensor

from lowbit import packing
from lowbit import primitives as P
from lowbit.primitives import QParams, SULQParams

from . import checks as K
from . import cpu
from . import configs
from . import library as L
from .configs import ATTENTION_HEAD_DIMS
from .keep import kept

BACKENDS = ("triton", "cpu")
_OVERRIDE: list = [None]
_FLOATS = K.FLOATS


def set_backend(name: Optional[str]) -> None:
    """Force ``"triton"`` or ``"cpu"`` for every call whatever the tensors' device; None: by device again."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None (by the tensors' device), got {name!r}")
    _OVERRIDE[0] = name


@contextlib.contextmanager
def using_backend(name: Optional[str]) -> Iterator[None]:
    """:func:`set_backend` for the duration of a ``with`` block (the previous choice restored after)."""
    before = _OVERRIDE[0]
    set_backend(name)
    try:
        yield
    finally:
        _OVERRIDE[0] = before


def backend_for(t: Tensor) -> str:
    """``"triton"`` or ``"cpu"``: the override of :func:`set_backend`, else Triton for CUDA tensors."""
    if _OVERRIDE[0] is not None:
        return _OVERRIDE[0]
    return "triton" if t.is_cuda else "cpu"


def _triton(t: Tensor) -> bool:
    return backend_for(t) == "triton"


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


def _scalar(name: str, v, like: Tensor, n: int = 1) -> Tensor:
    """float32 ``[n]`` of ``v`` on ``like``'s device: a per-tensor scalar, or (``n > 1``) one value per column."""
    t = P.as_f32(v, like.device)
    if t.numel() != n:
        raise ValueError(f"{name} must be a per-tensor scalar, got shape {tuple(t.shape)}" if n == 1 else
                         f"{name} must hold one value per output column ({n}), got shape {tuple(t.shape)}")
    return t if t.shape == (n,) else t.view(n) if t.is_contiguous() else t.reshape(n)


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
            return tuple(torch.cat([P.as_f32(getattr(qp, f)).reshape(1).expand(int(n))
                                    for qp, n in zip(qps, sizes)]) for f in ("s", "z"))
    s, z = _memo(f"stacked {tuple(sizes)}", values, build)
    return QParams(s, z, qps[0].bits)


def _channel_vecs(x: Tensor, channels: Optional[int] = None, **vecs):
    """float32 contiguous copies (views when already so) of per-channel vectors, checked to have ``channels``
    (default ``x.shape[-1]``) entries; None stays None."""
    c = x.shape[-1] if channels is None else channels
    out = []
    for name, t in vecs.items():
        K.check_channel_vec(name, t, c)
        out.append(None if t is None else t.to(device=x.device, dtype=torch.float32).contiguous())
    return out


# ---------------------------------------------------------------------------------------------- quantize


def quantize(x: Tensor, qp: QParams, r: Optional[Tensor] = None, shift: Optional[Tensor] = None) -> Tensor:
    """int8 codes of ``(x - shift) / r``: ``clamp(round(x' / s) + z, 0, qmax) - offset(bits)``."""
    K.check_float_input(x)
    K.same_device(x, r=r, shift=shift)
    if not _triton(x):
        for name, t in (("r", r), ("shift", shift)):
            K.check_channel_vec(name, t, x.shape[-1])
        return cpu.quantize(x, qp, r, shift)
    s, zr = _act_qparams(x, qp)
    r, shift = _channel_vecs(x, r=r, shift=shift)
    return L.rescale_quantize(x, r, shift, s, zr, float(qp.bits))


def _checked_ln_inputs(x: Tensor, ln_weight, ln_bias, r, shift, **more) -> None:
    """The input checks of the LayerNorm-quantize ops (the CPU backend checks the vectors' widths here; the Triton
    path in :func:`_channel_vecs`)."""
    K.check_float_input(x)
    K.same_device(x, **more, ln_weight=ln_weight, ln_bias=ln_bias, r=r, shift=shift)
    if not _triton(x):
        for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias), ("r", r), ("shift", shift)):
            K.check_channel_vec(name, t, x.shape[-1])


def layernorm_quantize(x: Tensor, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], eps: float,
                       qp: QParams, r: Optional[Tensor] = None, shift: Optional[Tensor] = None) -> Tensor:
    """int8 codes of ``(LayerNorm(x) - shift) / r``."""
    _checked_ln_inputs(x, ln_weight, ln_bias, r, shift)
    if not _triton(x):
        return cpu.layernorm_quantize(x, ln_weight, ln_bias, eps, qp, r, shift)
    s, zr = _act_qparams(x, qp)
    lw, lb, r, shift = _channel_vecs(x, ln_weight=ln_weight, ln_bias=ln_bias, r=r, shift=shift)
    return L.layernorm_quantize(x, lw, lb, float(eps), r, shift, s, zr, float(qp.bits))


def add_layernorm_quantize(x: Tensor, delta: Tensor, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
                           eps: float, qp: QParams, r: Optional[Tensor] = None,
                           shift: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``(x_new, codes)``: the residual add ``x_new = x + delta`` (float32 sum, rounded to ``x``'s dtype: torch's
    ``(x + delta).to(x.dtype)``) and the int8 codes of ``(LayerNorm(x_new) - shift) / r``, one pass on Triton. For
    a residual whose ``delta`` cannot be added in its producer's epilogue (Swin: window reverse and roll between
    ``proj`` and the add). ``delta``: ``x``'s shape, any float dtype."""
    K.check_float_input(x)
    K.check_float_input(delta, "delta")
    if delta.shape != x.shape:
        raise ValueError(f"delta must have x's shape {tuple(x.shape)}, got {tuple(delta.shape)}")
    _checked_ln_inputs(x, ln_weight, ln_bias, r, shift, delta=delta)
    if not _triton(x):
        return cpu.add_layernorm_quantize(x, delta, ln_weight, ln_bias, eps, qp, r, shift)
    s, zr = _act_qparams(x, qp)
    lw, lb, r, shift = _channel_vecs(x, ln_weight=ln_weight, ln_bias=ln_bias, r=r, shift=shift)
    return L.add_layernorm_quantize(x, delta, lw, lb, float(eps), r, shift, s, zr, float(qp.bits))


# ---------------------------------------------------------------------------------------------- fake quant


def _check_rescale(x: Tensor, r: Optional[Tensor], shift: Optional[Tensor]) -> None:
    K.check_float_input(x)
    K.check_channel_vec("r", r, x.shape[-1])
    K.check_channel_vec("shift", shift, x.shape[-1])


def _fq_kernel_args(r, shift, s, z):
    """float32 contiguous ``(r, shift, s, z)`` for the fake-quant kernels (``s, z`` flattened; None stays None)."""
    return (None if r is None else P.f32(r).contiguous(), None if shift is None else P.f32(shift).contiguous(),
            P.f32(s).reshape(-1).contiguous(), P.f32(z).reshape(-1).contiguous())


def _fq_grads(g, x, args, bits, like) -> Tuple:
    """``(gx, gr, gshift, gs, gz)`` of the fake-quant kernels' backward, ``gs, gz`` summed to the shape and dtype of
    ``like = (r, shift, s, z)`` (None where that input is None)."""
    r, shift, s, z = like
    gx, g_rc, g_sz = L.fake_quantize_bwd(g, x, *args, float(bits))
    if args[2].numel() == 1:
        g_sz = g_sz.sum(1)
    gs, gz = g_sz.unbind(0)
    return (gx, None if r is None else _as_like(g_rc[0], r), None if shift is None else _as_like(g_rc[-1], shift),
            _as_like(gs, s), _as_like(gz, z))


def _as_like(t: Tensor, ref: Tensor) -> Tensor:
    """``t`` in ``ref``'s shape and dtype (no op recorded where it already is)."""
    t = t if t.shape == ref.shape else t.reshape(ref.shape)
    return t if t.dtype == ref.dtype else t.to(ref.dtype)


class TritonFakeQuantizeFn(torch.autograd.Function):
    """``fake_quantize((x - shift) / r, s, z)`` by :mod:`kernels.fake_quantize`; ``s, z`` per tensor (1 value) or
    per row of ``x`` viewed as ``[M, C]``. Gradients for x (STE), s, z (LSQ), r and shift, as
    :func:`lowbit.primitives.fake_quantize`."""

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


def _on(v, device) -> Tensor:
    """``v`` as a tensor on ``device``: itself when it is one there (``torch.as_tensor`` records an op even then)."""
    return v if torch.is_tensor(v) and v.device == device else torch.as_tensor(v, device=device)


def _fq_act_inputs(x: Tensor, qp: QParams, r: Optional[Tensor], shift: Optional[Tensor]):
    """The checked per-tensor ``(s, z)`` of an activation fake-quant on the Triton path."""
    K.check_float_input(x)
    K.same_device(x, r=r, shift=shift, s=qp.s, z=qp.z)
    P.check_bits(qp.bits)
    c = x.shape[-1]
    K.check_channel_vec("r", r, c)
    K.check_channel_vec("shift", shift, c)
    s, z = _on(qp.s, x.device), _on(qp.z, x.device)
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
    K.same_device(w, s=s, z=z)
    s, z = _on(s, w.device), _on(z, w.device)
    for name, t in (("s", s), ("z", z)):
        if t.numel() not in (1, w.shape[0]) or (t.numel() > 1 and t.shape[0] != w.shape[0]):
            raise ValueError(f"{name} must be per output channel [N, 1] = [{w.shape[0]}, 1] or a scalar, "
                             f"got shape {tuple(t.shape)}")
    if _checking():
        P.check_qparams(w.detach(), s.detach().float(), z.detach().float())
    return s, z


def fake_quantize(x: Tensor, qp: QParams, r: Optional[Tensor] = None, shift: Optional[Tensor] = None) -> Tensor:
    """Differentiable float32 ``fake_quantize((x - shift) / r)`` (per-tensor activation quantizer)."""
    if not _triton(x) or qp.bits == 16:
        _check_rescale(x, r, shift)
        return cpu.fake_quantize(x, qp, r, shift)
    s, z = _fq_act_inputs(x, qp, r, shift)
    return TritonFakeQuantizeFn.apply(x, r, shift, s, z, qp.bits)


def _weight_path(w: Tensor, bits) -> bool:
    return _triton(w) and bits != 16 and w.dtype in _FLOATS


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
    fake-quant tensors (:mod:`quant.int_forward`). The CPU backend differentiates
    :func:`kernels.cpu.fake_quantize` with autograd."""
    if not _triton(x) or qp.bits == 16:
        bits = qp.bits
        _check_rescale(x, r, shift)
        return _autograd_vjp(lambda x, r, shift, s, z: cpu.fake_quantize(x, QParams(s, z, bits), r, shift),
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
    return kept(w, "_lowbit_colsum", tuple(w.planes.values()), lambda: _colsum(w))


def _colsum(w: packing.PackedWeight) -> Tensor:
    return _row_sums(w.planes["q"][:, : w.k] if w.fmt == "int8" else packing.unpack(w))


_UNPACKED = [True]


def cache_unpacked(on: bool) -> None:
    """Whether the Triton backend keeps each packed weight's centred int8 codes once it has unpacked them for a
    GEMM of at least :data:`kernels.configs.UNPACK_MIN_M` rows (default on: one unpack per weight, not per forward,
    for one byte per weight of memory; off: unpacked on every such call, and a weight's kept copy is dropped at its
    next call)."""
    _UNPACKED[0] = bool(on)


def _unpacked_codes(w: packing.PackedWeight, planes, fmt: str, k: int, zw: Tensor, w_zero) -> Tensor:
    """``w``'s centred int8 codes ``[N, K] = w - zw[n]`` (:func:`kernels.library.unpack_codes`), kept on ``w``
    while its planes and the zero points ``w_zero`` it came from are the same tensors at the same versions (an
    inference tensor, which has no version counter, by identity)."""
    if not torch.is_tensor(w_zero):
        return L.unpack_codes(planes, fmt, k, zw)
    return kept(w, "_lowbit_unpacked", tuple(planes) + (w_zero,), lambda: L.unpack_codes(planes, fmt, k, zw))


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
                  requant: Optional[QParams] = None, residual: Optional[Tensor] = None) -> Tensor:
    """Integer linear on int8 codes and a packed weight: :func:`lowbit.primitives.int_linear_codes` of the unpacked
    codes, ``y = act(sa * sw[n] * sum_k (qa - za)(qw[n, k] - zw[n]) + bias[n])`` in ``out_dtype``, or its int8 codes
    under ``requant`` (one quantizer, or one per output column: :func:`stacked_qparams`); ``residual + y`` when a
    ``residual`` (``out_dtype``, the output's shape) is given, added in the GEMM's epilogue on Triton."""
    K.check_act_codes(a, w.k if isinstance(w, packing.PackedWeight) else None)
    _check_packed(w, a)
    if residual is not None and requant is not None:
        raise ValueError("residual is added to a float output; it cannot be combined with requant")
    _check_residual(residual, (*a.shape[:-1], w.n), out_dtype, a)
    if not _triton(a):
        y = cpu.linear_codes(a, a_qp, cpu.unpacked(w), w.bits, w_scale, w_zero, bias, gelu, out_dtype, requant)
        return y if residual is None else y.add_(residual)
    planes = [w.planes[name] for name, _ in packing.FORMATS[w.fmt].planes]
    return _int_linear(a, a_qp, planes, w.fmt, w.n, w.k, w.bits, lambda: weight_colsum(w), w_scale, w_zero, bias,
                       gelu, out_dtype, requant, cache_key=w, residual=residual)


def _check_residual(residual: Optional[Tensor], shape, dtype: torch.dtype, like: Tensor) -> None:
    """``residual`` (when given) must be a ``dtype`` tensor of the output's ``shape`` on ``like``'s device."""
    if residual is None:
        return
    if not torch.is_tensor(residual) or tuple(residual.shape) != tuple(shape) or residual.dtype != dtype:
        raise ValueError(f"residual must be a {dtype} tensor of the output's shape {tuple(shape)}, got "
                         f"{getattr(residual, 'dtype', type(residual).__name__)} "
                         f"{tuple(getattr(residual, 'shape', ()))}")
    K.same_device(like, residual=residual)


def linear_codes(a: Tensor, a_qp: QParams, qw: Tensor, w_bits, w_scale: Tensor, w_zero: Tensor,
                 bias: Optional[Tensor] = None, gelu: bool = False, out_dtype: torch.dtype = torch.float32,
                 requant: Optional[QParams] = None) -> Tensor:
    """:func:`packed_linear` on unpacked unsigned weight codes ``qw [N, K]`` (the optimiser's integer forward: no
    packing). On the Triton path the codes go to the GEMM as int8 through the ``int8`` loader, centred ``qw - zw``
    for weights of at most 7 bits (the arithmetic of the unpack-first path, bit-identical to :func:`packed_linear`),
    else stored as ``qw - code_offset(w_bits)``."""
    K.check_act_codes(a)
    if not _triton(a):
        K.check_act_codes(a, qw.shape[-1])
        return cpu.linear_codes(a, a_qp, qw, w_bits, w_scale, w_zero, bias, gelu, out_dtype, requant)
    P.check_bits(w_bits)
    if not torch.is_tensor(qw) or qw.dim() != 2 or qw.is_floating_point() or qw.dtype == torch.bool:
        raise TypeError(f"weight codes must be an integer [N, K] tensor, got "
                        f"{qw.dtype if torch.is_tensor(qw) else type(qw).__name__} {tuple(getattr(qw, 'shape', ()))}")
    K.same_device(a, qw=qw)
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
    if not _triton(a):
        K.check_act_codes(a, w.shape[-1])
        return cpu.linear_codes(a, a_qp, P.quantize(P.f32(w), w_scale, w_zero, w_bits), w_bits, w_scale.reshape(-1),
                              P.round_zero_point(w_zero, w_bits).reshape(-1), bias)
    K.check_act_codes(a)
    P.check_bits(w_bits)
    if not torch.is_tensor(w) or w.dim() != 2 or not w.is_floating_point():
        raise TypeError(f"w must be a float [N, K] weight, got {getattr(w, 'dtype', type(w).__name__)} "
                        f"{tuple(getattr(w, 'shape', ()))}")
    K.same_device(a, w=w, w_scale=w_scale, w_zero=w_zero)
    n, k = w.shape
    sw, zr = (t if t.shape == (n, 1) else t.reshape(n, 1) for t in (P.as_f32(w_scale, a.device),
                                                                      P.as_f32(w_zero, a.device)))
    zr = P.round_zero_point(zr, w_bits)
    q = P.code_values(w, sw, zr, w_bits)
    centered = P.qmax(w_bits) <= 127
    zw = (zr - P.code_offset(w_bits)).to(torch.int32)  # the zero point of the int8 storage form
    q8 = (q - (zr if centered else P.code_offset(w_bits))).to(torch.int8)
    colsum = q8.sum(1, dtype=torch.int32, keepdim=True)  # sums of the storage codes q - offset:
    if centered:
        colsum = colsum + k * zw  # sum(q - zr) + K (zr - offset)
    return _int_linear(a, a_qp, [q8], "int8", n, k, w_bits, None, w_scale, w_zero, bias, False, torch.float32, None,
                       centered, prepared=(sw.reshape(n), zw.reshape(n), colsum.reshape(n)))


def _int_linear(a: Tensor, a_qp: QParams, planes, fmt: str, n: int, k: int, w_bits, colsum: Optional[Callable],
                w_scale, w_zero, bias, gelu: bool, out_dtype: torch.dtype, requant: Optional[QParams],
                centered: bool = False, prepared: Optional[Tuple[Tensor, Tensor, Tensor]] = None,
                cache_key=None, residual: Optional[Tensor] = None) -> Tensor:
    """The checks and parameter preparation shared by :func:`packed_linear`, :func:`linear_codes` and
    :func:`linear_float_weight`; ``planes`` in the layout of ``fmt`` (``int8``: signed storage
    ``q - code_offset(w_bits)``), ``colsum()`` their row sums; ``centered`` (``int8`` codes of at most 7 bits): the
    GEMM gets ``q - zw`` (no activation row sums). ``prepared = (sw, zw, colsum)``: the weight's scales, storage
    zero points and code sums computed by the caller, ``planes`` already centred when ``centered``."""
    if a.dim() < 1 or a.shape[-1] != k:
        raise ValueError(f"activation codes have K={a.shape[-1] if a.dim() else None} but the weight has K={k}")
    if out_dtype not in _FLOATS:
        raise TypeError(f"out_dtype must be float32/float16/bfloat16, got {out_dtype}")
    K.same_device(a, w_scale=w_scale, w_zero=w_zero, bias=bias)
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape [{n}], got {tuple(bias.shape)}")

    def weight_params():
        sw = P.as_f32(w_scale, a.device).reshape(-1).contiguous()
        zw = P.round_zero_point(P.as_f32(w_zero, a.device), w_bits).reshape(-1)
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
        elif fmt != "int8" and cache_key is not None and configs.unpack_first(fmt, a.numel() // k):
            if _UNPACKED[0]:
                planes, fmt, centered = [_unpacked_codes(cache_key, planes, fmt, k, zw, w_zero)], "int8", True
            elif "_lowbit_unpacked" in cache_key.__dict__:
                object.__delattr__(cache_key, "_lowbit_unpacked")
        sums = colsum()
    return L.packed_linear(a, planes, fmt, k, sums, sa, za, sw, zw, None if bias is None else bias.contiguous(),
                           bool(gelu), out_dtype, rq_s, rq_zr, rq_bits, centered, residual)


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
    """Attention on int8 codes (:func:`lowbit.primitives.int_attention`); ``p_qp`` a uniform
    :class:`QParams` (integer ``P V``) or :class:`SULQParams` (table-dequantized ``P``, float ``P V``).

    ``q, k, v`` may be strided views (the slices of a qkv output ``[B, L, 3, H, D]`` are read in place). Returns
    float32 ``O [B, H, L, D]``, or ``[B, L, H, D]`` when ``heads_last``; with ``requant`` (the next linear's input
    quantizer, channels ``h * D + d``, optional rescale ``requant_r`` / ``requant_shift``) the int8 codes of
    :func:`quantize` of that output instead, from the kernel's epilogue."""
    K.check_qkv(q, k, v)
    K.same_device(q, k=k, v=v, rel_bias=rel_bias, mask=mask, requant_r=requant_r, requant_shift=requant_shift)
    K.check_attention_extras(q, rel_bias, mask)
    if not _triton(q):
        return cpu.quant_attention(q, k, v, q_qp, k_qp, v_qp, scale, p_qp, rel_bias, mask, heads_last, requant,
                                   requant_r, requant_shift)
    b, h, l, d = q.shape
    if d not in ATTENTION_HEAD_DIMS:
        raise ValueError(f"head dim {d} is not supported by the Triton attention kernels (supported: "
                         f"{', '.join(map(str, ATTENTION_HEAD_DIMS))}); use a model whose head dim is one of them, "
                         "or the CPU backend (kernels.ops.set_backend('cpu'))")
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
            return zq, zk, P.f32(zv), qk_scale, eta, x0, sp, zp, table, sv
        sp, zp = _act_qparams(q, p_qp)
        return zq, zk, zv, qk_scale, sp, zp, (sp.double() * sv.double()).float()
    params = (q_qp.s, q_qp.z, k_qp.s, k_qp.z, v_qp.s, v_qp.z, p_qp.s, p_qp.z) + ((p_qp.eta, p_qp.x0) if sulq else ())
    tag = f"attention {scale!r} {[qp.bits for qp in (q_qp, k_qp, v_qp, p_qp)]} {sulq and bool(p_qp.pow2)} {q.device}"
    prepared = _memo(tag, params, prepare)
    out = (bool(heads_last), rq_r, rq_sh, rq_s, rq_zr, rq_bits)
    if sulq:
        return L.quant_attention_sulq(q, k, v, rel_bias, mask, *prepared, float(p_qp.bits), *out)
    return L.quant_attention(q, k, v, rel_bias, mask, *prepared, float(p_qp.bits), *out)


# ---------------------------------------------------------------------------------------------- layers


def _input_codes(x: Tensor, layer) -> Tensor:
    if layer.ln_eps is not None:
        return layernorm_quantize(x, layer.ln_weight, layer.ln_bias, layer.ln_eps, layer.in_qp)
    return quantize(x, layer.in_qp, layer.r, layer.shift)


def _layer_codes(a: Tensor, layer, gelu: bool = False, requant: Optional[QParams] = None,
                 residual: Optional[Tensor] = None) -> Tensor:
    return packed_linear(a, layer.in_qp, layer.packed(), layer.w_scale, layer.w_zero, layer.bias, gelu=gelu,
                         requant=requant, residual=residual)


def linear_layer(x: Tensor, layer, gelu: bool = False) -> Tensor:
    """float32 ``layer(x)`` of a packed linear (:class:`export.runtime.PackedLinear`) on float ``x [..., K]``: its
    input quantized (LayerNorm fused, or rescaled), the integer GEMM, exact-erf GELU when ``gelu``."""
    if not _triton(x):
        return cpu.linear_layer(x, layer, gelu)
    return _layer_codes(_input_codes(x, layer), layer, gelu)


def mlp_layer(x: Tensor, fc1, fc2, residual: Optional[Tensor] = None) -> Tensor:
    """``fc2(GELU(fc1(x)))`` of packed linears, plus ``residual`` (float32, ``x``'s shape) when given; fc1's output
    goes to fc2's int8 codes in its epilogue, the residual is added in fc2's."""
    _check_residual(residual, x.shape, torch.float32, x)
    if not _triton(x):
        y = cpu.mlp_layer(x, fc1, fc2)
        return y if residual is None else y.add_(residual)
    return _layer_codes(_layer_codes(_input_codes(x, fc1), fc1, gelu=True, requant=fc2.in_qp), fc2,
                        residual=residual)


def attention_layer(x: Tensor, attn, mask: Optional[Tensor] = None, residual: Optional[Tensor] = None) -> Tensor:
    """``proj(attention(qkv(x)))`` of a packed attention (:class:`export.runtime.PackedViTAttention` /
    ``PackedWindowAttention``) for ``x [B, L, C]`` (``mask [nW, L, L]``: Swin's shifted windows), plus ``residual``
    (float32, ``x``'s shape) when given. On Triton the qkv GEMM's epilogue writes the Q, K, V codes, the attention
    reads them in place from ``[B, L, 3, H, D]`` and its epilogue writes ``proj``'s input codes heads-last: no float
    activation in between; the residual is added in ``proj``'s epilogue."""
    _check_residual(residual, x.shape, torch.float32, x)
    if not _triton(x):
        y = cpu.attention_layer(x, attn, mask)
        return y if residual is None else y.add_(residual)
    b, n, _ = x.shape
    qps = [attn.qp(name) for name in "qkv"]
    per = attn.qkv.out_features // 3
    qkv = _layer_codes(_input_codes(x, attn.qkv), attn.qkv, requant=stacked_qparams(qps, (per,) * 3))
    q, k, v = qkv.view(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    proj = attn.proj
    rel_bias = attn.rel_pos_bias() if hasattr(attn, "rel_pos_bias") else None
    o = quant_attention(q, k, v, *qps, attn.scale, attn.qp("p"), rel_bias=rel_bias,
                        mask=None if mask is None else P.f32(mask), heads_last=True, requant=proj.in_qp,
                        requant_r=proj.r, requant_shift=proj.shift)
    return _layer_codes(o.view(b, n, -1), proj, residual=residual)


def vit_block(x: Tensor, attn, mlp) -> Tensor:
    """``x + attn(x)``, then ``+ mlp(.)``: a timm ViT block whose LayerNorms are fused into ``attn.qkv`` and
    ``mlp.fc1`` (on the CPU one function over the cached constants, :func:`kernels.cpu.vit_block`; on Triton the
    residual sums of a float32 ``x`` are added in ``proj``'s and ``fc2``'s GEMM epilogues)."""
    if not _triton(x):
        return cpu.vit_block(x, cpu.block_plan(attn, mlp))
    if x.dtype != torch.float32:
        x = x + attention_layer(x, attn)
        return x + mlp_layer(x, mlp.fc1, mlp.fc2)
    x = attention_layer(x, attn, residual=x)
    return mlp_layer(x, mlp.fc1, mlp.fc2, residual=x)


def checked_once(x: Tensor, owner, layers, blocks=()):
    """Context for one forward of ``owner`` (a model) on input ``x`` whose packed layers are ``layers`` and
    flattened ViT blocks ``blocks`` (``(attn, mlp)`` pairs): on the CPU backend one check of all their tensors at the
    start stands for the per-layer checks of the cached constants (:func:`kernels.cpu.checked_once`); nothing on
    Triton."""
    return contextlib.nullcontext() if _triton(x) else cpu.checked_once(owner, layers, blocks)


def prepare(layer) -> None:
    """Compute a packed layer's cached constants now (on the CPU backend: unpacked weights, scales, tables), so
    the first call does not, and its quantizers are checked (ValueError naming the layer)."""
    t = layer.w_scale if hasattr(layer, "w_scale") else layer.p_s
    if _triton(t):
        if hasattr(layer, "w_scale"):
            weight_colsum(layer.packed())
        return
    cpu.plan_of(layer)


def cached_tensors(layer) -> list:
    """The tensors a layer's cached constants hold (for memory accounting)."""
    return cpu.cached_tensors(layer)
