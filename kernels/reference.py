"""The test oracle of every kernel and of the CPU backend: each op as the formula of :mod:`lowbit.primitives`
(the one place the arithmetic is written), with the input checks of :mod:`kernels.checks`.

Activation codes are signed int8 storage (``q - offset(bits)``), weights come as
:class:`lowbit.packing.PackedWeight` with unsigned per-channel zero points. Float work is done in float32.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from lowbit import packing
from lowbit import primitives as P
from lowbit.primitives import QParams, SULQParams

from . import checks as C

layernorm = P.layernorm


def rescale_quantize(x: Tensor, qp: QParams, r: Optional[Tensor] = None, shift: Optional[Tensor] = None) -> Tensor:
    """int8 codes of ``(x - shift) / r`` for ``x [..., C]``: ``clamp(round(x'/s) + z, 0, qmax) - offset``."""
    C.check_float_input(x)
    c = x.shape[-1]
    C.check_channel_vec("r", r, c)
    C.check_channel_vec("shift", shift, c)
    xr = P.apply_rescale(x.float(), None if r is None else r.float(), None if shift is None else shift.float())
    return P.quantize(xr, qp.s, qp.z, qp.bits, signed=True)


def layernorm_rescale_quantize(x: Tensor, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], eps: float,
                               qp: QParams, r: Optional[Tensor] = None, shift: Optional[Tensor] = None) -> Tensor:
    """int8 codes of ``(LN(x) - shift) / r`` (LayerNorm over the last dim, then :func:`rescale_quantize`)."""
    C.check_float_input(x)
    c = x.shape[-1]
    C.check_channel_vec("ln_weight", ln_weight, c)
    C.check_channel_vec("ln_bias", ln_bias, c)
    return rescale_quantize(layernorm(x, ln_weight, ln_bias, eps), qp, r, shift)


def add_layernorm_rescale_quantize(x: Tensor, delta: Tensor, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
                                   eps: float, qp: QParams, r: Optional[Tensor] = None,
                                   shift: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``(x_new, codes)``: the residual add ``x_new = (x + delta).to(x.dtype)`` (float32 sum, rounded once to
    ``x``'s dtype), then :func:`layernorm_rescale_quantize` of ``x_new``."""
    C.check_float_input(x)
    C.check_float_input(delta, "delta")
    if delta.shape != x.shape:
        raise ValueError(f"delta must have x's shape {tuple(x.shape)}, got {tuple(delta.shape)}")
    x_new = (x.float() + delta.float()).to(x.dtype)
    return x_new, layernorm_rescale_quantize(x_new, ln_weight, ln_bias, eps, qp, r, shift)


def rescale_fake_quantize(x: Tensor, qp: QParams, r: Optional[Tensor] = None,
                          shift: Optional[Tensor] = None) -> Tensor:
    """Differentiable float32 ``fake_quantize((x - shift) / r)``; gradients reach x, s, z, r and shift."""
    C.check_float_input(x)
    c = x.shape[-1]
    C.check_channel_vec("r", r, c)
    C.check_channel_vec("shift", shift, c)
    return P.fake_quantize(P.apply_rescale(x.float(), r, shift), qp.s, qp.z, qp.bits)


def packed_linear(a: Tensor, a_qp: QParams, w: packing.PackedWeight, w_scale: Tensor, w_zero: Tensor,
                  bias: Optional[Tensor] = None, gelu: bool = False, out_dtype: torch.dtype = torch.float32,
                  requant: Optional[QParams] = None) -> Tensor:
    """``y = act(sa * sw[n] * sum_k (qa - za)(qw[n] - zw[n]) + bias[n])`` for int8 codes ``a [..., K]``.

    ``act`` is exact-erf GELU when ``gelu``. Returns ``y`` in ``out_dtype``, or its signed int8 codes under
    ``requant`` (the next layer's activation quantizer). Unpacks ``w`` and calls :func:`linear_codes`.
    """
    C.check_act_codes(a, w.k)
    return linear_codes(a, a_qp, packing.unpack(w), w.bits, w_scale, w_zero, bias, gelu, out_dtype, requant)


def linear_codes(a: Tensor, a_qp: QParams, qw: Tensor, w_bits, w_scale: Tensor, w_zero: Tensor,
                 bias: Optional[Tensor] = None, gelu: bool = False, out_dtype: torch.dtype = torch.float32,
                 requant: Optional[QParams] = None) -> Tensor:
    """:func:`packed_linear` on unpacked unsigned weight codes ``qw [N, K]`` (``w_bits`` wide)."""
    C.check_act_codes(a, qw.shape[1])
    return P.int_linear_codes(a, a_qp, qw, w_bits, w_scale, w_zero, bias, gelu, out_dtype, requant)


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
    C.check_qkv(q, k, v)
    C.check_attention_extras(q, rel_bias, mask)
    o, pc = P.int_attention(q, k, v, q_qp, k_qp, v_qp, scale, p_qp, rel_bias, mask)
    return (o, pc) if return_codes else o


def exact_sum_rows(m: int, c: int, dtype: torch.dtype = torch.float32, generator: Optional[torch.Generator] = None,
                   device=None) -> Tensor:
    """Test input: ``[m, c]`` rows ``mu + e`` on which LayerNorm is bit-identical whatever the summation order.
    ``e``: nonzero multiples of 1/16 in ``[-4, 4]`` summing to 0 in each row (pairs ``k, -k``, and ``a, b, -(a + b)``
    for odd ``c``), ``mu`` an odd multiple of 1/32 per row (so no value is 0). Every partial sum of a row, its mean
    ``mu``, the centred values ``e``, their squares and the sums of these are exact in float32 (``c <= 4096``), and
    every value is exact in fp16 and bf16 (at most 8 significant bits)."""
    g = dict(generator=generator, device=generator.device if generator is not None else device)
    half = (c - 3) // 2 if c % 2 else c // 2
    k = torch.randint(1, 65, (m, half), **g) * (torch.randint(0, 2, (m, half), **g) * 2 - 1)
    parts = [k, -k]
    if c % 2:
        a, b = (torch.randint(1, 33, (m, 1), **g) for _ in range(2))
        parts += [a, b, -(a + b)]
    e = torch.cat(parts, 1)
    e = torch.gather(e, 1, torch.argsort(torch.rand(m, c, **g), dim=1))
    mu = (torch.randint(-32, 33, (m, 1), **g) * 2 + 1).float() / 32
    return (mu + e.float() / 16).to(dtype)
