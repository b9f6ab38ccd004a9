"""I&S-ViT's three-stage smooth optimisation (SOS), ``--method is-vit``.

Init     as published (``is-vit``), every uniform quantizer is initialised again by the authors' percentile search
         on ``init_size`` images (activations per tensor over 0.999/0.9999/0.99999, weights per output channel
         over 0.97 .. 0.99999, the channel-wise post-LN inputs per channel; :func:`use_searched_init`); the
         package's variant keeps the calibration's percentiles.
Stage 1  post-LayerNorm activations (inputs of ``attn.qkv``, ``mlp.fc1``, Swin's ``downsample.reduction``) are
         quantized channel-wise: ``(s[c], z[c])`` from per-channel percentile ranges, held in the layer-wise form of
         :func:`lowbit.primitives.channelwise_to_layerwise` (``r = s / s~``, ``shift = -s (z - z~)``, same codes);
         every other activation layer-wise; **weights stay in float**. Block-wise reconstruction (``iters`` steps
         per block, the ``blockwise`` machinery of :mod:`quant.optimize`) trains the activation quantizers, the
         channel-wise ones through ``r`` and ``shift``.
Stage 2  the channel-wise part is folded exactly into the LayerNorm affine (``gamma' = gamma / r``,
         ``beta' = (beta - shift) / r``) and the next linear (``W' = (W + dW) r``, ``b' = b + (W + dW) shift``);
         ``r = 1``, ``shift = 0`` stay frozen, so post-LN activations are now quantized layer-wise by ``(s~, z~)``.
         Weight quantizers are (re)initialised and switched on: as published every one of them, on the weights
         stage 1 refined (their one quantized forward before stage 3, ``test_quant.py``); in the package's variant
         the folded ones.
Stage 3  layer-wise block-wise reconstruction with weights quantized.

What the two reconstruction stages train (``train``):

* ``"weights"`` (``--method is-vit``, as the authors train): the linear weights (through the refinement ``dW``) and
  biases, with every quantizer parameter (step sizes, zero points, ``r``, ``shift``, SULQ) and the LayerNorms frozen;
  no refinement L2 (their loss is the block output MSE alone); stage 1 feeds each block the FP model's input to it
  and stage 3 the quantized model's (their ``save_inp_oup_data(..., last_stage)``), and the head is reconstructed on
  the logits' MSE (their ``opt_mode='mse'``), not the KL; the patch embedding and Swin's patch-merging reductions
  are reconstructed as layers of their own, on their outputs (their ``layer_reconstruction``); Adam at ``lr_w`` 4e-5 with cosine decay and no warm-up
  (:class:`quant.optimize.OptimConfig`'s defaults for the method); the softmax quantizer is their SULQ
  (``quant.run`` picks ``--softmax-quantizer sulq`` for this method).
* ``"quantizers"`` (``--method is-vit-quant``, the package's variant): stage 1 the activation quantizers (the
  channel-wise ones through ``r`` and ``shift``) with float weights, stage 3 every quantizer and refinement.

Checkpoint/resume is not supported for this method (each stage is short; rerun it).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, List, Tuple

import torch
from torch import Tensor, nn

from calib.stream import as_images
from lowbit import primitives as P
from lowbit.errors import UserError
from quant.calibrate import calibrate
from quant.modules import ACT_PERCENTILES, ActQuantizer, QuantLinear, quant_modules, set_mode

LN_OF = {"attn.qkv": "norm1", "mlp.fc1": "norm2", "downsample.reduction": "downsample.norm"}


def post_ln_pairs(model: nn.Module) -> List[Tuple[nn.LayerNorm, QuantLinear]]:
    """``(LayerNorm, QuantLinear)`` for every rescaled post-LayerNorm linear (the LayerNorm feeds only it)."""
    pairs = []
    for name, m in model.named_modules():
        if not (isinstance(m, QuantLinear) and m.rescale):
            continue
        suffix = next((k for k in LN_OF if name.endswith(k)), None)
        if suffix is None:
            raise ValueError(f"{name}: rescaled linear without a known LayerNorm (expected {', '.join(LN_OF)})")
        ln_name = name[: -len(suffix)] + LN_OF[suffix]
        ln = model.get_submodule(ln_name)
        if not isinstance(ln, nn.LayerNorm) or ln.weight is None or ln.bias is None:
            raise ValueError(f"{ln_name} must be an affine nn.LayerNorm to fold the channel-wise quantizer into it")
        pairs.append((ln, m))
    return pairs


@torch.no_grad()
def init_channelwise(model: nn.Module, images: Tensor, percentiles=ACT_PERCENTILES, search: bool = False) -> None:
    """Stage-1 initialisation: per-channel ``(s[c], z[c])`` of each post-LN input from ``images`` (float forward),
    written as layer-wise ``(s~, z~)`` plus ``r``, ``shift``; from ``percentiles``, or by the authors' percentile
    search per channel (``search``)."""
    pairs = post_ln_pairs(model)
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a: inputs.__setitem__(id(mod), a[0].detach()))
             for _, m in pairs]
    modes = {id(m): m.mode for m in quant_modules(model)}
    set_mode(model, "float")
    try:
        model(images)
    finally:
        for h in hooks:
            h.remove()
        for m in quant_modules(model):
            m.set_mode(modes[id(m)])
    for _, m in pairs:
        x = inputs[id(m)].float().reshape(-1, m.in_features)
        if search:
            s, z = (t.reshape(-1) for t in P.init_qparams_searched(x.t(), m.a_bits, P.PUBLISHED_ACT_PCTS))
        else:
            lo = P.percentile(x, percentiles[0], dim=0).reshape(-1)
            hi = P.percentile(x, percentiles[1], dim=0).reshape(-1)
            s, z = P.qparams_from_range(lo, hi, m.a_bits)
        st, zt, r, shift = P.channelwise_to_layerwise(s, z, m.a_bits)
        m.log_r.copy_(r.log())
        m.shift.copy_(shift)
        m.act.log_s.copy_(st.log())
        m.act.z.copy_(zt)
        m.act.initialised.fill_(True)


@torch.no_grad()
def fold_into_layernorms(model: nn.Module) -> None:
    """Stage 2: fold each post-LN linear's ``r``, ``shift`` into its LayerNorm and weight; ``r = 1``, ``shift = 0``
    frozen. The float output is unchanged; the fake-quant output too (same codes, same folded weight)."""
    for ln, m in post_ln_pairs(model):
        r, shift = m.r.detach().to(ln.weight.dtype), m.shift.detach().to(ln.weight.dtype)
        g, b = P.fold_into_layernorm(ln.weight, ln.bias, r, shift)
        w, bias = m.folded()
        ln.weight.copy_(g)
        ln.bias.copy_(b)
        m.weight.copy_(w)
        if m.bias is None:
            m.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            m.bias.copy_(bias)
        m.dW.zero_()
        m.log_r.zero_()
        m.shift.zero_()
        m.log_r.requires_grad_(False)
        m.shift.requires_grad_(False)


def use_searched_init(model: nn.Module) -> None:
    """Initialise every uniform activation and weight quantizer of ``model`` from now on by I&S-ViT's percentile
    search (:func:`lowbit.primitives.init_qparams_searched`; weights per output channel)."""
    for m in model.modules():
        if isinstance(m, ActQuantizer):
            m.search = True
        if hasattr(m, "init_weight_qparams"):
            m.w_search = True


def _weight_param(name: str) -> bool:
    return name.endswith(("dW", "log_ws", "wz"))


TRAIN = ("weights", "quantizers")


def _trainable(m: nn.Module, train: str, stage: int, folded: bool):
    """Which parameters of the quantized module ``m`` a reconstruction stage trains."""
    for n, p in m.named_parameters():
        if train == "weights":
            on = n == "dW" or (n == "bias" and p.dtype.is_floating_point)
        elif stage == 1:
            on = n not in ("weight", "bias") and not _weight_param(n)
        else:
            on = n not in ("weight", "bias") and not (folded and n in ("log_r", "shift"))
        p.requires_grad_(on)


def sos(student: nn.Module, teacher: nn.Module, images, cfg, optimize: Callable, init_size: int = 32,
        train: str = "weights") -> dict:
    """Run the three SOS stages on a calibrated ``student`` (``cfg`` an :class:`quant.optimize.OptimConfig`;
    ``iters`` per block and stage; ``images`` a tensor or :class:`calib.stream.CalibImages`); ``train`` one of
    :data:`TRAIN` (module docstring). Each stage runs ``optimize(student, teacher, images, stage_cfg)``
    (:func:`quant.optimize.optimize`, which calls this with itself). Returns its history."""

    if train not in TRAIN:
        raise ValueError(f"train must be one of {', '.join(TRAIN)}, got {train!r}")
    images = as_images(images)

    if cfg.resume or cfg.stop_after is not None:
        raise UserError(f"--method {cfg.method} does not support --resume/--stop-after; run it in one go")
    bits = getattr(student, "quant_bits", None)
    pairs = post_ln_pairs(student)
    if not pairs and bits is not None and not bits.act_float:
        raise UserError(f"--method {cfg.method} needs the channel rescale of post-LayerNorm linears; drop --no-rescale")
    published = {"l2": 0.0, "head_loss": "mse", "layer_units": True} if train == "weights" else {}
    stage_cfg = dataclasses.replace(cfg, method="blockwise", save_every=0, state_path=None, resume=False,
                                    stop_after=None, **published)
    qmods = quant_modules(student)
    device = next(student.parameters()).device
    init_images = images.head(init_size).to(device)
    if train == "weights":  # the authors' initialisation: every quantizer by their percentile search
        use_searched_init(student)
        calibrate(student, init_images)
    init_channelwise(student, init_images, search=train == "weights")

    for m in qmods:
        m.quantize_weights = False
        _trainable(m, train, 1, False)
    try:  # as published, stage 1 reconstructs each block from the FP model's input to it (last_stage=False)
        h1 = optimize(student, teacher, images, dataclasses.replace(
            stage_cfg, block_inputs="teacher" if train == "weights" else "student"))
    finally:
        for m in qmods:
            m.quantize_weights = True

    fold_into_layernorms(student)
    folded = {id(m) for _, m in pairs}
    for m in qmods:
        if hasattr(m, "init_weight_qparams") and (train == "weights" or id(m) in folded):
            m.init_weight_qparams()
        _trainable(m, train, 3, id(m) in folded)
    h3 = optimize(student, teacher, images, stage_cfg)
    return {"losses": h1["losses"] + h3["losses"], "steps": h1["steps"] + h3["steps"], "completed": True,
            "stage_steps": [h1["steps"], h3["steps"]]}
