"""Generate a synthetic calibration set with one-step SD-Turbo, as an ImageFolder tree ``<out>/<wnid>/<n>.png``.

Class folders are ImageNet wnids, so their sorted order is ImageNet's class-index order. Prompts are either the
learned multi-mode prompts (``--prompts DIR`` from ``calib.learn_prompts``; image n of a class uses prompt
``n mod K``) or the text baseline ``"a <adjective> photo of <adjective> <class>"`` (``--baseline``). Each image gets
its own random latent (seeded per class). A class is written into ``<out>.partial-rank<r>/<wnid>`` and moved into
place when complete, so an existing class folder is finished and skipped on resume (an existing ``<out>`` must hold
only such folders of ``--per-class`` images). Bad input (SD-Turbo not loadable, prompt folder, classes, ``--out``)
gives one ``error: ...`` line and exit status 2 before anything is written.

Usage: ``python -m calib.generate --prompts DIR --per-class N --out DIR`` (``torchrun`` shards classes over GPUs).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from calib import sd_turbo as S
from calib.common import (
    class_name,
    cli_main,
    finish_distributed,
    imagenet_info,
    imagenet_wnids,
    own_entries,
    parse_classes,
    setup_distributed,
    shard,
)
from lowbit.errors import UserError

PHOTO_ADJECTIVES = ("good", "close-up", "bright", "dark", "cropped", "clean", "blurry", "sharp", "natural",
                    "realistic", "nice", "low-light", "wide-angle", "detailed", "professional", "casual")
OBJECT_ADJECTIVES = ("a large", "a small", "a", "the", "one", "a single", "a typical", "a cool", "a real",
                     "an old", "a young", "a weird", "a beautiful", "a clean", "a dirty", "a common")


def baseline_prompts(class_index: int, n: int, generator: torch.Generator) -> list[str]:
    """``n`` prompts ``"a <photo adjective> photo of <object adjective> <class name>"`` with random adjectives."""
    name = class_name(class_index)
    a = torch.randint(len(PHOTO_ADJECTIVES), (n,), generator=generator).tolist()
    b = torch.randint(len(OBJECT_ADJECTIVES), (n,), generator=generator).tolist()
    return [f"a {PHOTO_ADJECTIVES[i]} photo of {OBJECT_ADJECTIVES[j]} {name}" for i, j in zip(a, b)]


def learned_conditioning(sd: S.SDTurbo, prompt_file: Path) -> torch.Tensor:
    """Conditioning ``[K, L, D]`` of the K learned prompts saved by ``calib.learn_prompts``."""
    prompts = torch.load(prompt_file, map_location="cpu", weights_only=True)["prompts"]
    return S.encode_prompt_embeddings(sd, prompts.to(sd.device))[0]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` in [0, 1] -> ``[B, H, W, 3]`` uint8."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@torch.inference_mode()
def generate_class(sd: S.SDTurbo, class_index: int, n: int, folder: Path, prompt_dir: Path | None,
                   batch_size: int = 8, height: int = 512, width: int = 512, seed: int = 0) -> None:
    """Write ``n`` images ``folder/<i>.png`` of one class (learned prompts from ``prompt_dir``, else the baseline)."""
    gen = torch.Generator().manual_seed(seed * 100003 + class_index)
    if prompt_dir is not None:
        cond_all = learned_conditioning(sd, Path(prompt_dir) / f"{imagenet_info().index_to_label_name(class_index)}.pt")
    else:
        texts = baseline_prompts(class_index, n, gen)
    folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, n, batch_size):
        idx = list(range(start, min(n, start + batch_size)))
        if prompt_dir is not None:
            cond = cond_all[torch.tensor([i % len(cond_all) for i in idx], device=cond_all.device)]
        else:
            cond = S.encode_text(sd, [texts[i] for i in idx])
        noise = torch.randn(S.latent_shape(sd, len(idx), height, width), generator=gen)
        for i, img in zip(idx, to_uint8(S.one_step_generate(sd, cond, noise))):
            Image.fromarray(img).save(folder / f"{i}.png")


def missing_prompt_files(prompt_dir: Path, classes: list[int]) -> list[str]:
    """Wnids of ``classes`` without a ``<wnid>.pt`` in ``prompt_dir``."""
    names = imagenet_wnids()
    return [names[c] for c in classes if not (Path(prompt_dir) / f"{names[c]}.pt").exists()]


def generate_all(sd: S.SDTurbo, classes: list[int], out: Path, per_class: int, prompt_dir: Path | None = None,
                 batch_size: int = 8, height: int = 512, width: int = 512, seed: int = 0, rank: int = 0,
                 world: int = 1) -> list[int]:
    """Generate this rank's share of ``classes`` into ``out/<wnid>``, skipping existing class folders; returns the
    classes generated now. A class interrupted by an error leaves nothing behind."""
    out = Path(out)
    names = imagenet_info().label_names()
    if prompt_dir is not None:
        missing = missing_prompt_files(prompt_dir, classes)
        if missing:
            raise FileNotFoundError(f"no learned prompts for {len(missing)} classes in {prompt_dir} (e.g. "
                                    f"{missing[0]}.pt); run calib.learn_prompts for them or restrict --classes")
    partial = out.with_name(f"{out.name}.partial-rank{rank}")
    todo = [c for c in shard(classes, rank, world) if not (out / names[c]).is_dir()]
    out.mkdir(parents=True, exist_ok=True)
    try:
        for c in tqdm(todo, desc=f"generate (rank {rank})", position=rank, disable=None):
            tmp = partial / names[c]
            shutil.rmtree(tmp, ignore_errors=True)
            generate_class(sd, c, per_class, tmp, prompt_dir, batch_size, height, width, seed)
            os.replace(tmp, out / names[c])
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return todo


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m calib.generate", description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", type=Path, help="folder of learned prompts from calib.learn_prompts")
    src.add_argument("--baseline", action="store_true", help='text prompts "a <adj> photo of <adj> <class>"')
    ap.add_argument("--per-class", type=int, required=True)
    ap.add_argument("--out", type=Path, required=True,
                    help="ImageFolder to write (a folder from an earlier run with the same --per-class is resumed)")
    ap.add_argument("--classes", default=None,
                    help="all | a-b | comma list of indices or wnids (default: the classes in --prompts, else all)")
    ap.add_argument("--sd-path", default=S.DEFAULT_SD, help="SD-Turbo hub id or local diffusers folder")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    return ap


def check_out(out: Path, per_class: int) -> None:
    """``--out`` must be new, or an ImageFolder of this command's ``<wnid>/`` class folders holding ``per_class``
    images each; :class:`UserError` otherwise."""
    entries = own_entries(out, lambda p, wnids: p.is_dir() and p.name in wnids, "class folders of calib.generate")
    for p in entries:
        n = sum(1 for f in p.iterdir() if f.suffix == ".png")
        if n != per_class:
            raise UserError(f"--out {str(out)!r} holds {n} images in {p.name}/, not --per-class {per_class}; pass "
                            f"--per-class {n} to resume it or pick a new --out")


def run(args: argparse.Namespace) -> None:
    """Validate everything cheap first (sizes, prompt folder, classes, --out, --sd-path), then load, then generate."""
    for flag, v in (("--per-class", args.per_class), ("--batch-size", args.batch_size)):
        if v < 1:
            raise UserError(f"{flag} must be at least 1, got {v}")
    if args.prompts is not None:
        if not args.prompts.is_dir():
            raise UserError(f"--prompts {str(args.prompts)!r} is not a folder; pass the --out folder of "
                            f"calib.learn_prompts")
        if not any(args.prompts.glob("n*.pt")):
            raise UserError(f"--prompts {str(args.prompts)!r} holds no learned prompt files (<wnid>.pt); run "
                            f"python -m calib.learn_prompts --out {args.prompts} first")
    if args.classes is not None:
        try:
            classes = parse_classes(args.classes)
        except ValueError as e:
            raise UserError(f"--classes: {e}") from None
        if not classes:
            raise UserError(f"--classes {args.classes!r} selects no class; use all, a-b, or a comma list")
    elif args.prompts is not None:
        wnids = {p.stem for p in args.prompts.glob("n*.pt")}
        classes = [i for i, w in enumerate(imagenet_wnids()) if w in wnids]
        if not classes:
            raise UserError(f"--prompts {str(args.prompts)!r}: none of its .pt files is named after an ImageNet wnid")
    else:
        classes = parse_classes("all")
    if args.prompts is not None:
        missing = missing_prompt_files(args.prompts, classes)
        if missing:
            raise UserError(f"--prompts {str(args.prompts)!r} has no learned prompts for {len(missing)} of the "
                            f"--classes (e.g. {missing[0]}.pt); run calib.learn_prompts for them or restrict --classes")
    check_out(args.out, args.per_class)
    sd = S.load_sd_turbo(args.sd_path)
    try:
        S.latent_shape(sd, 1, args.height, args.width)
    except ValueError as e:
        raise UserError(f"--height/--width: {e}") from None
    rank, world, device = setup_distributed()
    sd.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    generate_all(sd, classes, args.out, args.per_class, args.prompts, args.batch_size, args.height, args.width,
                 args.seed, rank, world)
    finish_distributed()


def main(argv: list[str] | None = None) -> int:
    """Exit status 0, or 2 with one ``error: ...`` line on bad input (nothing written then)."""
    args = build_parser().parse_args(argv)
    return cli_main(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
