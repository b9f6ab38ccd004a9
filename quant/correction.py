"""DFQ-ViT activation correction: one learnable ``[D, D]`` matrix per transformer block, aligning the quantized
model's intermediate activations with the float model's; kept at inference.

:func:`add_act_correction` gives every block (ViT/DeiT ``Block``, Swin ``SwinTransformerBlock``) a
:class:`quant.modules.ActCorrection` ``block.act_correction`` (identity) and a forward hook that replaces the
block's output ``y`` (after both residual additions) by ``y @ M^T``. :func:`train_act_correction` then trains only
the matrices, everything else frozen, on::

    L = sum_l mean((F_l^q M_l^T - F_l)^2)           F_l: output of block l (quantized / float teacher)

with Adam and a cosine schedule, batches taken in the order of ``images`` (a tensor, or a
:class:`calib.stream.CalibImages` read batch by batch). Without real data the images are
``quant.run --data invert``'s, synthesized easy to hard by :func:`calib.invert.write_image_folder`. It runs after
any method (``rtn``, ``blockwise``, ``e2e``, ``is-vit``).
"""
from __future__ import annotations

import math
from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from calib.stream import as_images
from quant.modules import ActCorrection
from quant.optimize import _Capture
from quant.surgery import blocks


def _correct_block_output(block: nn.Module, inputs, output: Tensor) -> Tensor:
    return block.act_correction(output)


def add_act_correction(model: nn.Module) -> List[ActCorrection]:
    """Install an identity :class:`ActCorrection` on every block of ``model`` (in ``"quant"`` mode); returns them."""
    out = []
    for b in blocks(model):
        if hasattr(b, "act_correction"):
            raise ValueError("model already has activation correction")
        b.act_correction = ActCorrection(b.norm1.weight.shape[0]).to(b.norm1.weight.device)
        b.act_correction.set_mode("quant")
        b.register_forward_hook(_correct_block_output, prepend=True)
        out.append(b.act_correction)
    if not out:
        raise ValueError(f"{type(model).__name__} has no ViT/DeiT/Swin blocks to correct")
    return out


def intermediate_mse(student: nn.Module, teacher: nn.Module, x: Tensor) -> Tensor:
    """``sum_l mean((F_l^q - F_l)^2)`` over the block outputs (the student's corrected ones)."""

    with torch.no_grad(), _Capture(blocks(teacher)) as tc:
        teacher(x)
    with _Capture(blocks(student)) as sc:
        student(x)
    return sum(F.mse_loss(s.float(), t.float()) for s, t in zip(sc.outputs, tc.outputs))


def train_act_correction(student: nn.Module, teacher: nn.Module, images, iters: int = 500,
                         batch_size: int = 32, lr: float = 1e-4, progress: bool = True) -> dict:
    """Train the correction matrices of ``student`` (installed by :func:`add_act_correction`) for ``iters`` steps.
    Returns ``{"losses": [...], "steps": iters}``."""
    corr = [b.act_correction for b in blocks(student) if hasattr(b, "act_correction")]
    if not corr:
        raise ValueError("student has no activation correction; call add_act_correction(student) first")
    device = corr[0].matrix.device
    teacher.eval().requires_grad_(False)
    student.eval()
    grad_before = {id(p): p.requires_grad for p in student.parameters()}
    for p in student.parameters():
        p.requires_grad_(False)
    mats = [c.matrix for c in corr]
    for m in mats:
        m.requires_grad_(True)
    opt = torch.optim.Adam(mats, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, iters)))))

    source = as_images(images)
    n = len(source)
    nb = max(1, math.ceil(n / batch_size))
    losses = []
    batches = source.batches(range(b * batch_size, min(n, (b + 1) * batch_size)) for b in
                             (step % nb for step in range(iters)))
    try:
        for step in tqdm(range(iters), desc="activation correction", disable=not progress, dynamic_ncols=True):
            x = next(batches).to(device)
            loss = intermediate_mse(student, teacher, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
    finally:
        batches.close()
        for p in student.parameters():
            p.requires_grad_(grad_before.get(id(p), False))
    return {"losses": losses, "steps": iters}


