"""Model surgery: turn a timm ViT / DeiT / Swin into its quantized counterpart (in place).

* every ``nn.Linear`` (qkv, proj, fc1, fc2, the head, Swin's patch-merging ``reduction``) -> :class:`QuantLinear`;
  those fed by a LayerNorm (``attn.qkv``, ``mlp.fc1``, ``downsample.reduction``) get the learnable rescale/shift
  (unless activations stay in float, A16);
* the patch-embedding conv -> :class:`QuantConv2dPatch` (weights at W bits, image at 8 bits);
* timm ``Attention`` / Swin ``WindowAttention`` -> :class:`QuantViTAttention` / :class:`QuantWindowAttention`,
  which replicate timm 1.0's non-fused forward with quantizers on Q, K, V and the probabilities P.

A LayerNorm feeding only one linear (:func:`fusable_norm`) becomes a :class:`QuantLayerNorm` (same parameters):
the exporter fuses it into that linear, and in ``"int"`` mode it applies the linear's rescale as the fused kernel
does. LayerNorm, softmax and GELU stay in float. The relative position bias and the shifted-window mask are added in
float to the score, as in timm.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from timm.layers.attention import Attention
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock, WindowAttention
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from lowbit.bits import BitConfig, parse_bits
from quant.modules import (
    SOFTMAX_QUANTIZERS,
    QuantAttentionCore,
    QuantConv2dPatch,
    QuantLayerNorm,
    QuantLinear,
    quant_modules,
)

POST_LN_LINEARS = ("attn.qkv", "mlp.fc1", "downsample.reduction")
PATCH_INPUT_BITS = 8


class QuantViTAttention(nn.Module):
    """timm ``Attention`` (ViT/DeiT) with quantized matmuls; ``qkv``/``proj`` are :class:`QuantLinear`."""

    def __init__(self, attn: Attention, a_bits, softmax_quantizer: str = "uniform"):
        super().__init__()
        if getattr(attn, "gate", None) is not None:
            raise NotImplementedError("gated timm Attention is not supported by the quantized attention")
        self.num_heads, self.head_dim, self.attn_dim = attn.num_heads, attn.head_dim, attn.attn_dim
        self.scale = attn.scale
        self.qkv, self.proj = attn.qkv, attn.proj
        self.q_norm, self.k_norm, self.norm = attn.q_norm, attn.k_norm, attn.norm
        self.core = QuantAttentionCore(a_bits, softmax_quantizer)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        if is_causal:
            raise NotImplementedError("causal attention is not supported by the quantized ViT attention")
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill(~attn_mask, float("-inf"))
        x = self.core(q, k, v, self.scale, mask=attn_mask)
        x = x.transpose(1, 2).reshape(b, n, self.attn_dim)
        x = self.norm(x)
        return self.proj(x)


class QuantWindowAttention(nn.Module):
    """Swin ``WindowAttention`` with quantized matmuls; bias table and index are the timm module's own."""

    def __init__(self, attn: WindowAttention, a_bits, softmax_quantizer: str = "uniform"):
        super().__init__()
        self.num_heads, self.scale = attn.num_heads, attn.scale
        self.window_size, self.window_area = attn.window_size, attn.window_area
        self.relative_position_bias_table = attn.relative_position_bias_table
        self.register_buffer("relative_position_index", attn.relative_position_index.clone(), persistent=False)
        self.qkv, self.proj = attn.qkv, attn.proj
        self.core = QuantAttentionCore(a_bits, softmax_quantizer)

    def rel_pos_bias(self) -> Tensor:
        """``[H, L, L]``: ``table[index].view(L, L, H).permute(2, 0, 1)``."""
        a = self.window_area
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(a, a, -1)
        return bias.permute(2, 0, 1).contiguous()

    def set_window_size(self, window_size) -> None:
        raise NotImplementedError("changing the window size of a quantized Swin is not supported; resize first")

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        b_, n, _ = x.shape
        qkv = self.qkv(x).reshape(b_, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = self.core(q, k, v, self.scale, rel_bias=self.rel_pos_bias(), mask=mask)
        x = x.transpose(1, 2).reshape(b_, n, -1)
        return self.proj(x)


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def fusable_norm(model: nn.Module, name: str) -> Optional[str]:
    """Name of the LayerNorm that feeds only the linear ``name`` and can be fused into it exactly, else None:
    ``norm1 -> attn.qkv`` and ``norm2 -> mlp.fc1`` of ViT/DeiT/Swin blocks (Swin: only without window padding),
    ``downsample.norm -> downsample.reduction`` (Swin patch merging)."""
    parent, _, leaf = name.rpartition(".")
    owner_name, _, sub = parent.rpartition(".")
    try:
        owner = model.get_submodule(owner_name)
    except AttributeError:
        return None
    if leaf == "qkv" and sub == "attn" and isinstance(owner, (Block, SwinTransformerBlock)):
        if isinstance(owner, SwinTransformerBlock):
            res, ws = owner.input_resolution, owner.window_size
            if any(int(r) % int(w) for r, w in zip(res, ws)):
                return None  # the window padding follows the norm: zeros must stay zeros
        norm = f"{owner_name}.norm1"
    elif leaf == "fc1" and sub == "mlp" and isinstance(owner, (Block, SwinTransformerBlock)):
        norm = f"{owner_name}.norm2"
    elif leaf == "reduction" and isinstance(model.get_submodule(parent), PatchMerging):
        norm = f"{parent}.norm"
    else:
        return None
    ln = model.get_submodule(norm)
    if not isinstance(ln, nn.LayerNorm) or ln.weight is None or ln.bias is None or len(ln.normalized_shape) != 1:
        return None
    return norm



def quantize_model(model: nn.Module, bits, rescale: bool = True, softmax_quantizer: str = "uniform") -> nn.Module:
    """Replace the layers of a timm ViT/DeiT/Swin ``model`` by quantized ones (in place) and return it.

    ``bits``: a spec (``"w4a4"``) or :class:`BitConfig`. ``rescale``: learnable rescale/shift on post-LayerNorm
    linears (always off under A16). ``softmax_quantizer``: ``"uniform"``, ``"sulq"`` (I&S-ViT as published) or
    ``"sulq-learned"`` for the attention probabilities. The model starts in ``"float"`` mode; calibrate it next (:func:`quant.calibrate.calibrate`).
    """
    if softmax_quantizer not in SOFTMAX_QUANTIZERS:
        raise ValueError(f"softmax quantizer must be one of {', '.join(SOFTMAX_QUANTIZERS)}, got {softmax_quantizer!r}")
    cfg: BitConfig = parse_bits(bits)
    device = next(model.parameters()).device
    if quant_modules(model):
        raise ValueError("model is already quantized")
    names = [n for n, m in model.named_modules() if isinstance(m, (Attention, WindowAttention))]
    if not names:
        raise ValueError(f"{type(model).__name__} has no timm Attention/WindowAttention: only timm ViT, DeiT and "
                         f"Swin models are supported")
    for n, m in list(model.named_modules()):
        if isinstance(m, nn.Linear):
            post_ln = rescale and not cfg.act_float and n.endswith(POST_LN_LINEARS)
            _set(model, n, QuantLinear(m, cfg.w_bits, cfg.a_bits, rescale=post_ln))
    for n, m in list(model.named_modules()):
        norm = fusable_norm(model, n) if isinstance(m, QuantLinear) else None
        if norm is not None:
            _set(model, norm, QuantLayerNorm(model.get_submodule(norm), m))
    pe = getattr(model, "patch_embed", None)
    if pe is None or not isinstance(getattr(pe, "proj", None), nn.Conv2d):
        raise ValueError("model has no patch_embed.proj Conv2d; only timm ViT, DeiT and Swin models are supported")
    pe.proj = QuantConv2dPatch(pe.proj, cfg.w_bits, 16 if cfg.act_float else PATCH_INPUT_BITS)
    for n in names:
        m = model.get_submodule(n)
        cls = QuantWindowAttention if isinstance(m, WindowAttention) else QuantViTAttention
        _set(model, n, cls(m, cfg.a_bits, softmax_quantizer))
    for p in model.parameters():
        p.requires_grad_(False)
    for m in quant_modules(model):
        for name, p in m.named_parameters():
            if name not in ("weight", "bias"):
                p.requires_grad_(True)
    model.quant_bits = cfg
    return model.to(device)


def blocks(model: nn.Module) -> List[nn.Module]:
    """The transformer blocks of ``model`` in forward order (ViT/DeiT ``Block``, Swin ``SwinTransformerBlock``)."""
    return [m for m in model.modules() if isinstance(m, (Block, SwinTransformerBlock))]
