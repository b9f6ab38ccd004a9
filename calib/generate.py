"""Generate a synthetic calibration set with one-step SD-Turbo, as an ImageFolder tree ``<out>/<wnid>/<n>.png``.

Class folders are ImageNet wnids, so their sorted order is ImageNet's class-index order. Prompts are either the
learned multi-mode prompts (``--prompts DIR`` from ``calib.learn_prompts``; image n of a class uses prompt
``n mod K``) or the text baseline ``"a <adjective> photo of <adjective> <class>"`` (``--baseline``). Each image gets
its own random latent (seeded per class). A class is written into ``<out>.partial-rank<r>/<wnid>`` and moved into
place when complete, so an existing class folder is finished and skipped on resume.

Usage: ``python -m calib.generate --prompts DIR --per-class N --out DIR`` (``torchrun`` shards classes over GPUs).
"""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from calib import sd_turbo as S
from calib.common import class_name, finish_distributed, imagenet_info, parse_classes, setup_distributed, shard

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


def generate_all(sd: S.SDTurbo, classes: list[int], out: Path, per_class: int, prompt_dir: Path | None = None,
                 batch_size: int = 8, height: int = 512, width: int = 512, seed: int = 0, rank: int = 0,
                 world: int = 1) -> list[int]:
    """Generate this rank's share of ``classes`` into ``out/<wnid>``, skipping existing class folders; returns the
    classes generated now."""
    out = Path(out)
    names = imagenet_info().label_names()
    if prompt_dir is not None:
        missing = [names[c] for c in classes if not (Path(prompt_dir) / f"{names[c]}.pt").exists()]
        if missing:
            raise FileNotFoundError(f"no learned prompts for {len(missing)} classes in {prompt_dir} (e.g. "
                                    f"{missing[0]}.pt); run calib.learn_prompts for them or restrict --classes")
    partial = out.with_name(f"{out.name}.partial-rank{rank}")
    todo = [c for c in shard(classes, rank, world) if not (out / names[c]).is_dir()]
    out.mkdir(parents=True, exist_ok=True)
    for c in tqdm(todo, desc=f"generate (rank {rank})", position=rank, disable=None):
        tmp = partial / names[c]
        shutil.rmtree(tmp, ignore_errors=True)
        generate_class(sd, c, per_class, tmp, prompt_dir, batch_size, height, width, seed)
        os.replace(tmp, out / names[c])
    if partial.is_dir():
        partial.rmdir()
    return todo


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", type=Path, help="folder of learned prompts from calib.learn_prompts")
    src.add_argument("--baseline", action="store_true", help='text prompts "a <adj> photo of <adj> <class>"')
    ap.add_argument("--per-class", type=int, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--classes", default=None,
                    help="all | a-b | comma list of indices or wnids (default: the classes in --prompts, else all)")
    ap.add_argument("--sd-path", default=S.DEFAULT_SD, help="SD-Turbo hub id or local diffusers folder")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.per_class < 1:
        ap.error("--per-class must be at least 1")
    if args.classes is not None:
        classes = parse_classes(args.classes)
    elif args.prompts is not None:
        wnids = {p.stem for p in Path(args.prompts).glob("n*.pt")}
        classes = [i for i, w in enumerate(imagenet_info().label_names()) if w in wnids]
        if not classes:
            ap.error(f"no learned prompt files (<wnid>.pt) in {args.prompts}")
    else:
        classes = parse_classes("all")
    rank, world, device = setup_distributed()
    sd = S.load_sd_turbo(args.sd_path).to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    generate_all(sd, classes, args.out, args.per_class, args.prompts, args.batch_size, args.height, args.width,
                 args.seed, rank, world)
    finish_distributed()


if __name__ == "__main__":
    main()
