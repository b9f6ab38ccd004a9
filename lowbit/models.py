"""Model aliases, loading (hub or local checkpoint) and per-model evaluation preprocessing.

Aliases map to the timm checkpoints the literature uses (FP top-1 in ``fp_top1``); any other timm model name is
accepted as well. :func:`register_model` adds an alias with its own loader (e.g. an embedded demo model).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Callable, Dict, Optional
from urllib.parse import urlparse

import timm
import torch
from huggingface_hub import constants as hf
from safetensors.torch import load_file
from timm.data import create_transform
from torch import nn

from lowbit.errors import UserError
from lowbit.zoo.cifar import CIFAR_MEAN, CIFAR_STD
from lowbit.zoo.demo import demo_card, load_demo


@dataclass(frozen=True)
class ModelSpec:
    """``loader(checkpoint, model_args) -> nn.Module`` builds the float model (None: timm by ``timm_name``)."""

    alias: str
    timm_name: str
    fp_top1: Optional[float] = None
    crop_pct: float = 0.9
    loader: Optional[Callable[[Optional[str], dict], nn.Module]] = None
    mean: Optional[tuple] = None
    std: Optional[tuple] = None
    run_defaults: Optional[dict] = None


_REGISTRY: Dict[str, ModelSpec] = {}


def register_model(alias: str, timm_name: str = "", fp_top1: Optional[float] = None, crop_pct: float = 0.9,
                   loader: Optional[Callable[[Optional[str], dict], nn.Module]] = None,
                   mean: Optional[tuple] = None, std: Optional[tuple] = None,
                   run_defaults: Optional[dict] = None) -> ModelSpec:
    """Register (or replace) ``alias``; give ``loader(checkpoint, model_args) -> nn.Module`` for models that do not
    come from the timm hub, ``mean``/``std`` when the model has no timm ``pretrained_cfg``, and ``run_defaults``
    (``quant.run`` flag -> value, e.g. ``{"iters": 300}``) for flags the user leaves unset."""
    if not timm_name and loader is None:
        raise ValueError("register_model needs a timm_name or a loader")
    spec = ModelSpec(alias, timm_name or alias, fp_top1, crop_pct, loader, mean, std, run_defaults)
    _REGISTRY[alias] = spec
    return spec


for _a, _n, _t, _c in (
    ("vit_s", "vit_small_patch16_224.augreg_in21k_ft_in1k", 81.39, 0.9),
    ("vit_b", "vit_base_patch16_224.augreg_in21k_ft_in1k", 84.54, 0.9),
    ("deit_t", "deit_tiny_patch16_224.fb_in1k", 72.21, 0.875),
    ("deit_s", "deit_small_patch16_224.fb_in1k", 79.85, 0.875),
    ("deit_b", "deit_base_patch16_224.fb_in1k", 81.80, 0.875),
    ("swin_t", "swin_tiny_patch4_window7_224.ms_in1k", 81.39, 0.9),
    ("swin_s", "swin_small_patch4_window7_224.ms_in1k", 83.23, 0.9),
    ("swin_b", "swin_base_patch4_window7_224.ms_in22k_ft_in1k", 85.27, 0.9),
):
    register_model(_a, _n, _t, _c)


def _load_demo(checkpoint: Optional[str], model_args: dict) -> nn.Module:
    if model_args:
        raise UserError("--model demo takes no --model-args (its architecture is fixed by lowbit/zoo/demo_vit.json)")
    try:
        return load_demo(checkpoint)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None


def _register_demo() -> None:
    card = demo_card()
    register_model("demo", "demo_vit", None if card is None else round(100 * card["test_top1"], 2), 1.0, _load_demo,
                   CIFAR_MEAN, CIFAR_STD,
                   run_defaults={"iters": 300, "calib_size": 128, "batch_size": 32, "val_size": 2000,
                                 "invert_steps": 100, "export": "<out>/model.lowbit"})


_register_demo()


def aliases() -> Dict[str, ModelSpec]:
    return dict(_REGISTRY)


def resolve(name: str) -> ModelSpec:
    """The spec of an alias or of any timm model name; :class:`UserError` listing the aliases otherwise."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    base = name.split(".")[0]
    if timm.is_model(base):
        return ModelSpec(name, name, None, 0.875 if base.startswith("deit") else 0.9)
    raise UserError(f"unknown model {name!r}; use one of the aliases {', '.join(sorted(_REGISTRY))} "
                    f"or a timm model name (see timm.list_models())")


def load_state_dict_file(path: str) -> dict:
    """A state dict from ``.safetensors`` or a torch file (optionally wrapped under ``model``/``state_dict``)."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint file {path!r} does not exist; pass --checkpoint PATH to a local weights file")
    try:
        if path.endswith(".safetensors"):
            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file for the user
        raise UserError(f"cannot read checkpoint {path!r} ({type(e).__name__}: {e}); pass a .pth/.pt state dict "
                        f"or a .safetensors file") from None
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise UserError(f"checkpoint {path!r} does not hold a state dict of tensors")
    return sd


def load_model(name: str, checkpoint: Optional[str] = None, model_args: Optional[dict] = None) -> nn.Module:
    """Float model in eval mode: the spec's loader, or ``timm.create_model`` with hub weights or ``checkpoint``."""
    spec = resolve(name)
    model_args = dict(model_args or {})
    if spec.loader is not None:
        model = spec.loader(checkpoint, model_args)
        return model.eval()
    if checkpoint is not None:
        sd = load_state_dict_file(checkpoint)
        try:
            model = timm.create_model(spec.timm_name, pretrained=False, **model_args)
        except TypeError as e:
            raise UserError(f"bad --model-args for {spec.timm_name}: {e}") from None
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise UserError(f"checkpoint {checkpoint!r} does not match {spec.timm_name} "
                            f"{model_args or ''}: {str(e).splitlines()[0]} ...; pass weights of this model "
                            f"(and the same --model-args it was built with)") from None
        return model.eval()
    offline_before = hf.HF_HUB_OFFLINE
    if not offline_before and not hub_reachable(hf.ENDPOINT):
        hf.HF_HUB_OFFLINE = True  # use the local cache only instead of minutes of retries
    try:
        model = timm.create_model(spec.timm_name, pretrained=True, **model_args)
    except TypeError as e:
        raise UserError(f"bad --model-args for {spec.timm_name}: {e}") from None
    except Exception as e:  # noqa: BLE001 - hub/network failures come in many types
        raise UserError(f"cannot fetch the pretrained weights of {spec.timm_name} ({type(e).__name__}): the hub is "
                        f"not reachable (offline?) and they are not in the local cache. Download them elsewhere "
                        f"and pass --checkpoint PATH (a .pth or .safetensors state dict)") from None
    finally:
        hf.HF_HUB_OFFLINE = offline_before
    return model.eval()


def hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub ``endpoint`` opens within ``timeout`` seconds."""
    u = urlparse(endpoint)
    try:
        with socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)), timeout=timeout):
            return True
    except OSError:
        return False


def input_size(model: nn.Module) -> int:
    """Square input resolution of ``model`` (from its patch embedding)."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is None:
        size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-2:]
    return int(size[0])


def eval_transform(model: nn.Module, spec: ModelSpec):
    """Eval preprocessing: resize to ``size / crop_pct`` (bicubic), centre crop ``size``, model mean/std."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    size = input_size(model)
    return create_transform(input_size=(3, size, size), is_training=False, interpolation="bicubic",
                            crop_pct=spec.crop_pct, mean=spec.mean or cfg.get("mean", (0.485, 0.456, 0.406)),
                            std=spec.std or cfg.get("std", (0.229, 0.224, 0.225)))
