"""Initialisation of a quantized model from one calibration batch (the paper uses 32 images).

One float forward pass in ``"calib"`` mode, in which every quantized module, in forward order:

1. (post-LayerNorm linears) sets ``shift = (lo + hi) / 2`` and ``r = a^alpha / max|W|^(1-alpha)`` from the
   per-channel percentile range ``[lo, hi]`` of its input (``primitives.smooth_rescale_shift``);
2. sets its input ``(s, z)`` from the percentile range of the rescaled input ``(x - shift) / r``;
3. sets per-channel weight ``(s_w, z_w)`` from the folded weight ``(W + dW) * r`` (``init_weight_qparams``).

Statistics are those of the float model (quantization is off during the pass). The model ends in ``"quant"`` mode.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from quant.modules import quant_modules, set_mode


@torch.no_grad()
def calibrate(model: nn.Module, images: Tensor) -> nn.Module:
    """Initialise every quantizer of ``model`` from ``images [B, 3, H, W]`` and switch it to ``"quant"`` mode."""
    if not quant_modules(model):
        raise ValueError("model has no quantized modules; call quant.surgery.quantize_model first")
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"calibration images must be a non-empty [B, 3, H, W] batch, got {tuple(images.shape)}")
    was_training = model.training
    model.eval()
    set_mode(model, "calib")
    try:
        model(images)
    finally:
        set_mode(model, "quant")
        model.train(was_training)
    return model
