"""``python -m export.infer --checkpoint PATH --val DIR``: top-1 and images/second of a packed checkpoint.

Images go through the eval preprocessing stored in the checkpoint (resize to ``size / crop_pct``, centre crop,
mean/std); ``DIR`` is ``root/<class>/<img>`` with classes in sorted (ImageNet wnid) order. Throughput counts the
model's forward passes only (decoding excluded). Exit status 2 and ``error: ...`` on bad input.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional

import torch

from calib import data as D
from quant.errors import UserError, check_device

from . import format as fmt
from .loader import load


def transform_from(manifest: dict):
    from timm.data import create_transform
    p = manifest["preprocess"]
    size = int(p["input_size"])
    return create_transform(input_size=(3, size, size), is_training=False, interpolation=p["interpolation"],
                            crop_pct=p["crop_pct"], mean=tuple(p["mean"]), std=tuple(p["std"]))


@torch.no_grad()
def infer(checkpoint: str, val: str, batch_size: int = 32, size: Optional[int] = None, device: str = "cpu",
          workers: int = 0, seed: int = 0, progress: bool = True) -> dict:
    """``{"top1": %, "images": n, "images_per_s": ..., "seconds": ...}`` of the checkpoint on ``val``."""
    dev = check_device(device)
    model = load(checkpoint, device=dev)
    folder = D.scan(val, "--val")
    if not folder.classes:
        raise UserError(f"--val folder {val!r} has no class sub-folders; lay it out as root/<class>/<img>")
    warning = D.check_val_classes(folder, getattr(model, "num_classes", None))
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    tf = transform_from(model.lowbit_manifest)
    hits = n = 0
    seconds = 0.0
    total = len(folder) if size is None else min(size, len(folder))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, unit="img", desc="infer")
    for x, y in D.stream(folder, tf, batch_size, size, seed, workers):
        x = x.to(dev)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t = time.perf_counter()
        logits = model(x)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds += time.perf_counter() - t
        hits += int((logits.argmax(-1).cpu() == y).sum())
        n += y.numel()
        if bar is not None:
            bar.update(y.numel())
    if bar is not None:
        bar.close()
    return {"top1": 100.0 * hits / max(n, 1), "images": n, "seconds": seconds,
            "images_per_s": n / seconds if seconds > 0 else float("nan"), "skipped": len(folder.skipped)}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.infer", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="packed checkpoint written by quant.run --export")
    p.add_argument("--val", required=True, help="labelled image folder root/<class>/<img>")
    p.add_argument("--val-size", type=int, default=None, help="evaluate this many images (seeded subset)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=0, help="image-decoding processes")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        if args.batch_size < 1 or (args.val_size is not None and args.val_size < 1):
            raise UserError("--batch-size and --val-size must be >= 1")
        r = infer(args.checkpoint, args.val, args.batch_size, args.val_size, args.device, args.workers,
                  progress=not args.no_progress)
    except (UserError, fmt.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"top-1 {r['top1']:.2f}% on {r['images']} images ({r['skipped']} unreadable skipped); "
          f"{r['images_per_s']:.1f} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
