"""Dispatch for the quantized ops: the one entry point the optimiser, the models and the exporter call.

CUDA tensors run the Triton kernels; CPU tensors run :mod:`kernels.reference` unless ``LOWBIT_TRITON=1`` is set
(then the Triton kernels run on CPU through ``TRITON_INTERPRET=1``), or :func:`use_triton` forces a choice.
All functions take activation quantizers as :class:`quant.primitives.QParams` (per-tensor ``s``, unsigned ``z``).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from quant import packing
from quant import primitives as P
from quant.primitives import QParams

from . import reference as R

_FORCE: Optional[bool] = None


def use_triton(flag: Optional[bool]) -> None:
    """Force the Triton path on (True) or off (False) for every device; None restores the default."""
    global _FORCE
    _FORCE = flag


def triton_enabled(t: Tensor) -> bool:
    if _FORCE is not None:
        return _FORCE
    return t.is_cuda or os.environ.get("LOWBIT_TRITON", "0") == "1"


def quantize(x: Tensor, qp: QParams, r: Optional[Tensor] = None, shift: Optional[Tensor] = None) -> Tensor:
    """int8 codes of ``(x - shift) / r`` (see :func:`kernels.reference.rescale_quantize`)."""
    return R.rescale_quantize(x, qp, r, shift)


def layernorm_quantize(x: Tensor, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], eps: float,
                       qp: QParams, r: Optional[Tensor] = None, shift: Optional[Tensor] = None) -> Tensor:
    """int8 codes of ``(LayerNorm(x) - shift) / r``."""
    return R.layernorm_rescale_quantize(x, ln_weight, ln_bias, eps, qp, r, shift)


def fake_quantize(x: Tensor, qp: QParams, r: Optional[Tensor] = None, shift: Optional[Tensor] = None) -> Tensor:
    """Differentiable float32 ``fake_quantize((x - shift) / r)`` (per-tensor activation quantizer)."""
    return R.rescale_fake_quantize(x, qp, r, shift)


def fake_quantize_weight(w: Tensor, s: Tensor, z: Tensor, bits) -> Tensor:
    """Differentiable per-channel weight fake-quant, ``s, z`` of shape ``[N, 1]``."""
    return P.fake_quantize(w, s, z, bits)


def packed_linear(a: Tensor, a_qp: QParams, w: packing.PackedWeight, w_scale: Tensor, w_zero: Tensor,
                  bias: Optional[Tensor] = None, gelu: bool = False, out_dtype: torch.dtype = torch.float32,
                  requant: Optional[QParams] = None) -> Tensor:
    """Integer linear on int8 codes and a packed weight (see :func:`kernels.reference.packed_linear`)."""
    return R.packed_linear(a, a_qp, w, w_scale, w_zero, bias, gelu, out_dtype, requant)


def quant_attention(q: Tensor, k: Tensor, v: Tensor, q_qp: QParams, k_qp: QParams, v_qp: QParams, scale: float,
                    p_qp: Optional[QParams] = None, rel_bias: Optional[Tensor] = None,
                    mask: Optional[Tensor] = None) -> Tensor:
    """Attention on int8 codes (see :func:`kernels.reference.quant_attention`)."""
    return R.quant_attention(q, k, v, q_qp, k_qp, v_qp, scale, p_qp, rel_bias, mask)
