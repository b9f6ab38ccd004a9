"""Inference modules whose weights stay packed in memory; every quantized op goes through :mod:`kernels.ops`.

They replace the matching modules of a float timm skeleton (see :func:`export.loader.load`):

* :class:`PackedLinear`: ``y = act(sa * sw[n] * sum_k (a - za)(w[n, k] - zw[n]) + bias[n])`` with
  ``a = quantize(LN'(x))`` (LayerNorm fused, rescale/shift folded into its affine), ``a = quantize((x - shift) / r)``
  or ``a = quantize(x)``; ``w`` a :class:`lowbit.packing.PackedWeight`.
* :class:`PackedMlp`: ``fc2(GELU(fc1(x)))`` with fc1's output requantized to fc2's input codes in the kernel.
* :class:`PackedViTAttention` / :class:`PackedWindowAttention`: qkv -> per-tensor int8 Q, K, V ->
  :func:`kernels.ops.quant_attention` (Swin: relative position bias and shifted-window mask in float) -> proj;
  probabilities quantized uniformly (:class:`QParams`) or by SULQ (:class:`SULQParams`, buffers ``p_eta``, ``p_x0``).
* :class:`BlockCorrection` + :func:`attach_correction`: a block's output ``y`` becomes ``y @ M^T`` (DFQ-ViT).
* :class:`PackedPatchEmbed`: the patch convolution as im2col (order C, kh, kw) + packed linear, NCHW output.

:func:`prepare` (done by :func:`export.load`) checks every quantizer and builds the backend's cached constants,
gives timm ViT blocks a one-function forward (:func:`kernels.ops.vit_block`) and large CPU batches a chunked one.
"""
from __future__ import annotations

import math
import types
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from kernels import ops
from lowbit import packing
from lowbit import primitives as P
from lowbit.primitives import QParams, SULQParams


class PackedLinear(nn.Module):
    """Integer linear on a packed ``[N, K]`` weight; tensors are buffers (``w_<plane>``, ``w_scale [N]`` fp32,
    ``w_zero [N]`` uint8, ``bias [N]`` fp32, ``in_s``/``in_z`` 0-d fp32, optional ``ln_weight``/``ln_bias`` or
    ``r``/``shift [K]`` fp32)."""

    def __init__(self, pw: packing.PackedWeight, w_scale: Tensor, w_zero: Tensor, bias: Optional[Tensor],
                 in_qp: QParams, ln: Optional[dict] = None, r: Optional[Tensor] = None,
                 shift: Optional[Tensor] = None):
        super().__init__()
        self.fmt, self.w_bits, self.out_features, self.in_features = pw.fmt, pw.bits, pw.n, pw.k
        self.plane_names = tuple(pw.planes)
        for name, t in pw.planes.items():
            self.register_buffer(f"w_{name}", t, persistent=False)
        self.register_buffer("w_scale", w_scale.float(), persistent=False)
        self.register_buffer("w_zero", w_zero.to(torch.uint8), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.float(), persistent=False)
        self.a_bits = in_qp.bits
        self.register_buffer("in_s", torch.as_tensor(in_qp.s, dtype=torch.float32).reshape(()), persistent=False)
        self.register_buffer("in_z", torch.as_tensor(in_qp.z, dtype=torch.float32).reshape(()), persistent=False)
        self.ln_eps = None if ln is None else float(ln["eps"])
        self.register_buffer("ln_weight", None if ln is None else ln["weight"].float(), persistent=False)
        self.register_buffer("ln_bias", None if ln is None else ln["bias"].float(), persistent=False)
        self.register_buffer("r", None if r is None else r.float(), persistent=False)
        self.register_buffer("shift", None if shift is None else shift.float(), persistent=False)
        self._pw: Optional[packing.PackedWeight] = None

    @property
    def in_qp(self) -> QParams:
        return QParams(self.in_s, self.in_z, self.a_bits)

    def packed(self) -> packing.PackedWeight:
        """The :class:`PackedWeight` over the current plane buffers (kept, so the kernels' column-sum cache holds)."""
        planes = {n: getattr(self, f"w_{n}") for n in self.plane_names}
        if self._pw is None or any(self._pw.planes[n] is not t for n, t in planes.items()):
            self._pw = packing.PackedWeight(self.fmt, self.w_bits, self.out_features, self.in_features, planes)
        return self._pw

    def forward(self, x: Tensor) -> Tensor:
        return ops.linear_layer(x, self)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, fmt={self.fmt}, w_bits={self.w_bits}, "
                f"a_bits={self.a_bits}, layernorm_fused={self.ln_eps is not None}")


class PackedMlp(nn.Module):
    """``fc2(GELU(fc1(x)))``; fc1's kernel applies the exact-erf GELU and emits fc2's int8 input codes."""

    def __init__(self, fc1: PackedLinear, fc2: PackedLinear):
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2

    def forward(self, x: Tensor) -> Tensor:
        return ops.mlp_layer(x, self.fc1, self.fc2)


def _scalar_buffer(module: nn.Module, name: str, v) -> None:
    module.register_buffer(name, torch.as_tensor(v, dtype=torch.float32).reshape(()), persistent=False)


def _qp_buffers(module: nn.Module, qps: Dict[str, "QParams | SULQParams"]) -> None:
    """Buffers ``<name>_s``/``_z`` (0-d fp32) per quantizer; a :class:`SULQParams` adds ``<name>_eta`` and
    ``<name>_x0`` (its ``pow2`` flag in :attr:`sulq_pow2`)."""
    module.attn_bits, module.sulq, module.sulq_pow2 = {}, set(), set()
    for name, qp in qps.items():
        _scalar_buffer(module, f"{name}_s", qp.s)
        _scalar_buffer(module, f"{name}_z", qp.z)
        if isinstance(qp, SULQParams):
            _scalar_buffer(module, f"{name}_eta", qp.eta)
            _scalar_buffer(module, f"{name}_x0", qp.x0)
            module.sulq.add(name)
            if qp.pow2:
                module.sulq_pow2.add(name)
        module.attn_bits[name] = qp.bits


class _PackedAttention(nn.Module):
    def qp(self, name: str) -> "QParams | SULQParams":
        s, z, bits = getattr(self, f"{name}_s"), getattr(self, f"{name}_z"), self.attn_bits[name]
        if name in self.sulq:
            return SULQParams(getattr(self, f"{name}_eta"), s, z, bits, getattr(self, f"{name}_x0"),
                              name in self.sulq_pow2)
        return QParams(s, z, bits)


class PackedViTAttention(_PackedAttention):
    """timm ``Attention`` (ViT/DeiT) on packed ``qkv``/``proj``; Q, K, V, P quantized per tensor."""

    def __init__(self, qkv: PackedLinear, proj: PackedLinear, num_heads: int, head_dim: int, scale: float,
                 qps: Dict[str, QParams]):
        super().__init__()
        self.qkv, self.proj = qkv, proj
        self.num_heads, self.head_dim, self.scale = num_heads, head_dim, float(scale)
        _qp_buffers(self, qps)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("attention masks are not supported by the packed ViT attention")
        return ops.attention_layer(x, self)


class PackedWindowAttention(_PackedAttention):
    """Swin ``WindowAttention`` on packed ``qkv``/``proj``; relative position bias ``table[index]`` in float."""

    def __init__(self, qkv: PackedLinear, proj: PackedLinear, num_heads: int, scale: float, window_area: int,
                 table: nn.Parameter, index: Tensor, qps: Dict[str, QParams]):
        super().__init__()
        self.qkv, self.proj = qkv, proj
        self.num_heads, self.scale, self.window_area = num_heads, float(scale), window_area
        self.relative_position_bias_table = table
        self.register_buffer("relative_position_index", index, persistent=False)
        _qp_buffers(self, qps)

    def rel_pos_bias(self) -> Tensor:
        a = self.window_area
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(a, a, -1)
        return bias.permute(2, 0, 1).float().contiguous()

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        return ops.attention_layer(x, self, mask)


class PackedPatchEmbed(nn.Module):
    """Patch convolution (kernel == stride ``p``, no padding) as ``packed_linear`` over im2col patches
    ``[B, H/p * W/p, C*p*p]`` (order C, kh, kw); the image is quantized per tensor; output NCHW ``[B, D, H/p, W/p]``."""

    def __init__(self, linear: PackedLinear, kernel_shape):
        super().__init__()
        self.linear = linear
        self.kernel_shape = tuple(int(v) for v in kernel_shape)

    def forward(self, x: Tensor) -> Tensor:
        d, c, ph, pw = self.kernel_shape
        if x.dim() != 4 or x.shape[1] != c:
            raise ValueError(f"input must be [B, {c}, H, W] images, got shape {tuple(x.shape)}")
        if ops.backend_for(x) == "cpu" and not torch.compiler.is_compiling():
            # on the CPU the image is checked once, not every activation (no host read on a GPU); a finite sum
            # means every value is finite (one reduction), else the exact check decides
            if not x.is_floating_point():
                raise TypeError(f"images must be a float32/float16/bfloat16 tensor, got {x.dtype}")
            if not math.isfinite(float(x.sum(dtype=torch.float32))) and not bool(torch.isfinite(x).all()):
                raise ValueError("the images contain NaN or inf; clean the input (e.g. torch.nan_to_num) first")
        y = self.linear(P.patchify(x, (ph, pw)))
        return y.reshape(x.shape[0], x.shape[2] // ph, x.shape[3] // pw, d).permute(0, 3, 1, 2)


class BlockCorrection(nn.Module):
    """DFQ-ViT activation correction ``y' = y @ matrix^T`` over the last dim of a block output (ViT ``[B, N, D]``,
    Swin ``[B, H, W, C]``); ``matrix [D, D]`` an fp32 buffer."""

    def __init__(self, matrix: Tensor):
        super().__init__()
        self.register_buffer("matrix", matrix.float(), persistent=False)

    def forward(self, y: Tensor) -> Tensor:
        return F.linear(y, self.matrix.to(y.dtype))


def _correct_output(block: nn.Module, inputs, output: Tensor) -> Tensor:
    return block.act_correction(output)


def attach_correction(block: nn.Module, matrix: Tensor) -> BlockCorrection:
    """Give ``block`` a :class:`BlockCorrection` ``block.act_correction`` and the forward hook applying it."""
    if hasattr(block, "act_correction"):
        raise ValueError(f"{type(block).__name__} already has an activation correction")
    block.act_correction = BlockCorrection(matrix)
    block.register_forward_hook(_correct_output, prepend=True)
    return block.act_correction


def prepare(model: nn.Module) -> nn.Module:
    """Check every packed layer's quantizers and build its cached constants (:func:`kernels.ops.prepare`:
    ValueError naming the layer), give timm ViT blocks the one-function forward :func:`_block_forward` and, when the
    model's tensors are on the CPU, a forward over chunks of large batches (:func:`_chunked_forward`)."""
    for name, m in model.named_modules():
        if isinstance(m, (PackedLinear, _PackedAttention)):
            try:
                ops.prepare(m)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
    for m in model.modules():
        _flatten_block(m)
    model.lowbit_layers = [m for m in model.modules() if isinstance(m, (PackedLinear, _PackedAttention))]
    model.lowbit_blocks = [(m.attn, m.mlp) for m in model.modules() if "lowbit_hooks" in m.__dict__]
    plan = _chunk_plan(model)
    if plan is not None and all(t.device.type == "cpu" for t in model.buffers()):
        model.lowbit_chunk_plan = plan
    model.forward = types.MethodType(_model_forward, model)
    return model


CHUNK_BYTES = 4 << 20  # largest activation temporary of one chunk of images on the CPU


def _chunk_plan(model: nn.Module) -> Optional[tuple]:
    """``(ph, pw, width, attn)`` for :func:`_chunked_forward`: bytes of the largest per-token temporary are about
    ``4 * tokens * max(width, attn)`` (``width``: widest linear output relative to its input's stage, ``attn``:
    heads x attended tokens, 0 = all tokens). None when the model is not batch-invariant bit for bit (float GEMMs of
    the activation correction or SULQ, whose results may depend on the batch's shape) or has no patch embedding."""
    patch = [m for m in model.modules() if isinstance(m, PackedPatchEmbed)]
    attn = [m for m in model.modules() if isinstance(m, _PackedAttention)]
    if (len(patch) != 1 or not attn or any(isinstance(m, BlockCorrection) for m in model.modules())
            or any(m.sulq for m in attn)):
        return None
    d, _, ph, pw = patch[0].kernel_shape
    width = max(m.out_features * d // m.in_features for m in model.modules() if isinstance(m, PackedLinear))
    a = attn[0]
    return ph, pw, max(width, 3 * d), (a.num_heads, a.window_area if isinstance(a, PackedWindowAttention) else 0)


def _model_forward(self: nn.Module, x: Tensor, *args, **kwargs):
    """The model's forward with its packed layers' cached constants checked once (:func:`kernels.ops.checked_once`)
    and, on the CPU, over chunks of a large batch (:func:`_chunked_forward`)."""
    if torch.compiler.is_compiling():
        return type(self).forward(self, x, *args, **kwargs)
    with ops.checked_once(x, self, self.lowbit_layers, self.lowbit_blocks):
        return _chunked_forward(self, x, *args, **kwargs)


def _chunked_forward(self: nn.Module, x: Tensor, *args, **kwargs):
    """The model's forward over chunks of the batch whose temporaries stay near :data:`CHUNK_BYTES` (large batches
    on the CPU are otherwise slowed by allocating and faulting in big temporaries). Every quantized op and every float
    op of the skeleton computes each image on its own, so the logits are those of one whole-batch call."""
    forward = type(self).forward
    plan = getattr(self, "lowbit_chunk_plan", None)
    if plan is None or args or kwargs or x.dim() != 4 or x.device.type != "cpu":
        return forward(self, x, *args, **kwargs)
    ph, pw, width, (heads, area) = plan
    tokens = (x.shape[-2] // ph) * (x.shape[-1] // pw)
    per_image = 4 * tokens * max(width, heads * (area or tokens))
    n = max(1, CHUNK_BYTES // per_image)
    if x.shape[0] <= n:
        return forward(self, x)
    k = -(-x.shape[0] // n)
    return torch.cat([forward(self, c) for c in x.split(-(-x.shape[0] // k))])


_BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


def _flatten_block(block: nn.Module) -> None:
    """Give a timm ViT ``Block`` whose LayerNorms are fused (``norm1``, ``norm2``, layer scales and drop paths are
    ``nn.Identity``) and whose ``attn`` / ``mlp`` are packed the forward :func:`_block_forward`."""
    if not isinstance(block, Block) or type(block).forward is not Block.forward:
        return
    parts = [getattr(block, k, None) for k in _BLOCK_PARTS]
    attn, mlp = parts[1], parts[5]
    if (not all(type(parts[i]) is nn.Identity for i in (0, 2, 3, 4, 6, 7))
            or type(attn) is not PackedViTAttention or type(mlp) is not PackedMlp
            or mlp.fc1.ln_eps is None or attn.qkv.ln_eps is None):
        return
    block.lowbit_hooks = tuple(d for m in parts for d in (m._forward_hooks, m._forward_pre_hooks))  # (live dicts)
    block.forward = types.MethodType(_block_forward, block)


def _block_forward(self: nn.Module, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
    """The block's forward as one call (:func:`kernels.ops.vit_block`; at batch 1 the module calls and their Python
    cost were a large share of the time), or timm's forward when its submodules carry forward hooks or a mask is
    given."""
    if (attn_mask is not None or is_causal or _global_forward_hooks or _global_forward_pre_hooks
            or any(self.lowbit_hooks)):
        return type(self).forward(self, x, attn_mask=attn_mask, is_causal=is_causal)
    return ops.vit_block(x, self.attn, self.mlp)
