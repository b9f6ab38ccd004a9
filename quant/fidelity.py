"""Label-free fidelity of a quantized model to its float model, on held-out images (``quant.run``'s report).

For images ``x_i`` the optimiser never saw, with ``p_i = softmax(fp(x_i))`` and ``q_i = softmax(quantized(x_i))``::

    top1_agreement = 100 * mean_i [argmax p_i == argmax q_i]          (%)
    kl             = mean_i sum_c p_ic (log p_ic - log q_ic)          (nats, temperature 1, float64)

Held-out images (:func:`held_out`), first that applies: ``--val`` images (labels unused, seeded draw), ``--data``
images the calibration did not draw (the tail of the same seeded order), else images synthesized like the data-free
calibration set (:func:`calib.invert.synthesize`, other seeds; ``--data invert`` and folders too small to spare any).
"""
from __future__ import annotations

import argparse
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from calib import data as D
from calib import invert
from calib.invert import MIXTURES, InvertConfig

SYNTH_SIZE = 64      # default held-out images synthesized (one calib.invert batch)
FOLDER_SIZE = 256    # default held-out images read from a folder
SYNTH_SEED = 50000   # offset from the calibration synthesis seeds (seed * 100003 + batch)


@torch.no_grad()
def agreement(fp_model: nn.Module, q_model: nn.Module, images: Tensor, batch_size: int = 64,
              device="cpu") -> dict:
    """``{"images", "top1_agreement" (%), "kl" (nats)}`` of ``q_model`` against ``fp_model`` on ``images``."""
    if images.shape[0] == 0:
        raise ValueError("fidelity needs at least one image")
    hits, kl = 0, 0.0
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size].to(device)
        lp = F.log_softmax(fp_model(x).double().cpu(), dim=-1)
        lq = F.log_softmax(q_model(x).double().cpu(), dim=-1)
        hits += int((lp.argmax(-1) == lq.argmax(-1)).sum())
        kl += float((lp.exp() * (lp - lq)).sum())
    n = images.shape[0]
    return {"images": n, "top1_agreement": 100.0 * hits / n, "kl": kl / n}


def folder_tail(folder: D.ImageFolder, transform, size: int, skip: int, seed: int) -> Tensor:
    """Up to ``size`` decodable images of ``folder`` among those after the first ``skip`` of the seeded order
    :func:`calib.data.subset_order` (the calibration draws from its head), taken from the end."""
    order = D.subset_order(len(folder), seed)[skip:]
    xs = []
    for i in reversed(order):
        if len(xs) == size:
            break
        im = D.load_rgb(folder.items[i][0])
        if im is not None:
            xs.append(transform(im))
    return torch.stack(xs) if xs else torch.empty(0)


def synthesized(fp_model: nn.Module, transform, size: int, steps: int, seed: int, progress: bool = False,
                synthesis: str = "lowbit", prior: str = "smooth") -> Tensor:
    """``size`` images made like the data-free calibration set's hardest batch (random target classes, soft targets
    0.6 / 0.4 on two classes: near decision boundaries, where quantization flips predictions; easy synthesized images
    are agreed on almost always), 8-bit RGB then ``transform`` as the calibration reads its PNGs, with seeds the
    calibration synthesis does not use; a mixture prior alternates its priors over batches of ``batch_size /
    parts`` images, so the set holds each kind as the calibration set does."""
    import numpy as np
    from PIL import Image

    cfg = InvertConfig(steps=steps, synthesis=synthesis, prior=prior)
    labels = torch.randint(int(fp_model.num_classes), (size,),
                           generator=torch.Generator().manual_seed(seed * 100003 + SYNTH_SEED))
    step = cfg.batch_size // len(MIXTURES.get(prior, (prior,)))
    out = []
    for i, b in enumerate(range(0, size, step)):
        imgs = invert.synthesize(fp_model, labels[b:b + step], cfg.for_batch(i), difficulty=1.0,
                          seed=seed * 100003 + SYNTH_SEED + b, progress=progress)
        for img in imgs:
            out.append(transform(Image.fromarray((img.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8))))
    return torch.stack(out)


def held_out(fp_model: nn.Module, args: argparse.Namespace, calib_folder: Optional[D.ImageFolder],
             val_folder: Optional[D.ImageFolder], transform) -> Tuple[Tensor, str]:
    """``(images, source)`` for :func:`agreement` as ``quant.run`` picks them (module docstring); ``args`` gives
    ``fidelity_size`` (None: 256 from a folder, 64 synthesized, at most ``calib_size``), ``seed``, ``calib_size``,
    ``invert_steps``, ``synthesis``, ``invert_prior``, ``no_progress``."""
    size = getattr(args, "fidelity_size", None)
    if val_folder is not None:
        return D.load_subset(val_folder, transform, size or FOLDER_SIZE, args.seed, "--val")[0], "val"
    if calib_folder is not None and args.data != "invert":
        x = folder_tail(calib_folder, transform, size or FOLDER_SIZE, args.calib_size + len(calib_folder.skipped),
                        args.seed)
        if x.shape[0]:
            return x, "data"
    n = size or min(SYNTH_SIZE, args.calib_size)
    return synthesized(fp_model, transform, n, args.invert_steps, args.seed, progress=not args.no_progress,
                       synthesis=getattr(args, "synthesis", "lowbit"),
                       prior=getattr(args, "invert_prior", "smooth")), \
        "synthesized"


def measure(fp_model: nn.Module, q_model: nn.Module, args: argparse.Namespace, calib_folder, val_folder, transform,
            device) -> Optional[dict]:
    """``quant.run``'s fidelity entry: :func:`agreement` on :func:`held_out` images plus ``source``; None when
    ``args.fidelity_size == 0``."""
    if getattr(args, "fidelity_size", None) == 0:
        return None
    images, source = held_out(fp_model, args, calib_folder, val_folder, transform)
    return {"source": source, **agreement(fp_model, q_model, images, args.batch_size, device)}


def table_row(fid: Optional[dict]) -> Tuple[str, str]:
    """The report table's row for :func:`measure`'s result."""
    if fid is None:
        return "agreement with FP / KL", "-"
    return ("agreement with FP / KL", f"{fid['top1_agreement']:.2f}% / {fid['kl']:.4f} "
                                      f"({fid['images']} held-out {fid['source']} images)")
