"""Shared helpers for the export tests: small quantized timm models and their exported checkpoints."""
import copy

import torch

from quant.calibrate import calibrate
from quant.modules import set_mode
from quant.surgery import quantize_model
from tests.quant.ptq_utils import CONFIGS, images, make_model  # noqa: F401

BITS = ("w1.58a8", "w3a3", "w4a4", "w6a6", "w8a8", "w4a8")


def quantized(kind: str, bits: str, seed: int = 0, softmax_quantizer: str = "uniform", **over):
    """``(fp, q)``: a random-init small model (float tensors rounded to fp16, as the file stores them) and its
    calibrated fake-quant copy in ``quant`` mode, with a non-zero weight refinement."""
    fp = make_model(kind, seed, **over)
    with torch.no_grad():
        for p in fp.parameters():
            p.copy_(p.half().float())
    q = calibrate(quantize_model(copy.deepcopy(fp), bits, softmax_quantizer=softmax_quantizer), images(8, seed=seed + 11, size=over.get("img_size", 32)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in q.named_parameters():
            if name.endswith("dW"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.002)
    set_mode(q, "quant")
    return fp, q


def arch(kind: str, **over):
    name, kw = CONFIGS[kind]
    return name, {**kw, **over}


def corrected(q, seed: int = 0, noise: float = 0.05):
    """Install DFQ-ViT activation correction on ``q`` with non-identity matrices ``I + noise * randn``; returns
    the :class:`quant.modules.ActCorrection` modules."""
    from quant.correction import add_act_correction
    g = torch.Generator().manual_seed(seed + 101)
    corr = add_act_correction(q)
    with torch.no_grad():
        for c in corr:
            c.matrix.add_(torch.randn(c.matrix.shape, generator=g) * noise)
    return corr
