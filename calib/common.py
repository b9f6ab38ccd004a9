"""Shared helpers for the data-free calibration commands: ImageNet class selection, torchrun sharding, atomic
writes."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from timm.data import ImageNetInfo


@functools.lru_cache(maxsize=None)
def imagenet_info() -> ImageNetInfo:
    return ImageNetInfo("imagenet-1k")


def parse_classes(spec: str) -> list[int]:
    """``all`` | ``a-b`` (inclusive) | comma list of indices or wnids, mixed -> sorted unique ImageNet indices."""
    info = imagenet_info()
    n = info.num_classes()
    if spec == "all":
        return list(range(n))
    wnids = {w: i for i, w in enumerate(info.label_names())}
    out = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if part in wnids:
            out.add(wnids[part])
        elif "-" in part and all(s.isdigit() for s in part.split("-", 1)):
            a, b = map(int, part.split("-", 1))
            out.update(range(a, b + 1))
        elif part.isdigit():
            out.add(int(part))
        else:
            raise ValueError(f"class {part!r} is neither an index, a range a-b, nor an ImageNet wnid (e.g. n01440764)")
    bad = [i for i in out if not 0 <= i < n]
    if bad:
        raise ValueError(f"class indices {bad} are outside 0..{n - 1}")
    return sorted(out)


def class_name(index: int) -> str:
    """Short class name: the first entry of the ImageNet description ("tench" for "tench, Tinca tinca")."""
    return imagenet_info().index_to_description(index).split(",")[0].strip()


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) joins the process group (nccl on GPU, else gloo)
    and uses cuda:LOCAL_RANK; a plain single process gets rank 0 of 1 without a process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    return rank, world, device


def finish_distributed() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def shard(items: list, rank: int, world: int) -> list:
    """This rank's share of ``items``: ``items[rank::world]``."""
    return items[rank::world]


def atomic_torch_save(obj, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)
