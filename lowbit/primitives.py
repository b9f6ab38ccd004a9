"""The quantization math, written once. Kernels, references, modules and the exporter all call this module.

Codes
-----
``n_levels(b) = 3`` for ternary (``b == 1.58``), else ``2**b``; ``qmax = n_levels - 1``. I&S-ViT's published
SULQ grid has ``2**b + 1`` levels (codes ``0..2**b``): its width is ``sulq_grid_bits(b) = log2(2**b + 1)``, as
ternary's 1.58 is ``log2(3)``.
Uniform asymmetric quantizer with step ``s > 0`` and integer zero point ``z`` in ``[0, qmax]``::

    q     = clamp(round(x / s) + z, 0, qmax)          round = half-to-even (torch.round, rint)
    x_hat = (q - z) * s

Weights use one ``(s, z)`` per output channel (``s, z`` of shape ``[N, 1]`` for ``W [N, K]``), activations
one per tensor. Ternary weights are the case ``qmax = 2, z = 1``: levels ``{-1, 0, +1} * s``.

Storage
-------
``uint8`` tensors hold unsigned codes ``q``. ``int8`` tensors hold *signed* codes ``q - offset(b)`` with
``offset(b) = n_levels // 2`` (128 for 8 bits, 1 for ternary), so every width fits an int8 container and
``tl.dot`` can consume it (all but the 257-level SULQ grid, whose unsigned codes are stored in ``int16``). In
signed form the quantizer reads ``qs = clamp(round(x/s) + zs, -offset, qmax - offset)`` with ``zs = z - offset``; dequantization ``(qs - zs) * s`` is unchanged.

Integer GEMM
------------
For stored codes ``a [M, K]`` (zero point ``za``, scale ``sa``) and ``w [N, K]`` (``zw[n]``, ``sw[n]``)::

    y[m, n] = sa * sw[n] * sum_k (a[m,k] - za)(w[n,k] - zw[n]) + bias[n]
            = sa * sw[n] * (acc[m,n] - zw[n] * rowsum_a[m] - za * colsum_w[n] + K * za * zw[n]) + bias[n]

with ``acc = a @ w.T`` accumulated in int32 and ``rowsum_a[m] = sum_k a[m,k]``, ``colsum_w[n] = sum_k w[n,k]``.
The zero points are those of the stored form (signed zero points for int8 containers).

Rescale / shift
---------------
A linear ``y = W x + b`` whose input is normalised per channel ``x' = (x - shift) / r`` keeps its output with
``W' = W * r`` (column ``k`` times ``r[k]``) and ``b' = b + W @ shift``: ``W' x' + b' = W x + b``.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

TERNARY = 1.58


def sulq_grid_bits(bits) -> float:
    """Width of I&S-ViT's published SULQ forward grid at ``bits``: ``2^bits + 1`` levels, ``log2(2^bits + 1)``."""
    return math.log2(2 ** int(bits) + 1)


_LEVELS = {TERNARY: 3, **{b: 2 ** b for b in range(2, 9)}, **{sulq_grid_bits(b): 2 ** b + 1 for b in range(2, 9)}}
#: every width a quantizer takes: 1.58 (ternary), 2..8, and the SULQ grids of :func:`sulq_grid_bits`
VALID_BITS = tuple(_LEVELS)

# ----------------------------------------------------------------------------------------------------------
# bit-width helpers and validation


class QParams(NamedTuple):
    """Per-tensor (activations) or per-channel (weights, ``[N]`` or ``[N, 1]``) step, unsigned zero point, bits."""

    s: Tensor
    z: Tensor
    bits: float


def f32(t: Tensor) -> Tensor:
    """``t`` as float32: ``t`` itself when it is (``Tensor.float()`` records a no-op ``aten::to`` even then)."""
    return t if t.dtype == torch.float32 else t.float()


def as_f32(v, device=None) -> Tensor:
    """float32 tensor of ``v`` on ``device`` (default: where it is): ``v`` itself when it already is one, with no
    op recorded (``torch.as_tensor`` records an ``aten::to`` even then)."""
    if torch.is_tensor(v) and v.dtype == torch.float32 and (device is None or v.device == torch.device(device)):
        return v
    return torch.as_tensor(v, dtype=torch.float32, device=device)


def check_bits(bits) -> None:
    if bits not in _LEVELS:
        raise ValueError(f"bits must be one of 1.58 (ternary), 2..8 or a SULQ grid log2(2^b + 1), got {bits!r}")


def n_levels(bits) -> int:
    check_bits(bits)
    return _LEVELS[bits]


def qmax(bits) -> int:
    return n_levels(bits) - 1


def code_offset(bits) -> int:
    """Offset between unsigned codes and the signed int8 storage: ``qs = q - offset``."""
    return n_levels(bits) // 2


def signed_range(bits) -> Tuple[int, int]:
    o = code_offset(bits)
    return -o, qmax(bits) - o


_VALUE_CHECKS = [True]


@contextmanager
def unchecked_values() -> Iterator[None]:
    """Skip the checks that read tensor values back to the host (finite inputs, positive steps): one host-device
    sync each, on every call. For loops whose inputs were checked where they entered (the optimiser's steps, which
    watch for divergence on the device instead). Type, shape and bit-width checks stay."""
    _VALUE_CHECKS.append(False)
    try:
        yield
    finally:
        _VALUE_CHECKS.pop()


def value_checks() -> bool:
    """Whether value checks run here (not inside :func:`unchecked_values`)."""
    return _VALUE_CHECKS[-1]


def _check_finite(name: str, t: Tensor) -> None:
    if not torch.is_tensor(t):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if value_checks() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf; clean the input (e.g. torch.nan_to_num) before quantizing")


def check_step(s: Tensor) -> None:
    _check_finite("step size s", s)
    if value_checks() and not bool((s > 0).all()):
        raise ValueError(f"step size s must be > 0 everywhere (min is {float(s.min()):.3g}); re-initialise it")


def check_qparams(x: Tensor, s: Tensor, z: Tensor) -> None:
    _check_finite("x", x)
    check_step(s)
    _check_finite("zero point z", as_f32(z))
    for name, t in (("s", s), ("z", z)):
        if torch.is_tensor(t):
            try:
                torch.broadcast_shapes(t.shape, x.shape)
            except RuntimeError:
                raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast to x of shape "
                                 f"{tuple(x.shape)}; use a scalar (per tensor) or [N, 1] (per channel)") from None


def round_zero_point(z: Tensor, bits) -> Tensor:
    """The integer zero point actually used: ``clamp(round(z), 0, qmax)``."""
    return torch.clamp(torch.round(z), 0, qmax(bits))


# ----------------------------------------------------------------------------------------------------------
# quantize / dequantize


def quantize(x: Tensor, s: Tensor, z: Tensor, bits, signed: bool = False) -> Tensor:
    """Codes of ``x``: ``uint8`` unsigned ``q``, or ``int8`` signed ``q - offset`` when ``signed`` (``int16``
    unsigned for a grid of more than 256 levels)."""
    s = as_f32(s, x.device)
    z = as_f32(z, x.device)
    check_bits(bits)
    check_qparams(x, s, z)
    q = code_values(x, s, round_zero_point(z, bits), bits)
    if n_levels(bits) > 256:
        if signed:
            raise ValueError(f"{n_levels(bits)} levels do not fit the signed int8 storage; use unsigned codes")
        return q.to(torch.int16)
    if signed:
        return (q - code_offset(bits)).to(torch.int8)
    return q.to(torch.uint8)


def code_values(x: Tensor, s: Tensor, zr: Tensor, bits) -> Tensor:
    """The unsigned codes ``clamp(round(x / s) + zr, 0, qmax)`` as float32 (``zr`` the rounded zero point; no
    checks): the one formula behind :func:`quantize` and the optimiser's weight codes."""
    return torch.clamp(torch.round(f32(x) / s) + zr, 0, qmax(bits))


def unsigned_codes(q: Tensor, bits) -> Tensor:
    """int64 unsigned codes ``q`` from unsigned storage (uint8/wider ints) or signed int8 storage (``+ offset``)."""
    if q.dtype == torch.int8:
        return q.long() + code_offset(bits)
    if q.dtype in (torch.uint8, torch.int16, torch.int32, torch.int64):
        return q.long()
    raise TypeError(f"codes must be an integer tensor (uint8 unsigned or int8 signed), got {q.dtype}")


def dequantize(q: Tensor, s: Tensor, z: Tensor, bits) -> Tensor:
    """``(q - z) * s`` in float32; ``q`` may be unsigned (uint8) or signed storage (int8)."""
    check_bits(bits)
    s = as_f32(s, q.device)
    z = round_zero_point(as_f32(z, q.device), bits)
    return (unsigned_codes(q, bits).float() - z) * s


def _reduce_to(g: Tensor, shape: torch.Size) -> Tensor:
    if g.shape == shape:
        return g
    if len(shape) == 0:
        return g.sum()
    lead = g.dim() - len(shape)
    g = g.sum(dim=tuple(range(lead))) if lead > 0 else g
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    return g.sum(dim=dims, keepdim=True) if dims else g


def lsq_grads(x: Tensor, s: Tensor, z: Tensor, bits, grad_out: Tensor):
    """Straight-through / LSQ gradients of ``x_hat = fake_quantize(x, s, z)`` (unreduced, x-shaped).

    inside ``0 <= round(x/s)+z <= qmax``: d/dx = 1, d/ds = round(x/s) - x/s, d/dz = 0
    below (q = 0):                          d/dx = 0, d/ds = -z,              d/dz = -s
    above (q = qmax):                       d/dx = 0, d/ds = qmax - z,        d/dz = -s
    ``z`` reaches the rounding through a straight-through estimator (zero gradient where it is clamped).
    """
    zi = round_zero_point(z, bits)
    xs = x / s
    r = torch.round(xs)
    v = r + zi
    lo, hi = v < 0, v > qmax(bits)
    inside = ~(lo | hi)
    gx = grad_out * inside
    ds = torch.where(inside, r - xs, torch.where(lo, -zi, qmax(bits) - zi))
    gs = grad_out * ds
    z_live = (torch.round(z) >= 0) & (torch.round(z) <= qmax(bits))
    gz = grad_out * torch.where(inside, torch.zeros_like(xs), -s) * z_live
    return gx, gs, gz


class FakeQuantizeFn(torch.autograd.Function):
    """``x_hat = (clamp(round(x/s) + z, 0, qmax) - z) * s`` with the STE/LSQ backward of :func:`lsq_grads`."""

    @staticmethod
    def forward(ctx, x, s, z, bits):
        ctx.save_for_backward(x, s, z)
        ctx.bits = bits
        zi = round_zero_point(z, bits)
        q = torch.clamp(torch.round(x / s) + zi, 0, qmax(bits))
        return (q - zi) * s

    @staticmethod
    def backward(ctx, g):
        x, s, z = ctx.saved_tensors
        gx, gs, gz = lsq_grads(x, s, z, ctx.bits, g)
        return (gx if ctx.needs_input_grad[0] else None,
                _reduce_to(gs, s.shape) if ctx.needs_input_grad[1] else None,
                _reduce_to(gz, z.shape) if ctx.needs_input_grad[2] else None,
                None)


def fake_quantize(x: Tensor, s: Tensor, z: Tensor, bits, check: bool = True) -> Tensor:
    """Differentiable quantize-dequantize in float32 or float64 (STE for x, LSQ for s and z). ``bits == 16`` is identity."""
    if bits == 16:
        return x
    dt = torch.promote_types(x.dtype, torch.float32)
    s = torch.as_tensor(s, device=x.device).to(dt)
    z = torch.as_tensor(z, device=x.device).to(dt)
    if check:
        check_bits(bits)
        check_qparams(x.detach(), s.detach(), z.detach())
    return FakeQuantizeFn.apply(x.to(dt), s, z, bits)


def round_ste(x: Tensor) -> Tensor:
    """``round`` forward, identity backward."""
    return x + (torch.round(x) - x).detach()


# ----------------------------------------------------------------------------------------------------------
# initialisation


def percentile(x: Tensor, pct: float, dim: Optional[int] = None) -> Tensor:
    """Nearest-rank percentile (``pct`` in [0, 100]) of ``x``, over all elements or along ``dim`` (kept)."""
    if not 0.0 <= pct <= 100.0:
        raise ValueError(f"percentile must be within [0, 100], got {pct}")
    if dim is None:
        flat = x.detach().float().reshape(-1)
        k = int(round(pct / 100.0 * (flat.numel() - 1))) + 1
        return flat.kthvalue(k).values
    n = x.shape[dim]
    k = int(round(pct / 100.0 * (n - 1))) + 1
    return x.detach().float().kthvalue(k, dim=dim, keepdim=True).values


def qparams_from_range(lo: Tensor, hi: Tensor, bits) -> Tuple[Tensor, Tensor]:
    """``(s, z)`` covering ``[min(lo, 0), max(hi, 0)]`` (zero exactly representable).

    uniform: ``s = (hi - lo) / qmax``, ``z = clamp(round(-lo / s), 0, qmax)``;
    ternary: ``s = max(|lo|, |hi|)``, ``z = 1``.
    """
    lo = torch.clamp(as_f32(lo), max=0.0)
    hi = torch.clamp(as_f32(hi), min=0.0)
    eps = 1e-8
    if bits == TERNARY:
        s = torch.clamp(torch.maximum(-lo, hi), min=eps)
        return s, torch.ones_like(s)
    s = torch.clamp((hi - lo) / qmax(bits), min=eps)
    z = torch.clamp(torch.round(-lo / s), 0, qmax(bits))
    return s, z


def init_act_qparams(x: Tensor, bits, percentiles: Sequence[float] = (0.01, 99.99)) -> Tuple[Tensor, Tensor]:
    """Per-tensor ``(s, z)`` (0-d tensors) from the ``percentiles`` of a calibration batch."""
    _check_finite("calibration activations", x)
    lo, hi = percentile(x, percentiles[0]), percentile(x, percentiles[1])
    return qparams_from_range(lo, hi, bits)


def init_weight_qparams(w: Tensor, bits, percentiles: Sequence[float] = (0.0, 100.0),
                        search: Optional[bool] = None) -> Tuple[Tensor, Tensor]:
    """Per-output-channel ``(s, z)`` of shape ``[N, 1]`` for ``w [N, K]``.

    From the per-row ``percentiles``; with ``search`` (default for ternary) the range is shrunk by the factor
    in ``linspace(0.05, 1, 96)`` that minimises each row's squared quantization error.
    """
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(w.shape)}")
    _check_finite("weight", w)
    w = w.detach().float()
    lo, hi = percentile(w, percentiles[0], dim=1), percentile(w, percentiles[1], dim=1)
    s, z = qparams_from_range(lo, hi, bits)
    if search is None:
        search = bits == TERNARY
    if not search:
        return s, z
    best_err = torch.full_like(s, float("inf"))
    best_s, best_z = s.clone(), z.clone()
    for t in torch.linspace(0.05, 1.0, 96).tolist():
        st, zt = qparams_from_range(lo * t, hi * t, bits)
        err = (fake_quantize(w, st, zt, bits, check=False) - w).pow(2).sum(dim=1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_z = torch.where(better, st, best_s), torch.where(better, zt, best_z)
    return best_s, best_z


#: the percentiles I&S-ViT's authors search (their ``UniformQuantizer.init_quantization_scale``)
PUBLISHED_ACT_PCTS = (0.999, 0.9999, 0.99999)
PUBLISHED_WEIGHT_PCTS = (0.97, 0.98, 0.99, 0.995, 0.9995, 0.9997, 0.9999, 0.99995, 0.99999)


def _quantile_sorted(v: Tensor, q: float) -> Tensor:
    """The ``q``-quantile of each row of the row-sorted ``v [R, K]``, ``[R, 1]``, by linear interpolation between
    ranks (``torch.quantile``'s and ``numpy.percentile``'s default)."""
    pos = q * (v.shape[1] - 1)
    i = int(math.floor(pos))
    j = min(i + 1, v.shape[1] - 1)
    return torch.lerp(v[:, i:i + 1], v[:, j:j + 1], pos - i)


def init_qparams_searched(x: Tensor, bits, pcts: Sequence[float]) -> Tuple[Tensor, Tensor]:
    """Per-row ``(s, z)`` ``[R, 1]`` of ``x [R, K]`` by the authors' percentile search (I&S-ViT): for each ``pct``
    the range ``[quantile(1 - pct), quantile(pct)]`` of the row, and the ``pct`` whose quantization has the
    smallest ``sum((x_hat - x)^2)`` wins (the first on a tie). The range is :func:`qparams_from_range`'s (zero
    inside it, the zero point in ``[0, qmax]``, as the deployed codes need; the authors leave both free)."""
    if x.dim() != 2 or x.shape[1] == 0:
        raise ValueError(f"x must be a non-empty 2-D [R, K] tensor, got shape {tuple(x.shape)}")
    _check_finite("calibration tensor", x)
    x = x.detach().float()
    v = x.sort(dim=1).values
    best_err = best_s = best_z = None
    for pct in pcts:
        s, z = qparams_from_range(_quantile_sorted(v, 1.0 - pct), _quantile_sorted(v, pct), bits)
        err = (fake_quantize(x, s, z, bits, check=False) - x).pow(2).sum(dim=1, keepdim=True)
        if best_err is None:
            best_err, best_s, best_z = err, s, z
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s, best_z


# ----------------------------------------------------------------------------------------------------------
# channel rescale / shift


def layernorm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """LayerNorm over the last dim in float32: ``(x - mean) / sqrt(var + eps) * weight + bias`` (biased var)."""
    x = f32(x)
    mean = x.mean(dim=-1, keepdim=True)
    xc = x - mean
    var = (xc * xc).mean(dim=-1, keepdim=True)
    y = xc / torch.sqrt(var + eps)
    if weight is not None:
        y = y * f32(weight)
    if bias is not None:
        y = y + f32(bias)
    return y


def apply_rescale(x: Tensor, r: Optional[Tensor] = None, shift: Optional[Tensor] = None) -> Tensor:
    """``x' = (x - shift) / r`` along the last dimension (either may be None)."""
    if shift is not None:
        x = x - shift
    if r is not None:
        x = x / r
    return x


def fold_rescale(weight: Tensor, bias: Optional[Tensor], r: Optional[Tensor] = None,
                 shift: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``W' = W * r`` (per input column), ``b' = b + W @ shift``: compensates :func:`apply_rescale`."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    for name, t in (("r", r), ("shift", shift)):
        if t is not None and t.shape != (k,):
            raise ValueError(f"{name} must have shape [{k}] (one per input channel), got {tuple(t.shape)}")
    b = torch.zeros(n, dtype=weight.dtype, device=weight.device) if bias is None else bias
    if shift is not None:
        b = b + weight @ shift.to(weight.dtype)
    w = weight * r.to(weight.dtype) if r is not None else weight
    return w, b


def fold_into_layernorm(ln_weight: Tensor, ln_bias: Tensor, r: Tensor, shift: Tensor) -> Tuple[Tensor, Tensor]:
    """LayerNorm affine that emits :func:`apply_rescale` of its output: ``gamma' = gamma / r``,
    ``beta' = (beta - shift) / r``, so ``LN'(x) = (LN(x) - shift) / r`` (RepQ-ViT / I&S-ViT reparameterisation)."""
    c = ln_weight.shape[0]
    for name, t in (("ln_bias", ln_bias), ("r", r), ("shift", shift)):
        if t is None or tuple(t.shape) != (c,):
            raise ValueError(f"{name} must have shape [{c}] (one per LayerNorm channel), got "
                             f"{None if t is None else tuple(t.shape)}")
    r, shift = (t if t.dtype == ln_weight.dtype else t.to(ln_weight.dtype) for t in (r, shift))
    return ln_weight / r, (ln_bias - shift) / r


def channelwise_to_layerwise(s: Tensor, z: Tensor, bits) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """RepQ-ViT's reparameterisation of a per-channel quantizer ``(s[c], z[c])`` (integer ``z``) into a layer-wise
    ``(s~, z~) = (mean s, round(mean z))`` on the rescaled input ``(x - shift) / r`` with ``r = s / s~`` and
    ``shift = -s (z - z~)``: ``round(x'/s~) + z~ == round(x/s[c]) + z[c]`` (same codes). Returns
    ``(s~, z~, r, shift)``."""
    st = s.mean()
    zt = round_zero_point(z.mean(), bits)
    return st, zt, s / st, -s * (z - zt)


def smooth_rescale_shift(x_lo: Tensor, x_hi: Tensor, weight: Tensor, alpha: float = 0.5,
                         eps: float = 1e-5) -> Tuple[Tensor, Tensor]:
    """SmoothQuant-style initial ``(r, shift)`` from per-channel activation ranges ``[x_lo, x_hi]``.

    ``shift = (x_lo + x_hi) / 2`` centres each channel; ``r = a^alpha / m^(1 - alpha)`` with
    ``a = (x_hi - x_lo) / 2`` the centred half-range and ``m = max_n |W[n, k]|``, so the rescaled
    activation range ``a / r = a^(1-alpha) m^(1-alpha)`` and the rescaled weight column ``m r`` meet.
    """
    shift = (x_lo + x_hi) / 2
    a = torch.clamp((x_hi - x_lo) / 2, min=eps)
    m = torch.clamp(weight.detach().abs().amax(dim=0).float(), min=eps)
    r = torch.clamp(a.pow(alpha) / m.pow(1 - alpha), min=eps)
    return r, shift


# ----------------------------------------------------------------------------------------------------------
# integer GEMM with zero points


def int_gemm(a: Tensor, w: Tensor, za, zw) -> Tensor:
    """``sum_k (a[..., m, k] - za)(w[..., n, k] - zw[n])`` as int32, via ``a @ w^T`` and row/column-sum corrections.

    ``a [..., M, K]`` and ``w [..., N, K]`` are integer codes (any integer dtype, leading dims broadcast);
    ``za`` an integer scalar, ``zw`` an integer scalar or ``[N]`` / ``[N, 1]``.
    """
    if a.dim() < 2 or w.dim() < 2 or a.shape[-1] != w.shape[-1]:
        raise ValueError(f"int_gemm needs a [M, K] and w [N, K] with equal K, got {tuple(a.shape)} and {tuple(w.shape)}")
    if a.is_floating_point() or w.is_floating_point():
        raise TypeError(f"int_gemm needs integer codes, got {a.dtype} and {w.dtype}")
    k = a.shape[-1]
    bound = _code_bound(a) * _code_bound(w)
    ai, wi = a.to(torch.int32), w.to(torch.int32)
    za = torch.as_tensor(za, device=a.device).to(torch.int32)
    zw = torch.as_tensor(zw, device=a.device).to(torch.int32).reshape(-1)
    acc = _exact_matmul(ai, wi.transpose(-1, -2), bound)
    rowsum = ai.sum(dim=-1, dtype=torch.int32).unsqueeze(-1)
    colsum = wi.sum(dim=-1, dtype=torch.int32).unsqueeze(-2)
    return acc - zw * rowsum - za * colsum + k * za * zw


def _code_bound(t: Tensor) -> int:
    """``max |t|`` for integer codes: from the dtype for int8 / uint8 (no read of the values), else measured."""
    if t.dtype == torch.int8:
        return 128
    if t.dtype == torch.uint8:
        return 255
    return int(t.abs().max()) if t.numel() else 0


def exact_dtype(k: int, bound: int) -> torch.dtype:
    """The float dtype whose GEMM sums ``K`` products of magnitude ``<= bound`` exactly: float32 below 2^24,
    float64 below 2^53."""
    if k * bound >= 2 ** 53:
        raise ValueError(f"integer GEMM too large to accumulate exactly (K={k})")
    return torch.float32 if k * bound < 2 ** 24 else torch.float64


def _exact_matmul(a: Tensor, b: Tensor, bound: int) -> Tensor:
    """int32 ``a @ b`` of integer tensors whose products are at most ``bound`` in magnitude, through a float GEMM
    that is exact (:func:`exact_dtype`). Faster than an integer matmul on the CPU, and CUDA has none."""
    if a.numel() == 0 or b.numel() == 0:
        return torch.zeros(torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1]),
                           dtype=torch.int32, device=a.device)
    dt = exact_dtype(a.shape[-1], bound)
    return (a.to(dt) @ b.to(dt)).to(torch.int32)


def int_linear(a: Tensor, sa, za, w: Tensor, sw: Tensor, zw: Tensor, bias: Optional[Tensor] = None,
               code_bound: Optional[int] = None) -> Tensor:
    """Float32 output ``sa * sw[n] * int_gemm(a, w, za, zw) + bias[n]``.

    The integer sums are those of :func:`int_gemm` rounded to float32, computed directly as one float GEMM of the
    centred codes ``(a - za) @ (w - zw[n])^T`` (exact in float32 while ``K max|a - za| max|w - zw|`` stays below
    2^24, else in float64 and rounded once, like int32 -> float32): the same values with fewer passes.
    ``code_bound`` bounds ``max|a - za| max|w - zw|`` (``qmax`` of the activations times ``qmax`` of the weights)
    without reading the codes; measured when None."""
    if a.dim() < 2 or w.dim() < 2 or a.shape[-1] != w.shape[-1]:
        raise ValueError(f"int_linear needs a [M, K] and w [N, K] with equal K, got {tuple(a.shape)} and "
                         f"{tuple(w.shape)}")
    if a.is_floating_point() or w.is_floating_point():
        raise TypeError(f"int_linear needs integer codes, got {a.dtype} and {w.dtype}")
    k = a.shape[-1]
    dev = a.device
    ac = f32(a) - as_f32(za, dev)
    wc = f32(w) - as_f32(zw, dev).reshape(-1, 1)
    if ac.numel() == 0 or wc.numel() == 0:
        acc = torch.zeros(*a.shape[:-1], w.shape[0], device=a.device)
    else:
        if code_bound is None:
            code_bound = int(ac.abs().max()) * int(wc.abs().max())
        dt = exact_dtype(k, code_bound)
        acc = ac @ wc.T if dt == torch.float32 else (ac.double() @ wc.double().T).float()
    y = acc * (as_f32(sa, dev) * as_f32(sw, dev).reshape(1, -1))
    return y if bias is None else y + f32(bias)


def int_linear_codes(a: Tensor, a_qp: QParams, qw: Tensor, w_bits, w_scale: Tensor, w_zero: Tensor,
                     bias: Optional[Tensor] = None, gelu: bool = False, out_dtype: torch.dtype = torch.float32,
                     requant: Optional[QParams] = None) -> Tensor:
    """The deployed linear on codes: ``y = act(sa * sw[n] * sum_k (qa - za)(qw[n, k] - zw[n]) + bias[n])`` for
    signed int8 activation codes ``a [..., K]`` (quantizer ``a_qp``) and unsigned weight codes ``qw [N, K]``
    (``w_bits`` wide, per-channel ``w_scale``, ``w_zero [N]``), by :func:`int_linear`; ``act`` is exact-erf GELU
    when ``gelu``. Returns ``y`` in ``out_dtype``, or its signed int8 codes under ``requant`` (the next layer's
    activation quantizer)."""
    n, k = qw.shape
    lead = a.shape[:-1]
    za = signed_zero_point(a_qp.z, a_qp.bits)
    zw = round_zero_point(as_f32(w_zero, a.device), w_bits).reshape(-1)
    if zw.numel() != n or torch.as_tensor(w_scale).numel() != n:
        raise ValueError(f"w_scale and w_zero need one value per output channel ({n})")
    y = int_linear(a.reshape(-1, k), a_qp.s, za, qw, w_scale, zw, bias, code_bound=qmax(a_qp.bits) * qmax(w_bits))
    if gelu:
        y = torch.nn.functional.gelu(y)
    y = y.reshape(*lead, n)
    if requant is not None:
        return quantize(y, requant.s, requant.z, requant.bits, signed=True)
    return y.to(out_dtype)


def patchify(x: Tensor, patch: Tuple[int, int]) -> Tensor:
    """im2col of non-overlapping ``patch = (ph, pw)`` patches: ``x [B, C, H, W] -> [B, H/ph * W/pw, C*ph*pw]``, rows in
    raster order, columns in order (C, kh, kw) as ``conv.weight.reshape(D, -1)``; a remainder of H, W is dropped."""
    ph, pw = patch
    b, c, h, w = x.shape
    hp, wp = h // ph, w // pw
    x = x[:, :, : hp * ph, : wp * pw]
    return x.reshape(b, c, hp, ph, wp, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, hp * wp, c * ph * pw)


def unpatchify(y: Tensor, patch: Tuple[int, int], shape: Sequence[int]) -> Tensor:
    """The inverse of :func:`patchify` for an image of ``shape = (B, C, H, W)``: ``y [B, H/ph * W/pw, C*ph*pw] ->
    [B, C, H, W]``, zeros where :func:`patchify` dropped a remainder of H, W (the gradient of ``patchify``)."""
    ph, pw = patch
    b, c, h, w = shape
    hp, wp = h // ph, w // pw
    x = y.reshape(b, hp, wp, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(b, c, hp * ph, wp * pw)
    if (hp * ph, wp * pw) != (h, w):
        x = torch.nn.functional.pad(x, (0, w - wp * pw, 0, h - hp * ph))
    return x


def signed_zero_point(z, bits) -> Tensor:
    """The zero point of the signed int8 storage form: ``round(z) - offset(bits)``."""
    return round_zero_point(as_f32(z), bits) - code_offset(bits)


# ----------------------------------------------------------------------------------------------------------
# SULQ: shift-uniform-log2 quantizer for post-softmax probabilities (I&S-ViT)


class SULQParams(NamedTuple):
    """Shift-uniform-log2 quantizer of probabilities (all per tensor): shift ``eta > 0``; the uniform ``(s, z,
    bits)`` of the log domain ``t = -log2(p + eta)`` measured from the origin ``x0`` (codes
    ``clamp(round((t - x0) / s) + z, 0, qmax)``, dequantized ``t_hat = (q - z) s + x0``); ``pow2``: the exponent is
    rounded, ``p_hat = 2^(-round(t_hat)) - eta`` (I&S-ViT as published: every level a power of two minus ``eta``),
    else ``p_hat = 2^(-t_hat) - eta`` (the package's learned-step variant, ``x0 = 0``)."""

    eta: Tensor
    s: Tensor
    z: Tensor
    bits: float
    x0: "Tensor | float" = 0.0
    pow2: bool = False


#: the shifts ``eta`` I&S-ViT's authors search (their released code)
PUBLISHED_SULQ_ETAS = (0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.1, 0.2, 0.5, 1.0)


def sulq_log(p: Tensor, eta) -> Tensor:
    """The log domain of SULQ: ``t = -log2(p + eta)`` (float32 or float64)."""
    dt = torch.promote_types(p.dtype, torch.float32)
    return -torch.log2(p.to(dt) + torch.as_tensor(eta, device=p.device).to(dt))


def check_sulq(p: Tensor, eta) -> None:
    _check_finite("probabilities", p)
    eta = as_f32(eta)
    if eta.numel() != 1 or not float(eta) > 0:
        raise ValueError(f"SULQ shift eta must be one value > 0, got {eta.tolist()}; re-initialise the quantizer")
    if p.numel() and float(p.min()) < 0:
        raise ValueError(f"SULQ quantizes probabilities in [0, 1], got a minimum of {float(p.min()):.3g}; apply it "
                         f"after the softmax")


def sulq_quantize(p: Tensor, eta, s, z, bits, signed: bool = False, x0=0.0) -> Tensor:
    """SULQ codes of probabilities ``p``: ``q = clamp(round((-log2(p + eta) - x0) / s) + z, 0, qmax)`` (uint8, or
    the signed int8 storage ``q - offset`` when ``signed``)."""
    check_sulq(p, eta)
    return quantize(sulq_log(f32(p), eta) - as_f32(x0, p.device), s, z, bits,
                    signed=signed)


def sulq_table(eta, s, z, bits, x0=0.0, pow2: bool = False) -> Tensor:
    """Dequantization table, float32 ``[n_levels]`` indexed by the unsigned code:
    ``table[q] = 2^(-t) - eta``, ``t = (q - z) s + x0``, rounded when ``pow2``."""
    s = as_f32(s)
    q = torch.arange(n_levels(bits), dtype=torch.int32, device=s.device)
    t = dequantize(q, s.reshape(-1)[:1], as_f32(z, s.device).reshape(-1)[:1], bits)
    t = t + as_f32(x0, s.device).reshape(-1)[:1]
    if pow2:
        t = torch.round(t)
    return torch.exp2(-t) - as_f32(eta, s.device).reshape(-1)[:1]


def sulq_dequantize(q: Tensor, eta, s, z, bits, x0=0.0, pow2: bool = False) -> Tensor:
    """``p_hat`` of codes ``q`` (unsigned uint8 or signed int8) by lookup in :func:`sulq_table`."""
    table = sulq_table(eta, s, z, bits, x0, pow2).to(q.device)
    return table[unsigned_codes(q, bits)]


def sulq_fake_quantize(p: Tensor, eta, s: Tensor, z: Tensor, bits, check: bool = True, x0=0.0,
                       pow2: bool = False) -> Tensor:
    """Differentiable ``2^(-t_hat) - eta``, ``t_hat = fake_quantize(-log2(p + eta) - x0, s, z) + x0`` (rounded by a
    straight-through estimator when ``pow2``): ``d/dp = (p_hat + eta) / (p + eta)`` inside the range; LSQ
    gradients for ``s`` and ``z``."""
    if check:
        check_sulq(p.detach(), eta)
    t = sulq_log(p, eta)
    x0 = torch.as_tensor(x0, device=p.device).to(t.dtype)
    th = fake_quantize(t - x0, s, z, bits, check=check) + x0
    if pow2:
        th = round_ste(th)
    return torch.exp2(-th) - torch.as_tensor(eta, device=p.device).to(th.dtype)


def sulq_range(eta, frac: float = 1.0) -> Tuple[Tensor, Tensor]:
    """Log-domain range ``[-log2(1 + eta), frac * -log2(eta)]`` of probabilities in ``[0, 1]``."""
    eta = as_f32(eta)
    return -torch.log2(1 + eta), -torch.log2(eta) * frac


def init_sulq_params(p: Tensor, bits, etas: Optional[Sequence[float]] = None,
                     fracs: Sequence[float] = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
                     max_samples: int = 1 << 20) -> SULQParams:
    """Grid search of the shift ``eta`` and the log-domain range on calibration probabilities ``p``.

    For each ``eta`` in ``etas`` (default ``2^-k, k = 1..16``) and each range fraction ``f``, ``(s, z) =
    qparams_from_range(sulq_range(eta, f))``; the pair with the smallest ``mean((p_hat - p)^2)`` wins. At most
    ``max_samples`` evenly strided elements of ``p`` are used.
    """
    check_bits(bits)
    flat = p.detach().float().reshape(-1)
    check_sulq(flat, 1.0)
    if flat.numel() > max_samples:
        flat = flat[:: -(-flat.numel() // max_samples)]
    etas = [2.0 ** -k for k in range(1, 17)] if etas is None else list(etas)
    best, best_err = None, float("inf")
    for eta in etas:
        for f in fracs:
            lo, hi = sulq_range(eta, f)
            s, z = qparams_from_range(lo, hi, bits)
            err = float((sulq_fake_quantize(flat, eta, s, z, bits, check=False) - flat).pow(2).mean())
            if err < best_err:
                best_err, best = err, SULQParams(torch.tensor(float(eta)), s, z, bits)
    return best


def init_sulq_published(p: Tensor, bits, etas: Sequence[float] = PUBLISHED_SULQ_ETAS,
                        max_samples: int = 1 << 20) -> SULQParams:
    """I&S-ViT's SULQ as published (their ``LogSqrt2Quantizer``; paper Eq. 9-10), at ``bits``:

    * search: for each ``eta`` in ``etas``, ``t = -log2(p + eta)`` over all of ``p``, ``x0 = min t`` and the
      ``2^bits``-level grid ``s = (max t - min t) / (2^bits - 1)``; the ``eta`` whose power-of-two dequantization
      has the smallest ``mean((p_hat - p)^2)`` wins (the error on at most ``max_samples`` evenly strided elements);
    * forward: the authors' quantizer then runs on ``2^bits + 1`` levels, ``s = (max t - min t) / 2^bits``,
      codes ``0..2^bits`` (bits :func:`sulq_grid_bits`), every level ``2^(-round(t_hat)) - eta``.

    Their grid is measured from ``max log2(p + eta)`` (= ``-x0`` here) downwards; with an even ``2^bits`` the codes
    are the mirror image of these, ties included, so the levels and the decisions are the same."""
    check_bits(bits)
    full = p.detach().float().reshape(-1)
    check_sulq(full, 1.0)
    flat = full[:: -(-full.numel() // max_samples)] if full.numel() > max_samples else full
    best, best_err = None, float("inf")
    zero = torch.zeros((), device=flat.device)
    for eta in etas:
        t = sulq_log(full, eta)
        lo, hi = t.min(), t.max()
        s = torch.clamp((hi - lo) / qmax(bits), min=1e-8)
        err = float((sulq_fake_quantize(flat, eta, s, zero, bits, check=False, x0=lo, pow2=True) - flat).pow(2).mean())
        if err < best_err:
            best_err, best = err, (eta, lo, hi)
    eta, lo, hi = best
    grid = sulq_grid_bits(bits)
    return SULQParams(torch.tensor(float(eta)), torch.clamp((hi - lo) / qmax(grid), min=1e-8), zero.clone(), grid,
                      lo, True)


def scale_product(s1, c: float, s2, device) -> Tensor:
    """float32 ``s1 * c * s2`` computed in float64 (as the kernels do), on ``device`` (no host read)."""
    f64 = dict(dtype=torch.float64, device=device)
    return (torch.as_tensor(s1, **f64) * float(c) * torch.as_tensor(s2, **f64)).float()


def int_attention(q: Tensor, k: Tensor, v: Tensor, q_qp: QParams, k_qp: QParams, v_qp: QParams, scale: float,
                  p_qp: "Optional[QParams | SULQParams]" = None, rel_bias: Optional[Tensor] = None,
                  mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The deployed attention on signed int8 codes ``q, k, v [B, H, L, D]`` with per-tensor quantizers; returns
    float32 ``O [B, H, L, D]`` and the probability codes.

    ``S = scale * sq * sk * sum_d (qq - zq)(qk - zk) + rel_bias[h] + mask[b % nW]``, ``P = softmax(S)`` (float32),
    ``qp = quantize(P)`` with ``p_qp`` (default: ``s = 1/qmax(bits of q)``, ``z = 0``), and
    ``O = sp * sv * sum_j (qp - zp)(qv - zv)``. With a :class:`SULQParams` ``p_qp`` the codes are SULQ's
    (``clamp(round((-log2(P + eta) - x0) / sp) + zp, 0, qmax)``) and ``O = sv * sum_j table[qp] (qv - zv)`` in
    float32 (``table = sulq_table``). ``rel_bias`` is ``[H, L, L]``, ``mask`` ``[nW, L, L]`` (Swin's
    shifted-window mask, windows ordered with the window index fastest).
    """
    b, h, l, d = q.shape
    if p_qp is None:
        p_qp = QParams(torch.tensor(1.0 / qmax(q_qp.bits)), torch.tensor(0.0), q_qp.bits)
    zq = signed_zero_point(q_qp.z, q_qp.bits)
    zk = signed_zero_point(k_qp.z, k_qp.bits)
    s = int_gemm(q, k, zq, zk).float() * scale_product(q_qp.s, scale, k_qp.s, q.device)
    if rel_bias is not None:
        s = s + f32(rel_bias)[None]
    if mask is not None:
        nw = mask.shape[0]
        s = (s.view(b // nw, nw, h, l, l) + f32(mask)[None, :, None]).view(b, h, l, l)
    p = torch.softmax(s, dim=-1)
    zv = signed_zero_point(v_qp.z, v_qp.bits)
    if isinstance(p_qp, SULQParams):
        pc = sulq_quantize(p, p_qp.eta, p_qp.s, p_qp.z, p_qp.bits, signed=n_levels(p_qp.bits) <= 256, x0=p_qp.x0)
        ph = sulq_dequantize(pc, p_qp.eta, p_qp.s, p_qp.z, p_qp.bits, p_qp.x0, p_qp.pow2)
        return (ph @ (f32(v) - zv)) * as_f32(v_qp.s, q.device), pc
    pc = quantize(p, p_qp.s, p_qp.z, p_qp.bits, signed=True)
    zp = signed_zero_point(p_qp.z, p_qp.bits)
    return int_gemm(pc, v.transpose(-1, -2), zp, zv).float() * scale_product(p_qp.s, 1.0, v_qp.s, q.device), pc
