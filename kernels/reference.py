"""The test oracle of every kernel and of the CPU backend: each op as the formula of :mod:`lowbit.primitives`
(the one place the arithmetic is written), with the input checks of :mod:`kernels.checks`.

Activation codes are signed int8 storage (``q - offset(bits)``), weights come as
:class:`lowbit.packing.PackedWeight` with unsigned per-channel zero points. Float work is done in float32.
"""
from __future__ import annotations

from typing import Optional, Union

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
