"""Calibration images streamed from disk, so memory does not grow with the calibration-set size.

``quant.run`` decodes the ``--calib-size`` images drawn from ``--data`` once (:func:`build_cache`, ``--workers``
processes) into a compact cache file: the image after the model's resize and centre crop as ``uint8`` (3 bytes a
pixel; the float conversion and normalisation run when a batch is read), or the transform's ``float32`` output when
the transform has no ``ToTensor`` step to split at. Optimisation then reads batches from that file through a
``torch.utils.data.DataLoader`` (:meth:`CachedImages.batches`); only the current batches are in memory. The cached
images are bit-identical to ``transform(image)`` and drawn exactly like :func:`calib.data.load_subset` (seeded order,
undecodable files skipped and replaced by the next ones), so a streamed run computes what an in-memory one does.

:class:`TensorImages` gives an in-memory ``[N, 3, H, W]`` tensor the same interface (the Python API and the tests);
:func:`as_images` accepts either.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from calib import data as D
from lowbit.errors import UserError

CACHE_VERSION = 1


class CalibImages:
    """Indexable calibration images: ``len``, ``take(indices)`` and ``batches(index_batches)``."""

    def __len__(self) -> int:
        raise NotImplementedError

    def take(self, indices: Sequence[int]) -> Tensor:
        """Images ``[len(indices), 3, H, W]`` (float32), in the order given."""
        raise NotImplementedError

    def batches(self, index_batches: Iterable[Sequence[int]]) -> Iterator[Tensor]:
        """One stacked batch per index list, in order (prefetched by worker processes where there are any)."""
        for idx in index_batches:
            yield self.take(idx)

    def head(self, n: int) -> Tensor:
        return self.take(range(min(n, len(self))))


class TensorImages(CalibImages):
    """An in-memory ``[N, 3, H, W]`` tensor (what the optimisers took before streaming)."""

    def __init__(self, images: Tensor):
        self.images = images

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def take(self, indices) -> Tensor:
        if isinstance(indices, range) and indices.step == 1:
            return self.images[indices.start:indices.stop]
        return self.images[torch.as_tensor(list(indices), dtype=torch.long)]


def as_images(images) -> CalibImages:
    return images if isinstance(images, CalibImages) else TensorImages(images)


def split_transform(transform: Callable) -> Tuple[Optional[Callable], Callable]:
    """``(pil_part, tensor_part)`` of a torchvision ``Compose`` at its ``ToTensor`` step (``pil_part`` returns the
    cropped PIL image, whose uint8 pixels are cached); ``(None, transform)`` when there is no such step."""
    steps = getattr(transform, "transforms", None)
    if not isinstance(steps, (list, tuple)):
        return None, transform
    k = next((i for i, t in enumerate(steps) if "ToTensor" in type(t).__name__), None)
    if k is None:
        return None, transform
    from torchvision.transforms import Compose
    return Compose(list(steps[:k])), Compose(list(steps[k:]))


class _Prepared(torch.utils.data.Dataset):
    """Item ``i`` of ``order``: the cacheable array of the image (uint8 HWC or float32 CHW), or None if unreadable."""

    def __init__(self, folder: D.ImageFolder, transform: Callable, order: Sequence[int]):
        self.items, self.order = folder.items, list(order)
        self.pil, self.post = split_transform(transform)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i):
        path = self.items[self.order[i]][0]
        im = D.load_rgb(path)
        if im is None:
            return None, path
        if self.pil is not None:
            out = self.pil(im)
            if hasattr(out, "convert"):
                return np.asarray(out.convert("RGB"), dtype=np.uint8).copy(), path
            return self.post(out).float().numpy(), path  # a transform that left PIL early: cache floats
        return torch.as_tensor(self.post(im)).float().numpy(), path


def _fingerprint(folder: D.ImageFolder, transform, size: Optional[int], seed: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_VERSION, os.path.abspath(folder.root), size, seed, repr(transform)]).encode())
    for path, _ in folder.items:
        h.update(path.encode() + b"\0")
    return h.hexdigest()


def _stats(paths: Sequence[str]) -> List[List[int]]:
    out = []
    for p in paths:
        st = os.stat(p)
        out.append([st.st_size, st.st_mtime_ns])
    return out


def build_cache(folder: D.ImageFolder, transform: Callable, size: Optional[int], path: str, seed: int = 0,
                workers: int = 0, progress: bool = True, what: str = "--data") -> "CachedImages":
    """Decode ``size`` images of ``folder`` (all when None; drawn like :func:`calib.data.load_subset`) through
    ``transform`` into the cache folder ``path`` (``images.bin`` + ``meta.json``) and open it.

    An existing complete cache of the same folder, size, seed and transform whose source files are unchanged is
    reused (``--resume``). The cache appears atomically (written under a temporary name, then renamed); undecodable
    files are recorded in ``folder.skipped``.
    """
    fp = _fingerprint(folder, transform, size, seed)
    meta_path = os.path.join(path, "meta.json")
    if os.path.isfile(meta_path):
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            if meta["fingerprint"] == fp and meta["stats"] == _stats(meta["paths"]):
                folder.skipped += [p for p in meta["skipped"] if p not in folder.skipped]
                return CachedImages(path, transform, workers)
        except (OSError, ValueError, KeyError):
            pass
    want = len(folder) if size is None else min(size, len(folder))
    order = D.subset_order(len(folder), seed) if size is not None else range(len(folder))
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.abspath(path) + f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    from tqdm.auto import tqdm
    loader = torch.utils.data.DataLoader(_Prepared(folder, transform, order), batch_size=64, num_workers=workers,
                                         collate_fn=list)
    paths, skipped, shape, dtype = [], [], None, None
    bar = tqdm(total=want, desc="decoding calibration images", unit="img", disable=not progress, dynamic_ncols=True)
    try:
        with open(os.path.join(tmp, "images.bin"), "wb") as f:
            for batch in loader:
                for arr, p in batch:
                    if len(paths) == want:
                        break
                    if arr is None:
                        skipped.append(p)
                        continue
                    if shape is None:
                        shape, dtype = arr.shape, arr.dtype
                    elif arr.shape != shape:
                        raise UserError(f"{what}: {p} gives a {tuple(arr.shape)} image after preprocessing, the "
                                        f"others {tuple(shape)}; the model's transform must make every image the "
                                        f"same size (a centre crop)")
                    f.write(np.ascontiguousarray(arr).tobytes())
                    paths.append(p)
                    bar.update(1)
                if len(paths) == want:
                    break
        folder.skipped += skipped
        if not paths:
            raise UserError(f"{what} folder {folder.root!r}: none of its {len(folder)} images could be decoded")
        meta = {"version": CACHE_VERSION, "fingerprint": fp, "count": len(paths), "shape": list(shape),
                "dtype": np.dtype(dtype).name, "layout": "hwc" if np.dtype(dtype) == np.uint8 else "chw",
                "paths": paths, "stats": _stats(paths), "skipped": skipped}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
        del loader
    return CachedImages(path, transform, workers)


class CachedImages(CalibImages, torch.utils.data.Dataset):
    """The images of a :func:`build_cache` folder, read per item with ``os.pread`` (so the pages stay in the page
    cache, not in this process), converted by the transform's tensor part; batches come through a DataLoader with
    ``workers`` processes."""

    def __init__(self, path: str, transform: Callable, workers: int = 0):
        with open(os.path.join(path, "meta.json")) as f:
            self.meta = json.load(f)
        self.path, self.workers = path, workers
        self.shape, self.dtype = tuple(self.meta["shape"]), np.dtype(self.meta["dtype"])
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.post = split_transform(transform)[1] if self.meta["layout"] == "hwc" else None
        size = os.path.getsize(os.path.join(path, "images.bin"))
        if size != self.nbytes * len(self):
            raise UserError(f"calibration cache {path!r} is truncated ({size} bytes, expected "
                            f"{self.nbytes * len(self)}); delete it and run again")
        self._fd, self._pid = None, None

    def __len__(self) -> int:
        return int(self.meta["count"])

    def __getstate__(self):
        return {**self.__dict__, "_fd": None, "_pid": None}

    def __getitem__(self, i: int) -> Tensor:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(os.path.join(self.path, "images.bin"), os.O_RDONLY), os.getpid()
        buf = os.pread(self._fd, self.nbytes, int(i) * self.nbytes)
        arr = np.frombuffer(buf, dtype=self.dtype).reshape(self.shape)
        if self.post is None:
            return torch.from_numpy(arr.copy())
        from PIL import Image
        return self.post(Image.fromarray(arr, "RGB"))

    def take(self, indices) -> Tensor:
        return torch.stack([self[i] for i in indices])

    def batches(self, index_batches: Iterable[Sequence[int]]) -> Iterator[Tensor]:
        if self.workers == 0:
            yield from super().batches(index_batches)
            return
        loader = torch.utils.data.DataLoader(self, batch_sampler=index_batches, num_workers=self.workers,
                                             collate_fn=torch.stack, pin_memory=torch.cuda.is_available())
        it = iter(loader)
        try:
            yield from it
        finally:
            del it

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
