"""The frozen timm classifier that supervises prompt learning: loading, its own eval preprocessing written as
differentiable torch ops, and one forward returning logits, pre-logits features and softmax attention maps."""
from __future__ import annotations

import contextlib
import math
import os

import torch
import torch.nn.functional as F

from calib.common import hub_cache_only_when_offline
from lowbit.errors import UserError
from lowbit.models import resolve


def load_classifier(name: str, checkpoint: str | None = None) -> torch.nn.Module:
    """A frozen eval-mode timm model; ``name`` is a timm name or an alias of :mod:`lowbit.models`' registry.

    ``checkpoint``: local weights file (timm/original format) used instead of downloading pretrained weights.
    Without it the hub is asked only when reachable (else the local cache). Failures raise
    :class:`lowbit.errors.UserError` naming the fix.
    """
    import timm

    spec = resolve(name)
    arch = spec.timm_name
    if spec.loader is not None:
        raise UserError(f"--model {name} is not an ImageNet-1k timm classifier; prompts are learned for ImageNet "
                        f"classes, so use a timm name or one of the ImageNet aliases (vit_s, vit_b, deit_s, ...)")
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise UserError(f"--checkpoint {str(checkpoint)!r} does not exist; pass a local weights file of {arch}")
    try:
        if checkpoint is not None:
            model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=str(checkpoint)))
        else:
            with hub_cache_only_when_offline():
                model = timm.create_model(arch, pretrained=True)
    except Exception as e:  # noqa: BLE001 - hub, network and file errors all mean the same to the user
        hint = ("check that the file holds this architecture's weights" if checkpoint is not None else
                "the hub is not reachable (offline?) and they are not in the local cache; download the weights "
                "elsewhere (timm / Hugging Face hub) and pass the file with --checkpoint /path/to/model.safetensors")
        raise UserError(f"could not load classifier {arch!r} ({type(e).__name__}: {_first_line(e)}); {hint}") from None
    if model.num_classes != 1000:
        raise UserError(f"--model {name} predicts {model.num_classes} classes, not the 1000 ImageNet classes the "
                        f"prompts are learned for; use an ImageNet-1k classifier")
    return model.eval().requires_grad_(False)


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else ""


class Preprocess(torch.nn.Module):
    """timm's eval transform on ``[B, 3, H, W]`` images in [0, 1], differentiable.

    ``center``: resize the shorter side to ``floor(size / crop_pct)`` (longer side truncated, as torchvision), center-crop ``size``; ``squash``: resize both
    sides to ``floor(size / crop_pct)``, center-crop; then ``(x - mean) / std``. Config from
    ``timm.data.resolve_data_config(model=...)``.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        import timm.data

        cfg = timm.data.resolve_data_config({}, model=model)
        self.size = tuple(cfg["input_size"][1:])
        self.crop_pct = cfg.get("crop_pct") or 1.0
        self.crop_mode = cfg.get("crop_mode", "center")
        if self.crop_mode not in ("center", "squash"):
            raise ValueError(f"crop_mode {self.crop_mode!r} is not supported (center or squash)")
        self.mode = {"bicubic": "bicubic", "bilinear": "bilinear"}.get(cfg["interpolation"], "bilinear")
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        th, tw = self.size
        h, w = x.shape[-2:]
        if self.crop_mode == "squash":
            new = (math.floor(th / self.crop_pct), math.floor(tw / self.crop_pct))
        else:
            short = math.floor(min(th, tw) / self.crop_pct)
            new = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
        if new != (h, w):
            x = F.interpolate(x, size=new, mode=self.mode, align_corners=False, antialias=True)
        top, left = round((new[0] - th) / 2), round((new[1] - tw) / 2)
        x = x[..., top:top + th, left:left + tw]
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """timm attention modules that can expose their softmax (``fused_attn`` switch + ``attn_drop`` after softmax)."""
    return [m for m in model.modules() if hasattr(m, "fused_attn") and isinstance(getattr(m, "attn_drop", None),
                                                                                     torch.nn.Module)]


@contextlib.contextmanager
def capture_attention(model: torch.nn.Module):
    """Within the block, every attention module runs unfused and its softmax maps are appended to the yielded list
    (the input of ``attn_drop``, ``[B, heads, N, N]`` per module, in call order)."""
    mods = attention_modules(model)
    maps: list[torch.Tensor] = []
    old = [m.fused_attn for m in mods]
    handles = [m.attn_drop.register_forward_hook(lambda _m, inp, _out: maps.append(inp[0])) for m in mods]
    for m in mods:
        m.fused_attn = False
    try:
        yield maps
    finally:
        for m, f in zip(mods, old):
            m.fused_attn = f
        for h in handles:
            h.remove()


def classify(model: torch.nn.Module, x: torch.Tensor, with_attention: bool = True):
    """Normalised input -> (logits ``[B, C]``, pre-logits features ``[B, F]``, attention ``[B, A]`` or None).

    Attention: all softmax maps of all blocks (windows too) flattened per sample and concatenated.
    """
    if with_attention:
        if not attention_modules(model):
            raise ValueError(f"{type(model).__name__} has no timm attention module to read maps from; "
                             "set the attention-variance weight to 0 (--w-attn 0)")
        with capture_attention(model) as maps:
            tokens = model.forward_features(x)
        attn = torch.cat([m.reshape(x.shape[0], -1) for m in maps], dim=1)
    else:
        tokens, attn = model.forward_features(x), None
    feats = model.forward_head(tokens, pre_logits=True)
    logits = model.forward_head(tokens)
    return logits, feats, attn
