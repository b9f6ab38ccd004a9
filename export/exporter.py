"""Write a quantized timm ViT/DeiT/Swin (from :func:`quant.surgery.quantize_model`) as a packed checkpoint.

Tensors (see :mod:`export.format` for the file and its manifest):

* ``quant.<layer>.w.<plane>``: packed weight codes (``lowbit.packing``: ``2bit`` ternary, ``int3`` lo/hi planes,
  ``int4`` nibbles, ``int8`` signed for 6/8 bits) of the folded weight ``W' = (W + dW) * r``;
  ``quant.<layer>.w_scale`` fp32 ``[N]``, ``w_zero`` uint8 ``[N]`` (unsigned), ``bias`` fp32 ``[N]``
  (``b' = b + (W + dW) @ shift``), ``in_s``/``in_z`` fp32 0-d (the input's per-tensor quantizer);
* a LayerNorm feeding only one linear (ViT/Swin ``norm1 -> attn.qkv``, ``norm2 -> mlp.fc1``, Swin
  ``downsample.norm -> reduction``) is fused into it with the rescale folded into its affine map:
  ``gamma' = gamma / r``, ``beta' = (beta - shift) / r`` (``quant.<layer>.ln_weight``/``ln_bias``, fp32) since
  ``(LN(x) - shift) / r`` is then exactly ``LN'(x)``; where that is not exact (Swin blocks whose windows pad the
  input) ``r``/``shift`` are stored (``quant.<layer>.r``/``shift``) and the LayerNorm stays a float tensor;
* ``quant.<attention>.{q,k,v,p}_s``/``_z``: per-tensor quantizers of Q, K, V and the probabilities; under a SULQ
  probability quantizer (manifest ``p_quantizer``: ``"sulq"``, I&S-ViT's published form, or ``"sulq-learned"``;
  ``p_bits``) also ``quant.<attention>.p_eta`` and ``p_x0``: the probabilities are ``2^(-t) - eta``,
  ``t = dequant(codes of -log2(p + eta) - x0) + x0`` with the log-domain ``(p_s, p_z)``, rounded under ``"sulq"``
  (files without ``p_x0``, written before the published form existed, hold the learned form with ``x0 = 0``);
* ``quant.<block>.act_correction.matrix``: fp32 ``[D, D]`` DFQ-ViT activation correction of a block (manifest
  ``act_correction``: the block paths), whose output ``y`` (after both residual additions) becomes ``y @ M^T``
  over the last (channel) dim; kept in fp32, exact;
* ``float.<name>``: every other tensor of the model's state dict (LayerNorms, position embedding, class/distillation
  tokens, Swin relative position tables) in fp16.

Manifest fields: ``architecture`` (alias or timm name), ``timm_name``, ``model_args`` (constructor kwargs),
``bits``, ``modules`` (the layer list: kind, name, shapes, formats, fused norms), ``act_correction`` (block paths),
``preprocess`` (eval transform).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from timm.layers import Mlp
from torch import Tensor, nn

from lowbit import packing
from lowbit.bits import parse_bits
from lowbit.models import input_size, resolve
from lowbit.primitives import SULQParams
from quant.modules import ActCorrection, QuantAttentionCore, QuantConv2dPatch, QuantLayerNorm, QuantLinear
from quant.surgery import QuantViTAttention, QuantWindowAttention, fusable_norm

from . import format as fmt

QUANT, FLOAT = "quant.", "float."


def _linear(model: nn.Module, name: str, m: QuantLinear, tensors: Dict[str, Tensor]) -> dict:
    d = m.deploy()
    if d["input"] is None:
        raise ValueError(f"layer {name}: activations in float (A16) cannot be exported: the packed kernels take "
                         f"int8 activations; quantize with an activation bit-width (e.g. w4a8)")
    pw = packing.pack(d["codes"], m.w_bits)
    p = QUANT + name
    for plane, t in pw.planes.items():
        tensors[f"{p}.w.{plane}"] = t
    tensors[f"{p}.w_scale"] = d["w_scale"].float()
    tensors[f"{p}.w_zero"] = d["w_zero"].to(torch.uint8)
    tensors[f"{p}.bias"] = d["bias"].float()
    tensors[f"{p}.in_s"] = d["input"].s.float().reshape(())
    tensors[f"{p}.in_z"] = d["input"].z.float().reshape(())
    entry = {"name": name, "n": pw.n, "k": pw.k, "w_bits": m.w_bits, "a_bits": m.a_bits, "format": pw.fmt,
             "fused_norm": None, "ln_eps": None, "rescale": d["r"] is not None}
    norm = fusable_norm(model, name)
    if norm is not None:
        ln = model.get_submodule(norm)
        if not isinstance(ln, QuantLayerNorm):
            raise ValueError(f"{norm} feeds only {name} but is a plain {type(ln).__name__}; quantize the model with "
                             f"quant.surgery.quantize_model, which marks it for fusion")
        g, b = ln.folded_affine()
        tensors[f"{p}.ln_weight"], tensors[f"{p}.ln_bias"] = g, b
        entry.update(fused_norm=norm, ln_eps=float(ln.eps))
    elif d["r"] is not None:
        tensors[f"{p}.r"], tensors[f"{p}.shift"] = d["r"].float(), d["shift"].float()
    return entry


def _attention(model: nn.Module, name: str, m: nn.Module, tensors: Dict[str, Tensor]) -> dict:
    core: QuantAttentionCore = m.core
    qps = core.deploy()
    if any(qp is None for qp in qps.values()):
        raise ValueError(f"{name}: attention in float (A16) cannot be exported; quantize activations")
    for k, qp in qps.items():
        tensors[f"{QUANT}{name}.{k}_s"] = qp.s.float().reshape(())
        tensors[f"{QUANT}{name}.{k}_z"] = qp.z.float().reshape(())
    p = qps["p"]
    entry = {"name": name, "num_heads": int(m.num_heads), "scale": float(m.scale),
             "qkv": _linear(model, f"{name}.qkv", m.qkv, tensors),
             "proj": _linear(model, f"{name}.proj", m.proj, tensors),
             "p_quantizer": ("sulq" if p.pow2 else "sulq-learned") if isinstance(p, SULQParams) else "uniform",
             "p_bits": p.bits}
    if isinstance(p, SULQParams):
        tensors[f"{QUANT}{name}.p_eta"] = p.eta.float().reshape(())
        tensors[f"{QUANT}{name}.p_x0"] = torch.as_tensor(p.x0, dtype=torch.float32).reshape(())
    if isinstance(m, QuantWindowAttention):
        entry.update(kind="window_attention", window_area=int(m.window_area))
    else:
        if not isinstance(m.q_norm, nn.Identity) or not isinstance(m.k_norm, nn.Identity) or \
                not isinstance(m.norm, nn.Identity):
            raise ValueError(f"{name}: q/k norms inside attention are not supported by the packed runtime")
        entry.update(kind="vit_attention", head_dim=int(m.head_dim))
    return entry


def _mlp(model: nn.Module, name: str, m: Mlp, tensors: Dict[str, Tensor]) -> dict:
    act = m.act
    if not (isinstance(act, nn.GELU) and act.approximate == "none") or not isinstance(m.norm, nn.Identity):
        raise ValueError(f"{name}: only Mlp(fc1 -> exact GELU -> fc2) is supported by the packed runtime, got "
                         f"act={type(act).__name__}, norm={type(m.norm).__name__}")
    return {"name": name, "kind": "mlp", "fc1": _linear(model, f"{name}.fc1", m.fc1, tensors),
            "fc2": _linear(model, f"{name}.fc2", m.fc2, tensors)}


def _patch(name: str, m: QuantConv2dPatch, tensors: Dict[str, Tensor]) -> dict:
    d = m.deploy()
    ks, stride = d["kernel_shape"], d["stride"]
    if tuple(stride) != tuple(ks[2:]):
        raise ValueError(f"{name}: patch conv stride {stride} != kernel {ks[2:]}; only non-overlapping patches")
    if d["input"] is None:
        raise ValueError(f"{name}: float image input (A16) cannot be exported")
    pw = packing.pack(d["codes"], m.w_bits)
    p = QUANT + name
    for plane, t in pw.planes.items():
        tensors[f"{p}.w.{plane}"] = t
    tensors[f"{p}.w_scale"] = d["w_scale"].float()
    tensors[f"{p}.w_zero"] = d["w_zero"].to(torch.uint8)
    if d["bias"] is not None:
        tensors[f"{p}.bias"] = d["bias"].float()
    tensors[f"{p}.in_s"] = d["input"].s.float().reshape(())
    tensors[f"{p}.in_z"] = d["input"].z.float().reshape(())
    return {"name": name, "kind": "patch", "n": pw.n, "k": pw.k, "w_bits": m.w_bits, "a_bits": d["input"].bits,
            "format": pw.fmt, "kernel_shape": list(ks), "has_bias": d["bias"] is not None}


def _act_corrections(qmodel: nn.Module, tensors: Dict[str, Tensor]) -> List[str]:
    """Store every block's activation correction matrix (fp32); returns the block paths."""
    out = []
    for name, m in qmodel.named_modules():
        if isinstance(m, ActCorrection):
            block = name.rpartition(".")[0]
            tensors[f"{QUANT}{name}.matrix"] = m.deploy()["matrix"]
            out.append(block)
    return out


def collect(qmodel: nn.Module) -> Tuple[Dict[str, Tensor], List[dict], List[str]]:
    """``(tensors, modules, corrected)``: every checkpoint tensor of ``qmodel``, the layer list of the manifest and
    the paths of the blocks carrying an activation correction."""
    tensors: Dict[str, Tensor] = {}
    modules: List[dict] = []
    done: List[str] = []
    named = list(qmodel.named_modules())

    def inside(n: str) -> bool:
        return any(n == d or n.startswith(d + ".") for d in done)

    for name, m in named:
        if isinstance(m, (QuantViTAttention, QuantWindowAttention)):
            modules.append(_attention(qmodel, name, m, tensors))
            done.append(name)
        elif isinstance(m, Mlp) and isinstance(m.fc1, QuantLinear) and isinstance(m.fc2, QuantLinear):
            modules.append(_mlp(qmodel, name, m, tensors))
            done.append(name)
    for name, m in named:
        if isinstance(m, QuantLinear) and not inside(name):
            e = _linear(qmodel, name, m, tensors)
            e["kind"] = "linear"
            modules.append(e)
        elif isinstance(m, QuantConv2dPatch):
            modules.append(_patch(name, m, tensors))
    corrected = _act_corrections(qmodel, tensors)
    if not modules:
        raise ValueError("model has no quantized layers; run quant.surgery.quantize_model (and calibrate) first")
    state = qmodel.state_dict()
    for k in float_state_keys(qmodel):
        v = state[k]
        tensors[FLOAT + k] = v.detach().half() if v.is_floating_point() else v.detach()
    return tensors, modules, corrected


def float_state_keys(qmodel: nn.Module) -> List[str]:
    """State-dict keys stored as ``float.<key>`` (floats in fp16): all but the tensors of the quantized layers and of
    the LayerNorms fused into them (:class:`QuantLayerNorm`)."""
    named = list(qmodel.named_modules())
    quant_prefixes = tuple(n + "." for n, m in named
                           if isinstance(m, (QuantLinear, QuantConv2dPatch, QuantAttentionCore, ActCorrection)))
    fused = {n for n, m in named if isinstance(m, QuantLayerNorm)}
    return [k for k in qmodel.state_dict() if not k.startswith(quant_prefixes) and k.rpartition(".")[0] not in fused]


@torch.no_grad()
def round_float_tensors_(qmodel: nn.Module) -> nn.Module:
    """Round (in place) the float tensors the checkpoint stores in fp16 to fp16 precision, so that ``qmodel``
    computes what the exported file does (in ``"int"`` mode: bit for bit on the CPU). Returns ``qmodel``."""
    state = qmodel.state_dict()
    for k in float_state_keys(qmodel):
        if state[k].is_floating_point():
            state[k].copy_(state[k].half())
    return qmodel


def default_preprocess(qmodel: nn.Module, arch: str) -> dict:
    """Eval transform fields as :func:`lowbit.models.eval_transform` builds them (bicubic, crop, mean/std)."""
    spec = resolve(arch)
    cfg = getattr(qmodel, "pretrained_cfg", {}) or {}
    return {"input_size": input_size(qmodel), "crop_pct": spec.crop_pct, "interpolation": "bicubic",
            "mean": list(spec.mean or cfg.get("mean", (0.485, 0.456, 0.406))),
            "std": list(spec.std or cfg.get("std", (0.229, 0.224, 0.225)))}


def export_model(qmodel: nn.Module, path: "str | os.PathLike", arch: str, config: Optional[dict] = None,
                 bits=None, overwrite: bool = False, preprocess: Optional[dict] = None) -> Path:
    """Write ``qmodel`` (a quantized, calibrated timm ViT/DeiT/Swin) to ``path`` atomically.

    ``arch``: alias or timm name the skeleton is rebuilt from (``lowbit.models.resolve``); ``config``: its
    constructor kwargs; ``bits``: the spec (default ``qmodel.quant_bits``). Refuses an existing ``path`` unless
    ``overwrite``.
    """
    spec = resolve(arch)
    cfg = parse_bits(bits if bits is not None else getattr(qmodel, "quant_bits", None) or "")
    if cfg.act_float:
        raise ValueError(f"bits {cfg.name}: A16 (float activations) cannot be exported; the packed kernels take "
                         f"int8 activations")
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    raw = [n for n, m in qmodel.named_modules() if isinstance(getattr(m, "initialised", None), Tensor)
           and getattr(m, "enabled", True) and not bool(m.initialised)]
    if raw:
        raise ValueError(f"quantizers of {raw[:3]} are not initialised; run quant.calibrate.calibrate(model, images) "
                         f"before exporting")
    with torch.no_grad():
        tensors, modules, corrected = collect(qmodel)
    meta = {"architecture": arch, "timm_name": spec.timm_name, "model_args": dict(config or {}), "bits": cfg.name,
            "modules": modules, "act_correction": corrected, "preprocess": preprocess or default_preprocess(qmodel, arch),
            "layouts": {name: {"k_multiple": f.k_multiple, "planes": [list(p) for p in f.planes]}
                        for name, f in packing.FORMATS.items()}}
    return fmt.save(path, tensors, meta, overwrite=overwrite)


def checkpoint_bytes(tensors: Dict[str, Tensor]) -> int:
    """Tensor data bytes of a checkpoint (the file adds only its JSON header)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def fp16_state_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s float state dict stored in fp16 (the size baseline)."""
    return sum(v.numel() * 2 for v in model.state_dict().values() if v.is_floating_point())
