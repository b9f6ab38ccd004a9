"""Image folders for calibration and validation.

Layout: ``root/<class>/<image>`` (class index = position of ``<class>`` in sorted order, the ImageNet convention
for wnid folders); for calibration a flat ``root/<image>`` folder works too. Images are converted to RGB
(grayscale, palette, CMYK, RGBA); files that cannot be decoded are skipped and counted.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from lowbit.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")


@dataclass
class ImageFolder:
    """Sorted ``(path, class_index)`` items under ``root``; ``skipped`` counts undecodable files met so far."""

    root: str
    items: List[Tuple[str, int]]
    classes: List[str]
    skipped: List[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)


def scan(root: str, what: str = "--data") -> ImageFolder:
    """Index an image folder; :class:`UserError` when it is missing or holds no images."""
    if not root or not os.path.isdir(root):
        raise UserError(f"{what} folder {root!r} does not exist or is not a folder; pass a folder of images "
                        f"(root/<class>/<img>)")
    entries = sorted(os.listdir(root))
    classes = [e for e in entries if os.path.isdir(os.path.join(root, e))]
    items: List[Tuple[str, int]] = []
    for ci, c in enumerate(classes):
        for dirpath, dirnames, files in os.walk(os.path.join(root, c)):
            dirnames.sort()
            items += [(os.path.join(dirpath, f), ci) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
    items += [(os.path.join(root, f), -1) for f in entries
              if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(root, f))]
    if not items:
        raise UserError(f"{what} folder {root!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                        f"pass a folder laid out as root/<class>/<img>")
    return ImageFolder(root, items, classes)


def load_rgb(path: str):
    """The image at ``path`` as an RGB PIL image, or None when it cannot be decoded."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except Exception:  # noqa: BLE001 - any decoder failure means "unreadable"
        return None


def subset_order(n: int, seed: int) -> List[int]:
    """Deterministic order in which items are drawn for a subset (a seeded permutation)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def load_subset(folder: ImageFolder, transform: Callable, size: Optional[int], seed: int = 0,
                what: str = "--data") -> Tuple[Tensor, Tensor]:
    """``size`` decodable images (all when None) drawn in :func:`subset_order`, as ``(images [B,3,H,W], labels [B])``.

    Undecodable files are skipped (recorded in ``folder.skipped``) and replaced by the next ones in the order.
    """
    order = subset_order(len(folder), seed) if size is not None else range(len(folder))
    want = len(folder) if size is None else size
    xs, ys = [], []
    for i in order:
        if len(xs) == want:
            break
        path, label = folder.items[i]
        im = load_rgb(path)
        if im is None:
            folder.skipped.append(path)
            continue
        xs.append(transform(im))
        ys.append(label)
    if not xs:
        raise UserError(f"{what} folder {folder.root!r}: none of its {len(folder)} images could be decoded")
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long)


class _Decoded(torch.utils.data.Dataset):
    def __init__(self, folder: ImageFolder, transform: Callable, order):
        self.folder, self.transform, self.order = folder, transform, list(order)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i):
        path, label = self.folder.items[self.order[i]]
        im = load_rgb(path)
        return (None if im is None else self.transform(im)), label, path


def _collate(items):
    ok = [(x, y) for x, y, _ in items if x is not None]
    bad = [p for x, _, p in items if x is None]
    if not ok:
        return None, None, bad
    return torch.stack([x for x, _ in ok]), torch.tensor([y for _, y in ok], dtype=torch.long), bad


def stream(folder: ImageFolder, transform: Callable, batch_size: int, size: Optional[int] = None,
           seed: int = 0, workers: int = 0) -> Iterator[Tuple[Tensor, Tensor]]:
    """Batches ``(images, labels)`` of all decodable images (or the first ``size`` of :func:`subset_order`),
    decoded on the fly by ``workers`` processes (0: in this one); undecodable files are skipped and recorded in
    ``folder.skipped`` (a batch may then be short)."""
    order = range(len(folder)) if size is None else subset_order(len(folder), seed)[:size]
    loader = torch.utils.data.DataLoader(_Decoded(folder, transform, order), batch_size=batch_size,
                                         num_workers=workers, collate_fn=_collate)
    for x, y, bad in loader:
        folder.skipped += bad
        if x is not None:
            yield x, y


def check_val_classes(folder: ImageFolder, num_classes: Optional[int], flag: str = "--val") -> Optional[str]:
    """Labels are the sorted class folders' indices, so a labelled folder must hold exactly the model's classes:
    more is a :class:`UserError`; fewer returns a warning (each folder is scored as the class of its rank, which
    is the model's only by chance)."""
    n = len(folder.classes)
    if num_classes is None or n == num_classes:
        return None
    if n > num_classes:
        raise UserError(f"{flag} has {n} class folders but the model predicts {num_classes} classes; pass a "
                        f"validation folder of this model's classes")
    return (f"{flag} holds {n} class folders of the model's {num_classes}: label i is the i-th folder in sorted "
            f"order, so top-1 is meaningful only with a folder for every class")
