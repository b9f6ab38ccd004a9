"""CIFAR-10 image folders (``<split>/<class>/*.jpg``) as uint8 tensors, cached beside the user's other caches."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Tuple

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def cache_dir() -> Path:
    d = Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit-vit"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def load_split(root: "str | Path", split: str, cache: bool = True) -> Tuple[torch.Tensor, torch.Tensor, list]:
    """``(images uint8 [N, 3, 32, 32], labels int64 [N], class names)`` of ``root/split`` (classes sorted)."""
    folder = Path(root) / split
    if not folder.is_dir():
        raise FileNotFoundError(f"no CIFAR-10 split at {folder}: pass --data pointing at a folder with "
                                f"train/ and test/ class sub-folders (e.g. ../shared/data/cifar10)")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    files = [(f, i) for i, c in enumerate(classes) for f in sorted((folder / c).iterdir()) if f.is_file()]
    if not files:
        raise FileNotFoundError(f"{folder} holds no images")
    key = hashlib.sha1(f"{folder.resolve()}|{len(files)}|{files[-1][0].name}".encode()).hexdigest()[:12]
    path = cache_dir() / f"cifar_{split}_{key}.pt"
    if cache and path.exists():
        d = torch.load(path)
        return d["x"], d["y"], d["classes"]
    x = np.empty((len(files), 32, 32, 3), dtype=np.uint8)
    for j, (f, _) in enumerate(tqdm(files, desc=f"reading {split}", unit="img", leave=False)):
        with Image.open(f) as im:
            x[j] = np.asarray(im.convert("RGB").resize((32, 32)))
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    yt = torch.tensor([i for _, i in files], dtype=torch.int64)
    if cache:
        tmp = path.with_suffix(".tmp")
        torch.save({"x": xt, "y": yt, "classes": classes}, tmp)
        os.replace(tmp, path)
    return xt, yt, classes


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, 3, H, W]`` -> float normalised with the CIFAR-10 mean/std."""
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return (x.float() / 255.0 - mean) / std
