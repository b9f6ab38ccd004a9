"""The fake-quant model that ``python -m quant.run`` saves (``<out>/quantized.pt``: state dict, bits, model name),
rebuilt."""
from __future__ import annotations

import os

import timm
import torch
from torch import nn

from lowbit.errors import UserError
from lowbit.models import resolve
from quant.correction import add_act_correction
from quant.modules import set_mode
from quant.surgery import quantize_model


def load_quantized(path: str) -> nn.Module:
    """Rebuild the fake-quant model saved by ``python -m quant.run`` (``<out>/quantized.pt``), in ``quant`` mode."""
    if not os.path.isfile(path):
        raise UserError(f"quantized model {path!r} does not exist; point to <out>/quantized.pt of a quant.run")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    spec = resolve(saved["model"])
    if spec.loader is not None:
        model = spec.loader(None, dict(saved["model_args"]))
    else:
        model = timm.create_model(spec.timm_name, pretrained=False, **saved["model_args"])
    model = quantize_model(model.eval(), saved["bits"], rescale=saved["rescale"],
                           softmax_quantizer=saved.get("softmax_quantizer", "uniform"))
    if saved.get("act_correction"):
        add_act_correction(model)
    model.load_state_dict(saved["state_dict"], strict=True)
    set_mode(model, "quant")
    return model
