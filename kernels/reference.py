"""Plain-torch references of every kernel: the test oracles and the CPU path of :mod:`kernels`.

All arithmetic follows :mod:`lowbit.primitives`; activation codes are signed int8 storage
(``q - offset(bits)``), weights come as :class:`lowbit.packing.PackedWeight` with unsigned per-channel
zero points. Float work is done in float32.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from lowbit import packing
from lowbit import primitives as P
from lowbit.primitives import QParams, SULQParams


def _check_act_input(x: Tensor, name: str = "x") -> None:
    if not torch.is_tensor(x) or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name} must be a float32/float16/bfloat16 tensor, got "
                        f"{x.dtype if torch.is_tensor(x) else type(x).__name__}")


def _check_channel_vec(name: str, t: Optional[Tensor], c: int) -> None:
    if t is not None and tuple(t.shape) != (c,):
        raise ValueError(f"{name} must have shape [{c}] (one per channel of x), got {tuple(t.shape)}")


def layernorm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """LayerNorm over the last dim in float32: ``(x - mean) / sqrt(var + eps) * weight + bias`` (biased var)."""
    x = x.float()
    mean = x.mean(dim=-1, keepdim=True)
    xc = x - mean
    var = (xc * xc).mean(dim=-1, keepdim=True)
    y = xc / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y


def rescale_quantize(x: Tensor, qp: QParams, r: Optional[Tensor] = None, shift: Optional[Tensor] = None) -> Tensor:
    """int8 codes of ``(x - shift) / r`` for ``x [..., C]``: ``clamp(round(x'/s) + z, 0, qmax) - offset``."""
    _check_act_input(x)
    c = x.shape[-1]
    _check_channel_vec("r", r, c)
    _check_channel_vec("shift", shift, c)
    xr = P.apply_rescale(x.float(), None if r is None else r.float(), None if shift is None else shift.float())
    return P.quantize(xr, qp.s, qp.z, qp.bits, signed=True)


def layernorm_rescale_quantize(x: Tensor, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], eps: float,
                               qp: QParams, r: Optional[Tensor] = None, shift: Optional[Tensor] = None) -> Tensor:
    """int8 codes of ``(LN(x) - shift) / r`` (LayerNorm over the last dim, then :func:`rescale_quantize`)."""
    _check_act_input(x)
    c = x.shape[-1]
    _check_channel_vec("ln_weight", ln_weight, c)
    _check_channel_vec("ln_bias", ln_bias, c)
    return rescale_quantize(layernorm(x, ln_weight, ln_bias, eps), qp, r, shift)


def rescale_fake_quantize(x: Tensor, qp: QParams, r: Optional[Tensor] = None,
                          shift: Optional[Tensor] = None) -> Tensor:
    """Differentiable float32 ``fake_quantize((x - shift) / r)``; gradients reach x, s, z, r and shift."""
    _check_act_input(x)
    c = x.shape[-1]
    _check_channel_vec("r", r, c)
    _check_channel_vec("shift", shift, c)
    return P.fake_quantize(P.apply_rescale(x.float(), r, shift), qp.s, qp.z, qp.bits)


def packed_linear(a: Tensor, a_qp: QParams, w: packing.PackedWeight, w_scale: Tensor, w_zero: Tensor,
                  bias: Optional[Tensor] = None, gelu: bool = False, out_dtype: torch.dtype = torch.float32,
                  requant: Optional[QParams] = None) -> Tensor:
    """``y = act(sa * sw[n] * sum_k (qa - za)(qw[n] - zw[n]) + bias[n])`` for int8 codes ``a [..., K]``.

    ``act`` is exact-erf GELU when ``gelu``. Returns ``y`` in ``out_dtype``, or its signed int8 codes under
    ``requant`` (the next layer's activation quantizer). Unpacks ``w`` and calls :func:`linear_codes`.
    """
    _check_codes(a, w.k)
    return linear_codes(a, a_qp, packing.unpack(w), w.bits, w_scale, w_zero, bias, gelu, out_dtype, requant)


def _check_codes(a: Tensor, k: int) -> None:
    if not torch.is_tensor(a) or a.dtype != torch.int8:
        raise TypeError(f"activation codes must be int8 (signed storage), got "
                        f"{a.dtype if torch.is_tensor(a) else type(a).__name__}; quantize them first")
    if a.shape[-1] != k:
        raise ValueError(f"activation codes have K={a.shape[-1]} but the weight has K={k}")


def linear_codes(a: Tensor, a_qp: QParams, qw: Tensor, w_bits, w_scale: Tensor, w_zero: Tensor,
                 bias: Optional[Tensor] = None, gelu: bool = False, out_dtype: torch.dtype = torch.float32,
                 requant: Optional[QParams] = None) -> Tensor:
    """:func:`packed_linear` on unpacked unsigned weight codes ``qw [N, K]`` (``w_bits`` wide)."""
    n, k = qw.shape
    _check_codes(a, k)
    lead = a.shape[:-1]
    za = P.signed_zero_point(a_qp.z, a_qp.bits)
    zw = P.round_zero_point(torch.as_tensor(w_zero, dtype=torch.float32, device=a.device), w_bits).reshape(-1)
    if zw.numel() != n or torch.as_tensor(w_scale).numel() != n:
        raise ValueError(f"w_scale and w_zero need one value per output channel ({n})")
    y = P.int_linear(a.reshape(-1, k), a_qp.s, za, qw, w_scale, zw, bias,
                     code_bound=P.qmax(a_qp.bits) * P.qmax(w_bits))
    if gelu:
        y = F.gelu(y)
    y = y.reshape(*lead, n)
    if requant is not None:
        return P.quantize(y, requant.s, requant.z, requant.bits, signed=True)
    return y.to(out_dtype)


def _scale_product(s1, c: float, s2, device) -> Tensor:
    """float32 ``s1 * c * s2`` computed in float64 (as the kernels do), on ``device`` (no host read)."""
    f64 = dict(dtype=torch.float64, device=device)
    return (torch.as_tensor(s1, **f64) * float(c) * torch.as_tensor(s2, **f64)).float()


def check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    """``q, k, v`` must be int8 codes of one shape ``[B, H, L, D]``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not torch.is_tensor(t) or t.dtype != torch.int8 or t.dim() != 4:
            raise TypeError(f"{name} must be int8 codes of shape [B, H, L, D], got "
                            f"{t.dtype if torch.is_tensor(t) else type(t).__name__} {tuple(getattr(t, 'shape', ()))}")
    if q.shape != k.shape or k.shape != v.shape:
        raise ValueError(f"q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")


def quant_attention(q: Tensor, k: Tensor, v: Tensor, q_qp: QParams, k_qp: QParams, v_qp: QParams,
                    scale: float, p_qp: Optional[Union[QParams, SULQParams]] = None,
                    rel_bias: Optional[Tensor] = None, mask: Optional[Tensor] = None, return_codes: bool = False):
    """Attention on int8 codes ``q, k, v [B, H, L, D]`` with per-tensor quantizers.

    ``S = scale * sq * sk * sum_d (qq - zq)(qk - zk) + rel_bias[h] + mask[b % nW]``, ``P = softmax(S)`` (float32),
    ``qp = quantize(P)`` with ``p_qp`` (default: ``s = 1/qmax(bits of q)``, ``z = 0``), and
    ``O = sp * sv * sum_j (qp - zp)(qv - zv)``. With a :class:`SULQParams` ``p_qp`` the codes are SULQ's
    (``clamp(round((-log2(P + eta) - x0) / sp) + zp, 0, qmax)``) and ``O = sv * sum_j table[qp] (qv - zv)`` in float32
    (``table = primitives.sulq_table``). ``rel_bias`` is ``[H, L, L]``, ``mask`` ``[nW, L, L]`` (Swin's
    shifted-window mask, windows ordered with the window index fastest). Returns float32 ``O [B, H, L, D]``
    (and the probability codes when ``return_codes``).
    """
    check_qkv(q, k, v)
    b, h, l, d = q.shape
    if p_qp is None:
        p_qp = QParams(torch.tensor(1.0 / P.qmax(q_qp.bits)), torch.tensor(0.0), q_qp.bits)
    zq = P.signed_zero_point(q_qp.z, q_qp.bits)
    zk = P.signed_zero_point(k_qp.z, k_qp.bits)
    s = P.int_gemm(q, k, zq, zk).float() * _scale_product(q_qp.s, scale, k_qp.s, q.device)
    if rel_bias is not None:
        if tuple(rel_bias.shape) != (h, l, l):
            raise ValueError(f"rel_bias must be [H, L, L] = {(h, l, l)}, got {tuple(rel_bias.shape)}")
        s = s + rel_bias.float()[None]
    if mask is not None:
        nw = mask.shape[0]
        if mask.dim() != 3 or tuple(mask.shape[1:]) != (l, l) or b % nw:
            raise ValueError(f"mask must be [nW, L, L] with B divisible by nW, got {tuple(mask.shape)} for B={b}")
        s = (s.view(b // nw, nw, h, l, l) + mask.float()[None, :, None]).view(b, h, l, l)
    p = torch.softmax(s, dim=-1)
    zv = P.signed_zero_point(v_qp.z, v_qp.bits)
    if isinstance(p_qp, SULQParams):
        pc = P.sulq_quantize(p, p_qp.eta, p_qp.s, p_qp.z, p_qp.bits, signed=True, x0=p_qp.x0)
        ph = P.sulq_dequantize(pc, p_qp.eta, p_qp.s, p_qp.z, p_qp.bits, p_qp.x0, p_qp.pow2)
        o = (ph @ (v.float() - zv)) * torch.as_tensor(v_qp.s, dtype=torch.float32, device=q.device)
        return (o, pc) if return_codes else o
    pc = P.quantize(p, p_qp.s, p_qp.z, p_qp.bits, signed=True)
    zp = P.signed_zero_point(p_qp.z, p_qp.bits)
    o = P.int_gemm(pc, v.transpose(-1, -2), zp, zv).float() * _scale_product(p_qp.s, 1.0, v_qp.s, q.device)
    return (o, pc) if return_codes else o
