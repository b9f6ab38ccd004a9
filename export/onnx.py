"""Export a packed checkpoint as a standard QDQ ONNX graph: ``python -m export.onnx MODEL.lowbit -o model.onnx``.

The graph is the loaded model (:func:`export.load`) written with ONNX's own quantization operators, so ONNX
Runtime, TensorRT and other runtimes can run it:

* weights: integer initializers (the codes ``q`` in ``[0, qmax]``, ``[K, N]``: uint8, or uint4 for weights of at
  most 4 bits with ``--opset 21`` or later) behind a per-output-channel ``DequantizeLinear(q, w_scale[N],
  w_zero[N], axis=1)``, feeding a ``MatMul``. ONNX Runtime (1.32) fuses the uint8 form into its integer kernels,
  closest to the packed model; the uint4 form is half the size but runs its float path;
* activations: at every quantizer of the model, ``QuantizeLinear(x, s, z)`` to uint8 (``round(x / s) + z``, ties to
  even, saturated to ``[0, 255]``), then ``DequantizeLinear``. An 8-bit quantizer is exactly that pair; a 3/4/6-bit
  one is that pair followed by a ``Clip`` to ``[(0 - z) s, (qmax - z) s]`` (the same values as clamping the codes to
  ``[0, qmax]``), so its grid is its own bit width's;
* the quantized Q, K, V and softmax output of the attention (uniform probability quantizer; the SULQ quantizer is
  not a QDQ pattern and is refused), the folded rescale/shift (``Sub``, ``Div`` before a quantizer, or the folded
  affine of a fused ``LayerNormalization``), Swin's relative position bias and shifted-window mask as float ``Add``.

The float arithmetic between the quantizers runs in the runtime's float32 (``MatMul`` of dequantized tensors),
not in the exact integer accumulation of :mod:`kernels.ops`, so outputs match the packed model closely, not bit for
bit (checked against ONNX Runtime in the tests). The graph is traced with PyTorch's TorchScript ONNX exporter
(``torch.onnx.export(..., dynamo=False)``); ``onnx`` and ``onnxruntime`` come with ``pip install -e ".[onnx]"``.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import types
import warnings
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:  # optional: pip install -e ".[onnx]"
    import ml_dtypes  # (a dependency of onnx: its 4-bit numpy types)
    import onnx
    from onnx import helper, numpy_helper
except ImportError:  # pragma: no cover - the error names the fix where it is needed
    onnx = None

from lowbit import packing
from lowbit import primitives as P
from lowbit.errors import UserError
from lowbit.primitives import QParams

from .format import CheckpointError
from .loader import load
from .runtime import (
    PackedLinear,
    PackedMlp,
    PackedPatchEmbed,
    PackedViTAttention,
    PackedWindowAttention,
    _PackedAttention,
)

DEFAULT_OPSET = 17
FOUR_BIT_OPSET = 21  # uint4 / int4 tensors (W1.58, W3, W4 weights at half a byte each)
WEIGHT = "qdq_weight"  # the float weight parameter each packed linear carries while it is traced


def _qdq(x: Tensor, qp: QParams) -> Tensor:
    """``DequantizeLinear(QuantizeLinear(x))`` on the quantizer's own grid (uint8, then a ``Clip`` below 8 bits)."""
    s = float(qp.s)
    z = int(P.round_zero_point(torch.as_tensor(qp.z, dtype=torch.float32), qp.bits))
    qmax = P.qmax(qp.bits)
    if qmax < 255:  # the code range of a narrower grid, as float bounds before the quantizer
        lo, hi = (torch.tensor([0.0 - z, float(qmax - z)]) * torch.tensor(s)).tolist()  # float32 (q - z) * s
        x = x.clamp(lo, hi)
    return torch.fake_quantize_per_tensor_affine(x, s, z, 0, 255)


def _linear_input(layer: PackedLinear, x: Tensor) -> Tensor:
    if layer.ln_eps is not None:
        return F.layer_norm(x, (layer.in_features,), layer.ln_weight, layer.ln_bias, layer.ln_eps)
    return P.apply_rescale(x, layer.r, layer.shift)


def _linear(layer: PackedLinear, x: Tensor, gelu: bool = False) -> Tensor:
    y = torch.matmul(_qdq(_linear_input(layer, x), layer.in_qp), getattr(layer, WEIGHT))
    if layer.bias is not None:
        y = y + layer.bias
    return F.gelu(y) if gelu else y


def _mlp(self: PackedMlp, x: Tensor) -> Tensor:
    return _linear(self.fc2, _linear(self.fc1, x, gelu=True))


def _attention(self: _PackedAttention, x: Tensor, mask: Optional[Tensor] = None, **_) -> Tensor:
    b, n, c = x.shape
    qkv = _linear(self.qkv, x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = (_qdq(t, self.qp(name)) for t, name in zip(qkv.unbind(0), "qkv"))
    s = torch.matmul(q, k.transpose(-2, -1)) * self.scale
    if isinstance(self, PackedWindowAttention):
        s = s + self.rel_pos_bias().unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            s = (s.view(-1, nw, self.num_heads, n, n) + mask.float().unsqueeze(1).unsqueeze(0)).view(-1, self.num_heads,
                                                                                                  n, n)
    o = torch.matmul(_qdq(torch.softmax(s, dim=-1), self.qp("p")), v)
    return _linear(self.proj, o.transpose(1, 2).reshape(b, n, -1))


def _patch_embed(self: PackedPatchEmbed, x: Tensor) -> Tensor:
    d, c, ph, pw = self.kernel_shape
    y = _linear(self.linear, P.patchify(x, (ph, pw)))
    return y.reshape(x.shape[0], x.shape[2] // ph, x.shape[3] // pw, d).permute(0, 3, 1, 2)


_FORWARDS = {PackedLinear: lambda self, x: _linear(self, x), PackedMlp: _mlp, PackedViTAttention: _attention,
             PackedWindowAttention: _attention, PackedPatchEmbed: _patch_embed}


def dequantized_weight(layer: PackedLinear) -> Tensor:
    """float32 ``[K, N]`` ``(q - zw[n]) * sw[n]``: what ``DequantizeLinear`` of the layer's codes gives."""
    q, sw, zw = _weight_codes(layer)
    return ((q.float() - zw.float()) * sw).contiguous()


def _weight_codes(layer: PackedLinear):
    """``(codes [K, N] uint8, scale [N] float32, zero point [N] uint8)`` of a packed linear."""
    q = packing.unpack(layer.packed()).t().contiguous().to(torch.uint8)
    zw = P.round_zero_point(layer.w_zero.float(), layer.w_bits).to(torch.uint8)
    return q, layer.w_scale.float().contiguous(), zw


@contextlib.contextmanager
def qdq_forwards(model: nn.Module) -> Iterator[None]:
    """Within the block ``model`` computes its QDQ float form (what the exported graph computes): every packed module
    runs the float quantize-dequantize forward of this module, packed linears carry their dequantized weight as the
    parameter ``qdq_weight``, and the CPU backend's block and model forwards step aside."""
    saved = []
    try:
        for m in model.modules():
            if isinstance(m, _PackedAttention) and m.qp("p").__class__ is not QParams:
                raise UserError("the SULQ softmax quantizer has no QDQ form in ONNX; export a model quantized with "
                                "the uniform softmax quantizer (quant.run --softmax-quantizer uniform)")
            if "forward" in m.__dict__:
                saved.append((m, m.__dict__.pop("forward")))
            fn = _FORWARDS.get(type(m))
            if fn is not None:
                m.forward = types.MethodType(fn, m)
            if isinstance(m, PackedLinear):
                m.register_parameter(WEIGHT, nn.Parameter(dequantized_weight(m), requires_grad=False))
        yield
    finally:
        for m in model.modules():
            if type(m) in _FORWARDS:
                m.__dict__.pop("forward", None)
            if isinstance(m, PackedLinear) and WEIGHT in m._parameters:
                del m._parameters[WEIGHT]
        for m, fwd in saved:
            m.forward = fwd


def _integer_weights(graph, model: nn.Module, opset: int) -> int:
    """Replace each traced float weight initializer ``<layer>.qdq_weight`` by its codes, per-channel scale and zero
    point behind a ``DequantizeLinear`` (axis 1): uint4 codes and zero points for weights of at most 4 bits from
    opset 21 (the first with 4-bit types), uint8 otherwise; returns how many were replaced."""
    layers = {f"{name}.{WEIGHT}": m for name, m in model.named_modules() if isinstance(m, PackedLinear)}
    found = 0
    for init in list(graph.initializer):
        layer = layers.get(init.name)
        if layer is None:
            continue
        q, sw, zw = _weight_codes(layer)
        base = init.name[: -len(WEIGHT) - 1]
        names = [f"{base}.w_codes", f"{base}.w_scale", f"{base}.w_zero"]
        graph.initializer.remove(init)
        arrays = [q.numpy(), sw.numpy(), zw.numpy()]
        if opset >= FOUR_BIT_OPSET and P.qmax(layer.w_bits) <= 15:
            arrays[0], arrays[2] = (a.astype(ml_dtypes.uint4) for a in (arrays[0], arrays[2]))
        graph.initializer.extend([numpy_helper.from_array(a, n) for a, n in zip(arrays, names)])
        graph.node.insert(0, helper.make_node("DequantizeLinear", names, [init.name], name=f"{base}.w_dequantize",
                                              axis=1))
        found += 1
    if found != len(layers):
        raise RuntimeError(f"only {found} of {len(layers)} packed weights were found in the traced graph")
    return found


def to_onnx(model: "Union[nn.Module, str, os.PathLike]", path: "Union[str, os.PathLike]", batch: Optional[int] = 1,
            opset: int = DEFAULT_OPSET, image_size: Optional[int] = None, overwrite: bool = False) -> Path:
    """Write the QDQ ONNX graph of a packed checkpoint (a path, or a model :func:`export.load` returned) to ``path``
    atomically. ``batch``: the fixed batch size, or None for a dynamic one; ``image_size``: the input resolution
    (default: the checkpoint's). Checked with ``onnx.checker``; an existing ``path`` is refused unless
    ``overwrite``."""
    if onnx is None:
        raise UserError("ONNX export needs the onnx package: pip install -e \".[onnx]\"")
    path = Path(path)
    if path.exists() and not overwrite:
        raise UserError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    if opset < 13:
        raise UserError(f"--opset {opset}: per-channel DequantizeLinear needs opset 13 or later")
    if batch is not None and batch < 1:
        raise UserError(f"--batch must be >= 1 or 'dynamic', got {batch}")
    m = load(model) if not isinstance(model, nn.Module) else model
    if any(t.device.type != "cpu" for t in m.buffers()):
        raise UserError("export the ONNX graph from a model on the CPU: export.load(path) (device='cpu')")
    size = image_size or m.lowbit_manifest.get("preprocess", {}).get("input_size") or 224
    x = torch.randn(batch or 2, 3, int(size), int(size), generator=torch.Generator().manual_seed(0))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".onnx.tmp")
    os.close(fd)
    try:
        with torch.no_grad(), qdq_forwards(m), warnings.catch_warnings():
            # the quantizers' values become graph constants (what the tracer warns about) and the TorchScript
            # exporter is the one that writes fake-quantize as QuantizeLinear / DequantizeLinear
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(m, (x,), tmp, dynamo=False, opset_version=opset, input_names=["images"],
                              output_names=["logits"], do_constant_folding=True,
                              dynamic_axes=None if batch else {"images": {0: "batch"}, "logits": {0: "batch"}})
            graph = onnx.load(tmp)
            _integer_weights(graph.graph, m, opset)
        graph.producer_name = "lowbit-vit"
        onnx.checker.check_model(graph)
        onnx.save(graph, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.onnx", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a .lowbit file (export.export_model / quant.run --export)")
    ap.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    ap.add_argument("--batch", default="1", help="fixed batch size, or 'dynamic' (default 1)")
    ap.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    ap.add_argument("--image-size", type=int, default=None, help="input resolution (default: the checkpoint's)")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    try:
        if args.batch != "dynamic" and not args.batch.isdigit():
            raise UserError(f"--batch must be a number or 'dynamic', got {args.batch!r}")
        if not os.path.isfile(args.checkpoint):
            raise UserError(f"checkpoint {args.checkpoint!r} does not exist; pass a .lowbit file")
        out = to_onnx(args.checkpoint, args.output, None if args.batch == "dynamic" else int(args.batch), args.opset,
                      args.image_size, args.overwrite)
    except (UserError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
