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

:func:`prepare_fast` (done by :func:`export.load` on the CPU) adds the load-time constants of :mod:`export.fast` as
``fast_*`` buffers; the modules then run that path on CPU tensors (bit-identical to :mod:`kernels.reference`) and
:mod:`kernels.ops` otherwise (CUDA, or Triton forced by ``LOWBIT_TRITON=1`` / ``ops.use_triton(True)``).
"""
from __future__ import annotations

import math
import types
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from kernels import ops
from lowbit import packing
from lowbit import primitives as P
from lowbit.primitives import QParams, SULQParams

from . import fast as FA


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
        self.fast: Optional[FA.LinearPlan] = None

    @property
    def in_qp(self) -> QParams:
        return QParams(self.in_s, self.in_z, self.a_bits)

    def packed(self) -> packing.PackedWeight:
        """The :class:`PackedWeight` over the current plane buffers (kept, so the kernels' column-sum cache holds)."""
        planes = {n: getattr(self, f"w_{n}") for n in self.plane_names}
        if self._pw is None or any(self._pw.planes[n] is not t for n, t in planes.items()):
            self._pw = packing.PackedWeight(self.fmt, self.w_bits, self.out_features, self.in_features, planes)
        return self._pw

    def quantize_input(self, x: Tensor) -> Tensor:
        """int8 codes of ``LN'(x)`` (fused LayerNorm), ``(x - shift) / r`` or ``x``."""
        if self.ln_eps is not None:
            return ops.layernorm_quantize(x, self.ln_weight, self.ln_bias, self.ln_eps, self.in_qp)
        return ops.quantize(x, self.in_qp, self.r, self.shift)

    def linear_codes(self, a: Tensor, gelu: bool = False, requant: Optional[QParams] = None) -> Tensor:
        return ops.packed_linear(a, self.in_qp, self.packed(), self.w_scale, self.w_zero, self.bias, gelu=gelu,
                                 requant=requant)

    def forward(self, x: Tensor) -> Tensor:
        p = self.fast
        if p is not None and not ops.triton_enabled(x):
            return FA.linear(FA.input_codes(x.reshape(-1, self.in_features), p), p).view(*x.shape[:-1], -1)
        return self.linear_codes(self.quantize_input(x))

    def prepare_fast(self, backend: str, name: str = "") -> None:
        """Buffers ``fast_w``, ``fast_scale``, ``fast_cw``, ``fast_col`` and :attr:`fast` (:func:`export.fast.linear_tensors`)."""
        plan, tensors = FA.linear_tensors(self.packed(), self.w_scale, self.w_zero, self.in_s, self.in_z, self.a_bits,
                                          backend, name or type(self).__name__)
        for key in _FAST_LINEAR:
            t = tensors.get(key)
            self.register_buffer(key, None if t is None else t.to(self.w_scale.device), persistent=False)
        ln = None if self.ln_eps is None else FA.layernorm_plan(self.in_features, self.ln_eps, self.ln_weight,
                                                                self.ln_bias)
        self.fast = plan._replace(w=self.fast_w, scale=self.fast_scale, cw=self.fast_cw, col_t=self.fast_col,
                                  bias=self.bias, in_s=self.in_s, ln=ln, r=self.r, shift=self.shift)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, fmt={self.fmt}, w_bits={self.w_bits}, "
                f"a_bits={self.a_bits}, layernorm_fused={self.ln_eps is not None}")


class PackedMlp(nn.Module):
    """``fc2(GELU(fc1(x)))``; fc1's kernel applies the exact-erf GELU and emits fc2's int8 input codes."""

    def __init__(self, fc1: PackedLinear, fc2: PackedLinear):
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2

    def forward(self, x: Tensor) -> Tensor:
        p1, p2 = self.fc1.fast, self.fc2.fast
        if p1 is not None and not ops.triton_enabled(x):
            h = FA.linear(FA.input_codes(x.reshape(-1, self.fc1.in_features), p1), p1, gelu=True)
            return FA.linear(FA.codes_(h, p2.in_s, p2.codes), p2).view(*x.shape[:-1], -1)
        h = self.fc1.linear_codes(self.fc1.quantize_input(x), gelu=True, requant=self.fc2.in_qp)
        return self.fc2.linear_codes(h)


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


_FAST_LINEAR = ("fast_w", "fast_scale", "fast_cw", "fast_col")
_FAST_ATTENTION = ("fast_s3", "fast_lo3", "fast_hi3", "fast_p_table", "fast_rel_bias")


class _PackedAttention(nn.Module):
    fast: Optional[FA.AttentionPlan] = None

    def prepare_fast(self, backend: str, name: str = "") -> None:
        """Buffers ``fast_s3/lo3/hi3 [3, 1, 1, 1, 1]`` (step and clamp bounds of Q, K, V), ``fast_p_table``
        (SULQ), ``fast_rel_bias`` (Swin) and :attr:`fast` (:func:`export.fast.attention_tensors`)."""
        plan, tensors = FA.attention_tensors({n: self.qp(n) for n in "qkvp"}, self.scale, name or type(self).__name__)
        for key in ("fast_s3", "fast_lo3", "fast_hi3"):
            tensors[key] = tensors[key].reshape(3, 1, 1, 1, 1)
        if isinstance(self, PackedWindowAttention):
            tensors["fast_rel_bias"] = self.rel_pos_bias().detach()
        for key in _FAST_ATTENTION:
            t = tensors.get(key)
            self.register_buffer(key, None if t is None else t.to(self.q_s.device), persistent=False)
        self.fast = plan._replace(s3=self.fast_s3, lo3=self.fast_lo3, hi3=self.fast_hi3, p_s=self.p_s,
                                  p_eta=getattr(self, "p_eta", None), p_x0=getattr(self, "p_x0", None),
                                  p_table=self.fast_p_table,
                                  rel_bias=self.fast_rel_bias)

    def _attend_fast(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        b, n, c = x.shape
        p, pp = self.qkv.fast, self.proj.fast
        o = FA.attention(FA.linear(FA.input_codes(x.reshape(-1, c), p), p), b, n, self.num_heads, self.fast, mask)
        return FA.linear(FA.input_codes(o.view(b * n, -1), pp, fresh=True), pp).view(b, n, -1)

    def qp(self, name: str) -> "QParams | SULQParams":
        s, z, bits = getattr(self, f"{name}_s"), getattr(self, f"{name}_z"), self.attn_bits[name]
        if name in self.sulq:
            return SULQParams(getattr(self, f"{name}_eta"), s, z, bits, getattr(self, f"{name}_x0"),
                              name in self.sulq_pow2)
        return QParams(s, z, bits)

    def _attend(self, x: Tensor, rel_bias: Optional[Tensor], mask: Optional[Tensor]) -> Tensor:
        """``proj(attention(qkv(x)))`` for ``x [B, L, C]`` on int8 codes end to end: the qkv GEMM's epilogue emits
        the Q, K, V codes (a per-column requant), the attention reads them in place from ``[B, L, 3, H, D]`` and its
        epilogue emits ``proj``'s input codes heads-last, so no float activation is written in between."""
        b, n, _ = x.shape
        qps = [self.qp(name) for name in "qkv"]
        per = self.qkv.out_features // 3
        qkv = self.qkv.linear_codes(self.qkv.quantize_input(x), requant=ops.stacked_qparams(qps, (per,) * 3))
        q, k, v = qkv.view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        proj = self.proj
        o = ops.quant_attention(q, k, v, *qps, self.scale, self.qp("p"), rel_bias=rel_bias, mask=mask,
                                heads_last=True, requant=proj.in_qp, requant_r=proj.r, requant_shift=proj.shift)
        return proj.linear_codes(o.view(b, n, -1))


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
        if self.fast is not None and not ops.triton_enabled(x):
            return self._attend_fast(x, None)
        return self._attend(x, None, None)


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
        if self.fast is not None and not ops.triton_enabled(x):
            return self._attend_fast(x, mask)
        return self._attend(x, self.rel_pos_bias(), None if mask is None else mask.float())


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
        if self.linear.fast is not None and not torch.compiler.is_compiling():
            # the fast path checks the image once instead of every activation (kernels.reference's per-call scans);
            # a finite sum means every value is finite (one reduction), else the exact check decides
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


def prepare_fast(model: nn.Module, backend: Optional[str] = None) -> nn.Module:
    """Give every packed module of ``model`` (on the CPU) the load-time constants of :mod:`export.fast`, so CPU
    forwards run the fast path. ``backend``: ``"int8"`` (``torch._int_mm``), ``"float"`` (exact float GEMM) or None
    (int8 where ``torch._int_mm`` is exact here). Quantizers are validated here (ValueError naming the layer)."""
    backend = FA.check_backend(backend)
    for name, m in model.named_modules():
        if isinstance(m, (PackedLinear, _PackedAttention)):
            dev = m.w_scale.device if isinstance(m, PackedLinear) else m.q_s.device
            if dev.type != "cpu":
                raise ValueError(f"the fast path is for the CPU but {name} is on {dev}; on CUDA the Triton kernels "
                                 f"run (load with device='cpu' or move the model first)")
            m.prepare_fast(backend, name)
    for m in model.modules():
        _flatten_block(m)
    plan = _chunk_plan(model)
    if plan is not None:
        model.lowbit_chunk_plan = plan
        model.forward = types.MethodType(_chunked_forward, model)
    return model


CHUNK_BYTES = 4 << 20  # largest activation temporary of one chunk of images on the fast path


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


def _chunked_forward(self: nn.Module, x: Tensor, *args, **kwargs):
    """The model's forward over chunks of the batch whose temporaries stay near :data:`CHUNK_BYTES` (large batches
    on the CPU are otherwise slowed by allocating and faulting in big temporaries). Every quantized op and every float
    op of the skeleton computes each image on its own, so the logits are those of one whole-batch call."""
    forward = type(self).forward
    if args or kwargs or x.dim() != 4 or torch.compiler.is_compiling():
        return forward(self, x, *args, **kwargs)
    ph, pw, width, (heads, area) = self.lowbit_chunk_plan
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
    ``nn.Identity``) and whose ``attn`` / ``mlp`` are packed and fast the forward :func:`_block_forward`."""
    from timm.models.vision_transformer import Block
    if not isinstance(block, Block) or type(block).forward is not Block.forward:
        return
    parts = [getattr(block, k, None) for k in _BLOCK_PARTS]
    attn, mlp = parts[1], parts[5]
    if (not all(type(parts[i]) is nn.Identity for i in (0, 2, 3, 4, 6, 7))
            or type(attn) is not PackedViTAttention or type(mlp) is not PackedMlp or attn.fast is None
            or mlp.fc1.fast is None or mlp.fc1.fast.ln is None or attn.qkv.fast.ln is None):
        return
    block.lowbit_block = FA.BlockPlan(attn.qkv.fast, attn.fast, attn.num_heads, attn.proj.fast, mlp.fc1.fast,
                                      mlp.fc2.fast)
    block.lowbit_hooks = tuple(d for m in parts for d in (m._forward_hooks, m._forward_pre_hooks))  # (live dicts)
    block.forward = types.MethodType(_block_forward, block)


def _block_forward(self: nn.Module, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
    """The block's forward as one function (:func:`export.fast.vit_block`; at batch 1 the module calls and their
    Python cost were a large share of the time), or timm's forward when its submodules carry forward hooks, a mask
    is given or the Triton path is on."""
    if (attn_mask is not None or is_causal or ops.triton_enabled(x) or _global_forward_hooks
            or _global_forward_pre_hooks or any(self.lowbit_hooks)):
        return type(self).forward(self, x, attn_mask=attn_mask, is_causal=is_causal)
    return FA.vit_block(x, self.lowbit_block)


def drop_fast(model: nn.Module) -> nn.Module:
    """Remove the fast-path buffers: every quantized op goes through :mod:`kernels.ops` again (packed weights only)."""
    for m in model.modules():
        if m.__dict__.pop("lowbit_block", None) is not None:
            del m.__dict__["forward"], m.__dict__["lowbit_hooks"]
        if isinstance(m, (PackedLinear, _PackedAttention)) and m.fast is not None:
            for key in (_FAST_LINEAR if isinstance(m, PackedLinear) else _FAST_ATTENTION):
                delattr(m, key)
            m.fast = None
    model.__dict__.pop("forward", None)
    model.__dict__.pop("lowbit_chunk_plan", None)
    return model


def is_fast(model: nn.Module) -> bool:
    """Whether every packed module of ``model`` carries the fast-path constants."""
    mods = [m for m in model.modules() if isinstance(m, (PackedLinear, _PackedAttention))]
    return bool(mods) and all(m.fast is not None for m in mods)
