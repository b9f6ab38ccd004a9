"""``load(path)``: rebuild the inference model of a packed checkpoint (weights stay packed in memory).

The float skeleton comes from the manifest (``lowbit.models.resolve(architecture)``: the registry loader or
``timm.create_model(timm_name, pretrained=False, **model_args)``) or from the caller (``model=``); its quantized
layers are replaced by :mod:`export.runtime` modules built from the packed tensors, fused LayerNorms become
``nn.Identity``, blocks listed in the manifest's ``act_correction`` get their fp32 correction matrix
(:func:`export.runtime.attach_correction`), and the remaining float tensors (fp16 in the file) load into it strictly. Any disagreement between
file and skeleton raises :class:`export.format.CheckpointError` naming it.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch
from timm.layers import Mlp
from torch import Tensor, nn

from kernels import ops
from lowbit import packing
from lowbit.models import resolve
from lowbit.primitives import QParams, SULQParams

from . import format as fmt
from .exporter import FLOAT, QUANT
from .runtime import (
    PackedLinear,
    PackedMlp,
    PackedPatchEmbed,
    PackedViTAttention,
    PackedWindowAttention,
    attach_correction,
    prepare,
)

CheckpointError = fmt.CheckpointError


def _skeleton(manifest: dict, path) -> nn.Module:
    arch, args = manifest.get("architecture"), manifest.get("model_args", {})
    try:
        spec = resolve(arch)
        if spec.loader is not None:
            return spec.loader(None, dict(args))
        import timm
        return timm.create_model(spec.timm_name, pretrained=False, **args)
    except Exception as e:  # noqa: BLE001 - unknown name, bad kwargs: the manifest does not describe a model here
        raise CheckpointError(f"{path}: cannot build architecture {arch!r} with {args} ({type(e).__name__}: {e}); "
                              f"the manifest names a model this installation does not have") from None



class _Reader:
    def __init__(self, tensors: Dict[str, Tensor], path):
        self.tensors, self.path, self.used = tensors, path, set()

    def __call__(self, key: str, shape=None, dtype=None) -> Tensor:
        t = self.tensors.get(QUANT + key)
        if t is None:
            raise CheckpointError(f"{self.path}: tensor {QUANT + key!r} is missing; the file is incomplete, "
                                  f"re-export it")
        if (shape is not None and tuple(t.shape) != tuple(shape)) or (dtype is not None and t.dtype != dtype):
            raise CheckpointError(f"{self.path}: tensor {QUANT + key!r} is {t.dtype} {list(t.shape)}, the layer "
                                  f"needs {dtype} {list(shape) if shape is not None else ''}")
        self.used.add(QUANT + key)
        return t

    def has(self, key: str) -> bool:
        return QUANT + key in self.tensors


def _packed_linear(e: dict, read: _Reader, model: nn.Module, path) -> PackedLinear:
    name, n, k = e["name"], e["n"], e["k"]
    fmt_name = packing.format_for_bits(e["w_bits"])
    if fmt_name != e["format"]:
        raise CheckpointError(f"{path}: layer {name}: format {e['format']!r} does not match {e['w_bits']}-bit weights")
    if e.get("kind") != "patch":
        target = _get(model, name, path)
        tn, tk = getattr(target, "out_features", None), getattr(target, "in_features", None)
        if (tn, tk) != (n, k):
            raise _mismatch(path, f"layer {name} is [{n}, {k}] in the checkpoint but {[tn, tk]} in the model", read)
    planes = {}
    for plane, per in packing.FORMATS[fmt_name].planes:
        dtype = torch.int8 if fmt_name == "int8" else torch.uint8
        planes[plane] = read(f"{name}.w.{plane}", (n, packing.padded_k(k, fmt_name) // per), dtype)
    pw = packing.PackedWeight(fmt_name, e["w_bits"], n, k, planes)
    in_qp = QParams(read(f"{name}.in_s", ()), read(f"{name}.in_z", ()), e["a_bits"])
    bias = read(f"{name}.bias", (n,)) if e.get("has_bias", True) else None
    ln = r = shift = None
    if e.get("fused_norm"):
        ln = {"weight": read(f"{name}.ln_weight", (k,)), "bias": read(f"{name}.ln_bias", (k,)), "eps": e["ln_eps"]}
    elif e.get("rescale"):
        r, shift = read(f"{name}.r", (k,)), read(f"{name}.shift", (k,))
    return PackedLinear(pw, read(f"{name}.w_scale", (n,)), read(f"{name}.w_zero", (n,), torch.uint8), bias, in_qp,
                        ln=ln, r=r, shift=shift)


def _mismatch(path, what: str, read: "_Reader") -> CheckpointError:
    return CheckpointError(f"{path}: {what}; the checkpoint was written for another architecture/config "
                           f"({read.arch}): load it without model= or with a skeleton built like that")


def _get(model: nn.Module, name: str, path) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise CheckpointError(f"{path}: the model has no module {name!r}; the checkpoint was written for another "
                              f"architecture/config") from None


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _attention(e: dict, read: _Reader, model: nn.Module, path) -> nn.Module:
    name = e["name"]
    old = _get(model, name, path)
    if getattr(old, "num_heads", None) != e["num_heads"]:
        raise _mismatch(path, f"{name} has {e['num_heads']} heads in the checkpoint but "
                              f"{getattr(old, 'num_heads', None)} in the model", read)
    qkv, proj = _packed_linear(e["qkv"], read, model, path), _packed_linear(e["proj"], read, model, path)
    bits = e["qkv"]["a_bits"]
    qps = {k: QParams(read(f"{name}.{k}_s", ()), read(f"{name}.{k}_z", ()), bits) for k in "qkvp"}
    p_kind, p_bits = e.get("p_quantizer", "uniform"), e.get("p_bits", bits)
    if p_kind in ("sulq", "sulq-learned"):
        x0 = read(f"{name}.p_x0", ()) if read.has(f"{name}.p_x0") else torch.zeros(())  # files before x0: learned
        qps["p"] = SULQParams(read(f"{name}.p_eta", ()), qps["p"].s, qps["p"].z, p_bits, x0,
                              p_kind == "sulq" and read.has(f"{name}.p_x0"))
    elif p_kind == "uniform":
        qps["p"] = qps["p"]._replace(bits=p_bits)
    else:
        raise CheckpointError(f"{path}: {name}: unknown probability quantizer {p_kind!r}; written by a newer version?")
    if e["kind"] == "window_attention":
        return PackedWindowAttention(qkv, proj, e["num_heads"], e["scale"], e["window_area"],
                                     old.relative_position_bias_table, old.relative_position_index, qps)
    return PackedViTAttention(qkv, proj, e["num_heads"], e["head_dim"], e["scale"], qps)


def _correction(name: str, read: _Reader, model: nn.Module, path) -> None:
    from timm.models.swin_transformer import SwinTransformerBlock
    from timm.models.vision_transformer import Block
    block = _get(model, name, path)
    if not isinstance(block, (Block, SwinTransformerBlock)):
        raise _mismatch(path, f"{name} carries an activation correction but is a {type(block).__name__} in the "
                              f"model, not a ViT/Swin block", read)
    d = block.norm1.normalized_shape[0]
    attach_correction(block, read(f"{name}.act_correction.matrix", (d, d), torch.float32))


def build(tensors: Dict[str, Tensor], manifest: dict, model: Optional[nn.Module] = None, path="<memory>") -> nn.Module:
    """The inference model of a checkpoint's ``(tensors, manifest)`` on the skeleton ``model`` (built if None)."""
    model = _skeleton(manifest, path) if model is None else model
    read = _Reader(tensors, path)
    read.arch = f"{manifest.get('architecture')} {manifest.get('model_args', {})}"
    mods = manifest.get("modules")
    if not isinstance(mods, list) or not mods:
        raise CheckpointError(f"{path}: manifest lists no quantized modules; re-export the model")
    corrected = manifest.get("act_correction") or []
    if not isinstance(corrected, list):
        raise CheckpointError(f"{path}: manifest field act_correction must be a list of block paths, got "
                              f"{type(corrected).__name__}")
    for name in corrected:
        _correction(name, read, model, path)
    for e in mods:
        kind, name = e.get("kind"), e.get("name")
        if kind in ("vit_attention", "window_attention"):
            new = _attention(e, read, model, path)
            fused = [e["qkv"].get("fused_norm")]
        elif kind == "mlp":
            if not isinstance(_get(model, name, path), Mlp):
                raise _mismatch(path, f"{name} is not an Mlp in the model", read)
            new = PackedMlp(_packed_linear(e["fc1"], read, model, path), _packed_linear(e["fc2"], read, model, path))
            fused = []
        elif kind == "linear":
            new = _packed_linear(e, read, model, path)
            fused = [e.get("fused_norm")]
        elif kind == "patch":
            old = _get(model, name, path)
            if tuple(getattr(old, "weight", torch.empty(0)).shape) != tuple(e["kernel_shape"]):
                raise _mismatch(path, f"patch embedding {name} is {e['kernel_shape']} in the checkpoint but "
                                      f"{list(getattr(old, 'weight', torch.empty(0)).shape)} in the model", read)
            new = PackedPatchEmbed(_packed_linear(e, read, model, path), e["kernel_shape"])
        else:
            raise CheckpointError(f"{path}: unknown module kind {kind!r} for {name!r}; written by a newer version?")
        _set(model, name, new)
        for n in (e.get("fc1", {}).get("fused_norm"), *fused):
            if n:
                _get(model, n, path)
                _set(model, n, nn.Identity())
    unused = sorted(k for k in tensors if k.startswith(QUANT) and k not in read.used)
    if unused:
        raise CheckpointError(f"{path}: tensors {unused[:5]} belong to no layer of the manifest; the file and its "
                              f"manifest disagree")
    floats = {k[len(FLOAT):]: v for k, v in tensors.items() if k.startswith(FLOAT)}
    try:
        model.load_state_dict(floats, strict=True)
    except RuntimeError as e:
        lines = " ".join(str(e).split())[:400]
        raise CheckpointError(f"{path}: the float tensors do not fit the model: {lines}; the checkpoint was "
                              f"written for another architecture/config") from None
    model.lowbit_manifest = manifest
    return model.eval()


def load(path: "str | os.PathLike", device: "str | torch.device" = "cpu", model: Optional[nn.Module] = None,
         verify: bool = True, compile: "bool | dict" = False) -> nn.Module:
    """Inference ``nn.Module`` of the checkpoint at ``path`` on ``device`` (eval mode, weights packed).

    ``model``: a float skeleton to load into instead of the one the manifest describes (checked against it). Every
    quantized op runs through :mod:`kernels.ops` (the CPU backend on the CPU, whose constants are built here, and
    the Triton kernels on CUDA). Quantizers no model can use (step <= 0, NaN) raise :class:`CheckpointError`.
    ``compile``: wrap the model in ``torch.compile`` (True: on CUDA ``mode="reduce-overhead"``, i.e. CUDA graphs, so
    small batches are not launch-bound; a dict: ``torch.compile`` keyword arguments); the first calls compile, and
    compiled code is not guaranteed bit-identical to the eager path.
    """
    tensors, manifest = fmt.load(path, "cpu", verify=verify)
    with torch.no_grad():
        m = build(tensors, manifest, model, path)
        m = m.to(device)
        try:
            prepare(m)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}; the file holds quantizers no model can use, re-export it") from None
    if compile:
        kw = dict(compile) if isinstance(compile, dict) else (
            {"mode": "reduce-overhead"} if torch.device(device).type == "cuda" else {})
        m = torch.compile(m, **kw)
    return m


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model`` and of the constants its packed layers cache
    (:func:`kernels.ops.cached_tensors`; shared tensors counted once)."""
    seen, total = set(), 0
    cached = [t for m in model.modules() for t in ops.cached_tensors(m)]
    for t in list(model.parameters()) + list(model.buffers()) + cached:
        if t is None or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
