"""``python -m export.infer --checkpoint PATH --val DIR``: top-1 and images/second of a packed checkpoint;
``--images DIR [--top-k K] [--output FILE.json|.csv]``: the top-K classes and probabilities of every image of an
unlabelled folder (any layout; printed one line per image, or written as JSON or CSV).

Images go through the eval preprocessing stored in the checkpoint (``manifest["preprocess"]``: bicubic resize to
``input_size / crop_pct``, centre crop to ``input_size``, then ``(x / 255 - mean) / std``; grayscale converted to
RGB); a ``--val`` folder is ``root/<class>/<img>`` with classes in sorted (ImageNet wnid) order. Throughput counts
the model's forward passes only (decoding excluded). Exit status 2 and ``error: ...`` on bad input.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from calib import data as D
from calib.common import atomic_write_text
from lowbit.errors import UserError, check_device

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


@torch.no_grad()
def predict(checkpoint: str, images: str, top_k: int = 5, batch_size: int = 32, device: str = "cpu",
            progress: bool = True) -> Tuple[List[dict], List[str]]:
    """``([{"path", "top": [{"class", "prob"}, ...]}, ...], unreadable paths)``: the ``top_k`` softmax classes of
    every image file under ``images`` (recursively, in sorted order), preprocessed as the checkpoint says."""
    dev = check_device(device)
    model = load(checkpoint, device=dev)
    folder = D.scan(images, "--images")
    tf = transform_from(model.lowbit_manifest)
    paths = [p for p, _ in folder.items]
    rows, bad = [], []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(paths), unit="img", desc="predict")
    for i in range(0, len(paths), batch_size):
        ok, xs = [], []
        for path in paths[i:i + batch_size]:
            im = D.load_rgb(path)
            if im is None:
                bad.append(path)
            else:
                ok.append(path)
                xs.append(tf(im))
        if xs:
            probs = model(torch.stack(xs).to(dev)).float().softmax(-1).cpu()
            top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
            rows += [{"path": p, "top": [{"class": int(c), "prob": float(v)} for c, v in zip(ci, vi)]}
                     for p, ci, vi in zip(ok, top.indices.tolist(), top.values.tolist())]
        if bar is not None:
            bar.update(len(paths[i:i + batch_size]))
    if bar is not None:
        bar.close()
    return rows, bad


def predictions_text(rows: List[dict], style: str) -> str:
    """``rows`` of :func:`predict` as ``json``, ``csv`` (path, then class and prob for each rank) or ``lines``."""
    if style == "json":
        return json.dumps(rows, indent=1) + "\n"
    k = max((len(r["top"]) for r in rows), default=0)
    if style == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["path"] + [f"{name}{i + 1}" for i in range(k) for name in ("class", "prob")])
        for r in rows:
            w.writerow([r["path"]] + [x for t in r["top"] for x in (t["class"], f"{t['prob']:.6f}")])
        return buf.getvalue()
    return "".join(r["path"] + "  " + "  ".join(f"{t['class']} ({t['prob']:.3f})" for t in r["top"]) + "\n"
                   for r in rows)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.infer", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="packed checkpoint written by quant.run --export")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--val", help="labelled image folder root/<class>/<img>: top-1 and images/s")
    what.add_argument("--images", help="unlabelled image folder (any layout): top-k classes of every image")
    p.add_argument("--top-k", type=int, default=5, help="with --images: classes per image")
    p.add_argument("--output", help="with --images: write the predictions here (.json or .csv) instead of printing")
    p.add_argument("--val-size", type=int, default=None, help="evaluate this many images (seeded subset)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=0, help="image-decoding processes")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        if args.batch_size < 1 or (args.val_size is not None and args.val_size < 1):
            raise UserError("--batch-size and --val-size must be >= 1")
        if args.images is not None:
            return _predict_main(args)
        r = infer(args.checkpoint, args.val, args.batch_size, args.val_size, args.device, args.workers,
                  progress=not args.no_progress)
    except (UserError, fmt.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"top-1 {r['top1']:.2f}% on {r['images']} images ({r['skipped']} unreadable skipped); "
          f"{r['images_per_s']:.1f} images/s")
    return 0


def _predict_main(args: argparse.Namespace) -> int:
    if args.top_k < 1:
        raise UserError(f"--top-k must be >= 1, got {args.top_k}")
    out_fmt = "lines"
    if args.output is not None:
        out_fmt = Path(args.output).suffix.lower().lstrip(".")
        if out_fmt not in ("json", "csv"):
            raise UserError(f"--output {args.output!r}: name a .json or .csv file")
        if not Path(args.output).resolve().parent.is_dir():
            raise UserError(f"--output {args.output!r}: its folder does not exist")
    rows, bad = predict(args.checkpoint, args.images, args.top_k, args.batch_size, args.device,
                        progress=not args.no_progress)
    text = predictions_text(rows, out_fmt)
    if args.output is None:
        print(text, end="")
    else:
        atomic_write_text(text, args.output)
        print(f"wrote the top-{args.top_k} classes of {len(rows)} images to {args.output}")
    if bad:
        print(f"warning: {len(bad)} unreadable files skipped (first: {bad[0]})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
