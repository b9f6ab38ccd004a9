"""Classifier-only data-free calibration: synthesize images by optimising noise through the frozen FP model.

For a batch of target classes ``y`` the pixels ``x`` (in the model's normalised space) minimise::

    L = CE(f(jitter(x)), y_soft) - w_ps * H  + w_tv * TV(x) + w_l2 * |x|^2

- ``H`` rewards diverse patch similarities (PSAQ-ViT's idea), in one of two forms (``synthesis``):

  * ``"psaq"``, PSAQ-ViT's patch-similarity entropy as published: for each block, the attention output before
    ``proj`` (``softmax(QK^T) V``) averaged over heads, prefix (class/distillation) tokens dropped (Swin: each
    window's tokens); the cosine similarities of all ordered token pairs ``(i, j)`` (``i = j`` included) of each
    image; their normalised Gaussian KDE ``f(t) = 1/n sum_i exp(-(t - v_i)^2 / 2h^2) / sqrt(2 pi h^2)``, ``h =
    0.01``, at 10 points evenly spaced over the batch's [min, max] of the similarities (a constant of the step); the
    differential entropy ``-int (f + 1e-4) log(f + 1e-4) dt`` by the trapezoid rule; mean over images, **sum** over
    blocks; weight ``w_ps = 1`` against CE.
  * ``"lowbit"`` (the package's variant, the default): each block's residual output with all tokens, at most 2,048
    strided token pairs, an unnormalised Gaussian kernel (``h = 0.05``) on 64 fixed points in [-1, 1] made a
    discrete distribution, its Shannon entropy; mean over blocks; ``w_ps = 0.1``.
- ``y_soft`` follows DFQ-ViT's easy-to-hard order: batch ``b`` of ``B`` has difficulty ``d = b / (B - 1)`` and
  puts ``1 - d * hard_mix`` on the target and the rest on a random other class, so the first batches are confident
  easy samples and the later ones lie closer to decision boundaries.
- ``jitter`` is a random roll of up to ``jitter`` pixels and a random flip (DeepInversion), then, when set, a
  random resized crop of ``a ~ U[crop_scale, 1]`` of the area and a colour shift ``(x + u) * exp(v)``, ``u, v ~
  U[-color_shift, color_shift]`` per channel (Plug-In Inversion's augmentations); ``TV`` is the mean squared
  difference of neighbouring pixels. ``x`` starts as ``init_std`` times Gaussian noise (normalised units) and is
  clamped to the valid pixel range after each Adam step.
- The image ``prior`` sets ``w_tv``, ``init_std``, ``crop_scale`` and ``color_shift`` (:data:`PRIORS`); ``mixed``
  alternates ``smooth`` and ``noise`` batch by batch, so one set holds both kinds for the same synthesis time.

``python -m calib.invert --model demo --per-class 16 --out DIR`` writes an ImageFolder (``DIR/<class index>/*.png``,
class folders zero-padded so sorted order = class index), each class folder atomically; an interrupted run resumes
at the first unfinished batch, and finished classes are skipped when run again.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from lowbit.errors import UserError
from lowbit.models import load_model

SYNTHESES = ("lowbit", "psaq")


PRIORS = {"smooth": {"w_tv": 1.0, "init_std": 0.2, "crop_scale": 0.3, "color_shift": 0.2},
          "noise": {"w_tv": 0.05, "init_std": 1.0, "crop_scale": 1.0, "color_shift": 0.0}}
MIXTURES = {"mixed": ("smooth", "noise")}
PRIOR_NAMES = (*PRIORS, *MIXTURES)


@dataclass
class InvertConfig:
    """``w_ps``, ``kde_bandwidth``, ``kde_points``: None takes the ``synthesis``'s own (psaq: 1, 0.01, 10; lowbit:
    0.1, 0.05, 64). ``w_tv``, ``init_std``, ``crop_scale``, ``color_shift``: None takes the image ``prior``'s
    (:data:`PRIORS`): ``smooth`` (the default: strong TV, faint starting noise, random resized crops and colour
    shifts), ``noise`` (weak TV from unit noise, roll and flip only: the package's first recipe, whose images are
    high-frequency noise to the eye) or a mixture (:data:`MIXTURES`; ``mixed``: batch ``b`` of
    :func:`write_image_folder` takes ``("smooth", "noise")[b % 2]``, see :meth:`for_batch`)."""

    steps: int = 200
    lr: float = 0.1
    batch_size: int = 64
    w_ps: Optional[float] = None
    w_tv: Optional[float] = None
    w_l2: float = 1e-4
    jitter: int = 2
    hard_mix: float = 0.4
    kde_bandwidth: Optional[float] = None
    kde_points: Optional[int] = None
    synthesis: str = "lowbit"
    init_std: Optional[float] = None
    crop_scale: Optional[float] = None
    color_shift: Optional[float] = None
    prior: str = "smooth"

    def __post_init__(self):
        if self.synthesis not in SYNTHESES:
            raise ValueError(f"unknown synthesis {self.synthesis!r}; use one of {', '.join(SYNTHESES)}")
        if self.prior not in PRIOR_NAMES:
            raise ValueError(f"unknown image prior {self.prior!r}; use one of {', '.join(PRIOR_NAMES)}")
        for name, v in PRIORS.get(self.prior, {}).items():
            if getattr(self, name) is None:
                setattr(self, name, v)
        own = {"psaq": (1.0, 0.01, 10), "lowbit": (0.1, 0.05, 64)}[self.synthesis]
        for name, v in zip(("w_ps", "kde_bandwidth", "kde_points"), own):
            if getattr(self, name) is None:
                setattr(self, name, v)

    def for_batch(self, b: int) -> "InvertConfig":
        """The config of batch ``b``: a mixture's ``b % len``-th prior (fields set explicitly are kept), else self."""
        if self.prior not in MIXTURES:
            return self
        parts = MIXTURES[self.prior]
        return replace(self, prior=parts[b % len(parts)])


def model_io(model) -> dict:
    """``input_size``, ``mean``, ``std`` of a timm classifier (its pretrained_cfg)."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    size = getattr(getattr(model, "patch_embed", None), "img_size", None) or cfg["input_size"][-2:]
    return {"input_size": (3, int(size[0]), int(size[1])), "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"])}


def normalisation(model, device=None):
    """``(mean, std)`` of the model's input normalisation, ``[1, 3, 1, 1]`` each on ``device``: pixel ``p`` in
    [0, 1] enters the model as ``(p - mean) / std``."""
    io = model_io(model)
    return tuple(torch.tensor(io[k], device=device).view(1, 3, 1, 1) for k in ("mean", "std"))


def _block_tokens(model) -> List[torch.nn.Module]:
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        layers = getattr(model, "layers", None)
        if layers is None:
            raise ValueError(f"{type(model).__name__} has neither .blocks (ViT/DeiT) nor .layers (Swin)")
        blocks = [b for layer in layers for b in layer.blocks]
    return list(blocks)


class _GaussianKernelMean(torch.autograd.Function):
    """``f[b, k] = mean_j exp(-z^2 / 2)``, ``z = (v[b, j] - grid[k]) / h``, with the analytic gradient
    ``df/dv[b, j] = -sum_k g[b, k] exp(-z^2 / 2) z / (h n)``, keeping only the kernel values for the backward."""

    @staticmethod
    def forward(ctx, v, grid, h):
        e = torch.exp(((v[:, :, None] - grid) * (1.0 / h)).square_().mul_(-0.5))
        ctx.save_for_backward(v, grid, e)
        ctx.h = h
        return e.mean(1)

    @staticmethod
    def backward(ctx, g):
        v, grid, e = ctx.saved_tensors
        z = (v[:, :, None] - grid) * (1.0 / ctx.h)
        return -torch.einsum("bjk,bk->bj", e * z, g) / (ctx.h * v.shape[1]), None, None


def patch_similarity_entropy(tokens: torch.Tensor, bandwidth: float, points: int) -> torch.Tensor:
    """Mean over images of the entropy of the density of patch-token cosine similarities. ``tokens [B, N, D]``."""
    t = F.normalize(tokens.float().flatten(1, -2), dim=-1)
    sim = t @ t.transpose(1, 2)
    n = sim.shape[-1]
    iu = torch.triu_indices(n, n, offset=1, device=sim.device)
    v = sim[:, iu[0], iu[1]]
    if v.shape[1] > 2048:
        v = v[:, torch.linspace(0, v.shape[1] - 1, 2048, device=v.device).long()]
    grid = torch.linspace(-1, 1, points, device=v.device)
    dens = _GaussianKernelMean.apply(v, grid, bandwidth)
    p = dens / dens.sum(-1, keepdim=True).clamp_min(1e-12)
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()


def kde_differential_entropy(v: torch.Tensor, lo: float, hi: float, bandwidth: float = 0.01,
                             points: int = 10) -> torch.Tensor:
    """Per row of ``v [B, n]``: ``-int (f + 1e-4) log(f + 1e-4) dt`` over ``[lo, hi]`` by the trapezoid rule on
    ``points`` evenly spaced ``t``, ``f`` the normalised Gaussian KDE (bandwidth ``h``) of the row's values. ``[B]``."""
    t = torch.linspace(lo, hi, points, device=v.device, dtype=torch.float32)
    f = torch.exp(-0.5 * ((t[None, :, None] - v.float()[:, None, :]) / bandwidth) ** 2).mean(-1)
    f = f / math.sqrt(2 * math.pi * bandwidth ** 2) + 1e-4
    return torch.trapezoid(-f * torch.log(f), t, dim=-1)


def psaq_patch_similarity_entropy(attn_out: torch.Tensor, heads: int, prefix: int, bandwidth: float = 0.01,
                                  points: int = 10, images: Optional[int] = None) -> torch.Tensor:
    """PSAQ-ViT's entropy of one block: ``attn_out [B, N, H * d]`` (the input of ``attn.proj``), averaged over the
    ``heads``, ``prefix`` leading tokens dropped, cosine similarities of all ``N'^2`` token pairs per row, their
    :func:`kde_differential_entropy` over the batch's [min, max]; mean over images.

    ``images``: for Swin, whose rows are the ``B = images * nW`` windows (each image's windows consecutive), the
    similarities of all windows of an image form one density estimate, as the authors' ``generate_data.py`` does
    (``sims.view(batch_size, -1)`` before its KDE)."""
    b, n, c = attn_out.shape
    u = F.normalize(attn_out.float().reshape(b, n, heads, c // heads).mean(2)[:, prefix:], dim=-1)
    sims = (u @ u.transpose(1, 2)).reshape(images or b, -1)
    lo, hi = float(sims.detach().min()), float(sims.detach().max())
    return kde_differential_entropy(sims, lo, hi, bandwidth, points).mean()


def _prefix_tokens(model) -> int:
    return int(getattr(model, "num_prefix_tokens", 0) or 0) if getattr(model, "blocks", None) is not None else 0


def soft_targets(y: torch.Tensor, num_classes: int, difficulty: float, hard_mix: float,
                 gen: torch.Generator) -> torch.Tensor:
    """``1 - difficulty * hard_mix`` on ``y``, the rest on a random other class."""
    t = torch.zeros(len(y), num_classes)
    other = (y + torch.randint(1, num_classes, (len(y),), generator=gen)) % num_classes
    a = difficulty * hard_mix
    t[torch.arange(len(y)), y] = 1 - a
    t[torch.arange(len(y)), other] += a
    return t


def synthesize(model, labels: torch.Tensor, cfg: InvertConfig = InvertConfig(), difficulty: float = 0.0,
               seed: int = 0, progress: bool = True) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in [0, 1] for target ``labels``, optimised through the frozen ``model``; ``cfg`` has
    one prior (a mixture's batch config comes from :meth:`InvertConfig.for_batch`)."""
    if cfg.prior in MIXTURES:
        raise ValueError(f"prior {cfg.prior!r} is a mixture; pass cfg.for_batch(b) for batch b")
    _, h, w = model_io(model)["input_size"]
    dev = next(model.parameters()).device
    mean, std = normalisation(model, dev)
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    feats: List[torch.Tensor] = []
    if cfg.synthesis == "psaq":
        blocks = _block_tokens(model)
        heads = [b.attn.num_heads for b in blocks]
        # the authors drop one leading token of every attention output, a ViT's class token and, in their Swin
        # code too, the first token of each window (generate_data.py: attention.mean(dim=1)[:, 1:, :])
        prefix = _prefix_tokens(model) if getattr(model, "blocks", None) is not None else 1
        hooks = [b.attn.proj.register_forward_pre_hook(lambda m, i: feats.append(i[0])) for b in blocks]

        def diversity():
            return torch.stack([psaq_patch_similarity_entropy(f, h, prefix, cfg.kde_bandwidth, cfg.kde_points,
                                                              images=len(labels))
                                for f, h in zip(feats, heads)]).sum()
    else:
        hooks = [b.register_forward_hook(lambda m, i, o: feats.append(o)) for b in _block_tokens(model)]

        def diversity():
            return torch.stack([patch_similarity_entropy(f, cfg.kde_bandwidth, cfg.kde_points)
                                for f in feats]).mean()
    num_classes = model.num_classes
    targets = soft_targets(labels.cpu(), num_classes, difficulty, cfg.hard_mix, gen).to(dev)
    x = (cfg.init_std * torch.randn(len(labels), 3, h, w, generator=gen)).to(dev).requires_grad_()
    opt = torch.optim.Adam([x], lr=cfg.lr, betas=(0.5, 0.9))
    lo, hi = (0 - mean) / std, (1 - mean) / std
    try:
        bar = tqdm(range(cfg.steps), desc="synthesizing", unit="step", disable=not progress, leave=False)
        for step in bar:
            lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
            opt.param_groups[0]["lr"] = lr
            dx, dy = (int(v) for v in torch.randint(-cfg.jitter, cfg.jitter + 1, (2,), generator=gen))
            xi = torch.roll(x, shifts=(dx, dy), dims=(2, 3))
            if bool(torch.rand(1, generator=gen) < 0.5):
                xi = xi.flip(3)
            if cfg.crop_scale < 1:
                xi = _random_resized_crop(xi, cfg.crop_scale, gen)
            if cfg.color_shift > 0:
                u = (torch.rand(2, 1, 3, 1, 1, generator=gen) * 2 - 1).to(dev) * cfg.color_shift
                xi = (xi + u[0]) * torch.exp(u[1])
            feats.clear()
            logits = model(xi)
            ce = torch.sum(-targets * F.log_softmax(logits, -1), -1).mean()
            ps = diversity()
            tv = (x[:, :, 1:] - x[:, :, :-1]).pow(2).mean() + (x[:, :, :, 1:] - x[:, :, :, :-1]).pow(2).mean()
            loss = ce - cfg.w_ps * ps + cfg.w_tv * tv + cfg.w_l2 * x.pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                x.copy_(torch.maximum(torch.minimum(x, hi), lo))
            if step % 10 == 0:
                bar.set_postfix(ce=f"{ce.item():.3f}", ps=f"{ps.item():.2f}")
    finally:
        for hk in hooks:
            hk.remove()
        model.train(was_training)
    return (x.detach() * std + mean).clamp(0, 1).cpu()


def _random_resized_crop(x: torch.Tensor, min_scale: float, gen: torch.Generator) -> torch.Tensor:
    """One random crop of side ``sqrt(a)`` times the image's, ``a ~ U[min_scale, 1]`` of the area, resized back."""
    h, w = x.shape[-2:]
    f = math.sqrt(float(torch.empty(1).uniform_(min_scale, 1.0, generator=gen)))
    ch, cw = max(1, round(h * f)), max(1, round(w * f))
    i = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
    j = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
    return F.interpolate(x[:, :, i:i + ch, j:j + cw], size=(h, w), mode="bilinear", align_corners=False)


def _save_png(img: torch.Tensor, path: Path) -> None:
    arr = (img.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    Image.fromarray(arr).save(path)


def class_dir_name(c: int, num_classes: int) -> str:
    return f"{c:0{max(4, len(str(num_classes - 1)))}d}"


def write_image_folder(model, out: "str | Path", per_class: int, classes: Optional[Sequence[int]] = None,
                       cfg: InvertConfig = InvertConfig(), seed: int = 0, progress: bool = True) -> Path:
    """Synthesize ``per_class`` images for each class into ``out/<class index>/<batch>-<slot>.png``, resumably.

    The images are made in batches of ``cfg.batch_size`` in easy-to-hard order (a class's images spread over the
    batches); each batch's images go into their classes' ``.tmp-*`` folders and the batch is then recorded in
    ``out/.progress.json`` (atomically), so an interrupted run continues at the first unrecorded batch and makes
    the same images; a class folder appears (its ``.tmp-*`` renamed) once all its images exist, and class folders
    already present are skipped. Memory holds one batch whatever the image count. The synthesis seconds, summed
    over resumed runs, are kept in the progress file and end in ``out/.synthesis.json`` (``seconds``; ``partial``
    when some batches were made by a run that did not record its time).
    """
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    nc = model.num_classes
    classes = list(range(nc)) if classes is None else list(classes)
    bad = [c for c in classes if not 0 <= c < nc]
    if bad:
        raise ValueError(f"class indices {bad[:5]} outside [0, {nc})")
    todo = [c for c in classes if not (out / class_dir_name(c, nc)).is_dir()]
    progress_file = out / ".progress.json"
    if not todo:
        progress_file.unlink(missing_ok=True)
        return out
    plan = {"classes": todo, "per_class": per_class, "seed": seed, "config": asdict(cfg), "done": [], "seconds": 0.0,
            "untimed": 0}
    if progress_file.is_file():
        old = json.loads(progress_file.read_text())
        if all(old.get(k) == plan[k] for k in ("per_class", "seed", "config")) and set(todo) <= set(old["classes"]):
            plan["classes"], plan["done"] = old["classes"], old["done"]
            plan["seconds"] = old.get("seconds", 0.0)
            plan["untimed"] = old.get("untimed", 0 if "seconds" in old else len(old["done"]))
    labels = torch.tensor([c for c in plan["classes"] for _ in range(per_class)], dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    labels = labels[order]
    nb = math.ceil(len(labels) / cfg.batch_size)
    batches = [labels[b * cfg.batch_size: (b + 1) * cfg.batch_size].tolist() for b in range(nb)]
    done = set(plan["done"])
    todo_set = set(todo)
    left = Counter(c for b in range(nb) if b not in done for c in batches[b] if c in todo_set)
    for c in todo:
        tmp = out / f".tmp-{class_dir_name(c, nc)}"
        if not done:
            shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(exist_ok=True)
        if not left[c]:  # all its batches were recorded before an interruption cut the rename
            os.replace(tmp, out / class_dir_name(c, nc))
    bar = tqdm(range(nb), desc="data-free batches", unit="batch", disable=not progress, initial=len(done))
    for b in range(nb):
        if b in done:
            continue
        t0 = time.perf_counter()
        lab = torch.tensor(batches[b], dtype=torch.long)
        imgs = synthesize(model, lab, cfg.for_batch(b), difficulty=b / max(1, nb - 1), seed=seed * 100003 + b,
                          progress=progress)  # a per-step bar under the batch bar: a batch takes minutes on a CPU
        for k, (img, c) in enumerate(zip(imgs, batches[b])):
            if c in todo_set:
                _save_png(img, out / f".tmp-{class_dir_name(c, nc)}" / f"{b:05d}-{k:03d}.png")
        plan["done"].append(b)
        plan["seconds"] += time.perf_counter() - t0
        _write_json_atomic(progress_file, plan)
        for c in set(batches[b]) & todo_set:
            left[c] -= batches[b].count(c)
            if left[c] == 0:
                os.replace(out / f".tmp-{class_dir_name(c, nc)}", out / class_dir_name(c, nc))
        bar.update(1)
    bar.close()
    _write_json_atomic(out / ".synthesis.json", {"seconds": plan["seconds"], "batches": nb,
                                                 "partial": plan["untimed"] > 0})
    progress_file.unlink(missing_ok=True)
    return out


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Classifier-only data-free calibration images (ImageFolder).")
    ap.add_argument("--model", default="demo", help="model alias or timm name (see quant.run --help)")
    ap.add_argument("--checkpoint", default=None, help="local weights file instead of the hub")
    ap.add_argument("--per-class", type=int, default=16)
    ap.add_argument("--classes", default="all", help="'all' or a comma list of class indices")
    ap.add_argument("--steps", type=int, default=InvertConfig.steps)
    ap.add_argument("--batch-size", type=int, default=InvertConfig.batch_size)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--synthesis", default="lowbit", choices=SYNTHESES,
                    help="patch-diversity term: psaq (PSAQ-ViT's as published) or lowbit (the package's variant)")
    ap.add_argument("--prior", default="smooth", choices=PRIOR_NAMES,
                    help="image prior: smooth (default), noise (the first recipe) or mixed (batches alternate)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    try:
        model = load_model(args.model, args.checkpoint)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    classes = None if args.classes == "all" else [int(c) for c in args.classes.split(",")]
    cfg = InvertConfig(steps=args.steps, batch_size=args.batch_size, synthesis=args.synthesis, prior=args.prior)
    out = write_image_folder(model, args.out, args.per_class, classes, cfg, args.seed)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
