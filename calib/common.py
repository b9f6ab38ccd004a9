"""Shared helpers for the data-free calibration commands: ImageNet class selection, torchrun sharding, atomic
writes, hub access that fails fast offline, and the ``error: ...`` exit of the command lines."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from pathlib import Path
from typing import Callable

import torch

from lowbit.errors import UserError
from lowbit.models import hub_reachable


@functools.lru_cache(maxsize=None)
def imagenet_info():
    """timm's ``ImageNetInfo("imagenet-1k")`` (wnids, descriptions)."""
    from timm.data import ImageNetInfo

    return ImageNetInfo("imagenet-1k")


@functools.lru_cache(maxsize=None)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k wnids in class-index order, read from timm's synset list without importing timm (whose
    import costs seconds), so the command lines check their arguments quickly."""
    import importlib.util

    spec = importlib.util.find_spec("timm")
    path = Path(spec.submodule_search_locations[0]) / "data" / "_info" / "imagenet_synsets.txt" if spec else None
    if path is not None and path.is_file():
        wnids = tuple(w.strip() for w in path.read_text().splitlines() if w.strip())
        if len(wnids) == 1000:
            return wnids
    return tuple(imagenet_info().label_names())


def own_entries(out: Path, is_own: Callable[[Path, set], bool], what: str) -> list:
    """Sorted visible entries of an existing ``--out`` (``[]`` when it does not exist), each of which
    ``is_own(entry, wnids)`` must accept as this command's output (``what`` names it in the error); raises
    :class:`lowbit.errors.UserError` for a file or foreign entries."""
    if not out.exists():
        return []
    if not out.is_dir():
        raise UserError(f"--out {str(out)!r} exists and is not a folder; pick another --out")
    wnids = set(imagenet_wnids())
    entries = sorted(p for p in out.iterdir() if not p.name.startswith("."))
    foreign = [p.name for p in entries if not is_own(p, wnids)]
    if foreign:
        raise UserError(f"--out {str(out)!r} exists and holds entries that are not {what} (e.g. {foreign[0]!r}); "
                        f"pick a new --out (an earlier run's folder is resumed)")
    return entries


def parse_classes(spec: str) -> list[int]:
    """``all`` | ``a-b`` (inclusive) | comma list of indices or wnids, mixed -> sorted unique ImageNet indices."""
    names = imagenet_wnids()
    n = len(names)
    if spec == "all":
        return list(range(n))
    wnids = {w: i for i, w in enumerate(names)}
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
    """``torch.save`` into a hidden temp file beside ``path``, renamed onto it (removed if the save fails)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(text: str, path) -> None:
    """``text`` into a hidden temp file beside ``path``, renamed onto it (removed on failure)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(obj, path) -> None:
    """``obj`` as indented JSON, written by :func:`atomic_write_text`."""
    atomic_write_text(json.dumps(obj, indent=1), path)


@functools.lru_cache(maxsize=None)
def hub_online() -> bool:
    """Whether the Hugging Face hub may be used: ``HF_HUB_OFFLINE`` unset and a TCP connection to it opens (3 s)."""
    from huggingface_hub import constants as hf
    return not hf.HF_HUB_OFFLINE and hub_reachable(hf.ENDPOINT)


@contextlib.contextmanager
def hub_cache_only_when_offline():
    """Within the block, hub downloads read the local cache only when :func:`hub_online` is False (a quick failure
    instead of minutes of retries)."""
    from huggingface_hub import constants as hf

    before = hf.HF_HUB_OFFLINE
    hf.HF_HUB_OFFLINE = before or not hub_online()
    try:
        yield
    finally:
        hf.HF_HUB_OFFLINE = before


def cli_main(run: Callable[[], None]) -> int:
    """Call ``run()``; a :class:`lowbit.errors.UserError` becomes one ``error: ...`` line on stderr (rank 0 only under
    torchrun: every rank validates the same inputs) and exit status 2."""

    try:
        run()
    except UserError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    return 0
