"""The ``demo`` model: a small timm VisionTransformer trained by :mod:`bench.train_demo` on CIFAR-10.

Its weights ship with the package (``demo_vit.safetensors``, fp16) beside ``demo_vit.json`` (recipe, training time,
accuracy), so ``--model demo`` works with no network.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from timm.models.vision_transformer import VisionTransformer

from .cifar import CIFAR_MEAN, CIFAR_STD

ZOO = Path(__file__).parent
WEIGHTS = ZOO / "demo_vit.safetensors"
CARD = ZOO / "demo_vit.json"


@dataclass(frozen=True)
class DemoConfig:
    img_size: int = 32
    patch_size: int = 4
    num_classes: int = 10
    embed_dim: int = 128
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: float = 2.0
    global_pool: str = "avg"
    class_token: bool = False


def build_demo_model(cfg: DemoConfig = DemoConfig(), **overrides) -> VisionTransformer:
    """Random-init demo ViT; its ``pretrained_cfg`` carries the CIFAR-10 preprocessing."""
    kw = {**asdict(cfg), **overrides}
    model = VisionTransformer(**kw)
    model.pretrained_cfg = {"input_size": (3, cfg.img_size, cfg.img_size), "mean": CIFAR_MEAN, "std": CIFAR_STD,
                            "crop_pct": 1.0, "interpolation": "bilinear", "num_classes": cfg.num_classes,
                            "architecture": "demo_vit"}
    return model


def demo_card() -> "dict | None":
    """The shipped demo card (config, recipe, accuracy), or None before the demo has been trained."""
    return json.loads(CARD.read_text()) if CARD.exists() else None


def load_demo(path: "str | Path | None" = None) -> VisionTransformer:
    """The trained demo ViT in float32 eval mode, from the shipped weights (or ``path``)."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else WEIGHTS
    if not path.exists():
        raise FileNotFoundError(f"demo weights not found at {path}; train them with "
                                f"`python -m bench.train_demo --data ../shared/data/cifar10`")
    card = demo_card() if path == WEIGHTS else None
    cfg = DemoConfig(**card["config"]) if card else DemoConfig()
    model = build_demo_model(cfg)
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    model.load_state_dict(state)
    return model.eval()
