"""Images the tests make for themselves, so the suite needs no dataset on disk.

:func:`natural_images` draws colour images with a natural image's power spectrum (amplitude ~ 1 / f^1.5: smooth
regions and edges, not white noise) plus a few flat discs; :func:`write_image_folder` writes them as an
``ImageFolder`` tree (one sub-folder per class) of JPEG or PNG files, with odd sizes and grayscale files where
asked, the way real CIFAR-10 and ImageNet folders come.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from calib import data as D

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def natural_images(n: int, seed: int = 0, size: int | Tuple[int, int] = 32) -> torch.Tensor:
    """``n`` images ``[n, 3, H, W]`` in ``[-1, 1]``: 1/f^1.5 colour noise (channels mixed by a random colour matrix)
    with 1-3 flat-coloured discs, each image stretched to its 1st-99th percentile range."""
    h, w = (size, size) if isinstance(size, int) else size
    g = torch.Generator().manual_seed(seed)
    fy = torch.fft.fftfreq(h).abs()[:, None]
    fx = torch.fft.rfftfreq(w)[None, :]
    amp = 1.0 / (fy ** 2 + fx ** 2 + (1.0 / max(h, w)) ** 2) ** 0.75
    spec = torch.complex(torch.randn(n, 3, h, w // 2 + 1, generator=g), torch.randn(n, 3, h, w // 2 + 1, generator=g))
    x = torch.fft.irfft2(spec * amp, s=(h, w))
    mix = torch.eye(3) + 0.6 * torch.randn(n, 3, 3, generator=g)
    x = torch.einsum("nij,njhw->nihw", mix, x)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    scale = x.flatten(1).std(1)[:, None, None, None]
    for i in range(n):
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            cy, cx = float(torch.rand(1, generator=g)) * h, float(torch.rand(1, generator=g)) * w
            r = (0.1 + 0.25 * float(torch.rand(1, generator=g))) * min(h, w)
            disc = ((yy - cy) ** 2 + (xx - cx) ** 2) < r * r
            x[i][:, disc] = (2 * torch.randn(3, 1, generator=g) * scale[i, 0]).expand(3, int(disc.sum()))
    flat = x.flatten(1)
    lo, hi = torch.quantile(flat, 0.01, dim=1), torch.quantile(flat, 0.99, dim=1)
    x = (x - lo[:, None, None, None]) / (hi - lo).clamp_min(1e-6)[:, None, None, None]
    return (2 * x - 1).clamp(-1, 1)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images ``[n, 3, H, W]`` in ``[-1, 1]`` as 8-bit ``[n, H, W, 3]`` arrays."""
    return np.ascontiguousarray(((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())


def write_image_folder(root: Path, classes: Sequence[str], per_class: int, size: int | Tuple[int, int] = 32,
                       seed: int = 0, ext: str = ".jpg", sizes: Optional[Sequence[Tuple[int, int]]] = None,
                       gray_every: int = 0) -> Path:
    """An ``ImageFolder`` tree ``root/<class>/<class>_<i><ext>`` of :func:`natural_images`; ``sizes`` cycles
    through ``(H, W)`` sizes per image instead of one ``size``; every ``gray_every``-th file is grayscale."""
    root = Path(root)
    sizes = list(sizes) if sizes else [(size, size) if isinstance(size, int) else tuple(size)]
    total = len(classes) * per_class
    batches = {j: iter(to_uint8(natural_images(len(range(j, total, len(sizes))), seed=seed * 1_000_003 + j, size=hw)))
               for j, hw in enumerate(sizes)}  # one batch per size: file k is the next image of size k % len(sizes)
    jpeg = {"quality": 90} if ext.lower() in (".jpg", ".jpeg") else {}
    for k in range(total):
        name, i = classes[k // per_class], k % per_class
        (root / name).mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(next(batches[k % len(sizes)]), "RGB")
        if gray_every and k % gray_every == gray_every - 1:
            im = im.convert("L")
        im.save(root / name / f"{name}_{i:04d}{ext}", **jpeg)
    return root


def cifar_like(root: Path, train_per_class: int = 10, test_per_class: int = 10, seed: int = 0) -> Path:
    """A CIFAR-10-shaped root: ``train/`` and ``test/`` with the ten class folders of 32x32 JPEGs."""
    root = Path(root)
    write_image_folder(root / "train", CIFAR10_CLASSES, train_per_class, 32, seed=seed)
    write_image_folder(root / "test", CIFAR10_CLASSES, test_per_class, 32, seed=seed + 1)
    return root


#: a spread of (H, W) like the ImageNet sample's (68x121 up to large), kept small so 1,000 files write in seconds
IMAGENET_SIZES = ((68, 121), (96, 96), (150, 110), (120, 180), (75, 75), (200, 140), (90, 160), (130, 130))


def imagenet_like(root: Path, classes: int = 1000, seed: int = 0) -> Path:
    """One image per class in ``classes`` folders named like ImageNet wnids (``n00000000``...), ``.JPEG`` files of
    varied sizes, every 40th grayscale (the real sample has 23 of 1,000)."""
    names = [f"n{i:08d}" for i in range(classes)]
    return write_image_folder(Path(root), names, 1, seed=seed, ext=".JPEG", sizes=IMAGENET_SIZES, gray_every=40)


def folder_images(root: Path, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` 32x32 images of an image folder (seeded subset, e.g. real CIFAR-10 ``train/``), in ``[-1, 1]``."""
    folder = D.scan(str(root))
    tf = lambda im: torch.from_numpy(np.asarray(im.convert("RGB").resize((32, 32)), dtype=np.float32).copy()  # noqa: E731
                                     ).permute(2, 0, 1) / 127.5 - 1
    return D.load_subset(folder, tf, n, seed)[0]
