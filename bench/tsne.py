"""Figure 6 for the demo: ``python -m bench.tsne --data ../shared/data/cifar10 --out bench/``.

A t-SNE map of the model's last-block features (its pre-logits features: the last block's tokens pooled as the head
pools them, demo: token mean then the final LayerNorm) for a few classes of

- real images: ``--real-per-class`` seeded ``<data>/test`` images per class,
- data-free images: ``--free-per-class`` per class, synthesized from the FP model exactly as ``quant.run --data
  invert`` does (:func:`calib.invert.write_image_folder`, ``--invert-steps``; kept in ``--free-dir`` when given, which
  is resumed), and
- any further image folder, e.g. a diffusion pipeline's (``--images NAME=DIR``, class folders named by class index
  or in the model's class order),

one colour per source and one marker per class. t-SNE is exact (``O(N^2)``, fine for a few thousand points):
PCA to 50 dimensions, per-point Gaussian bandwidths by bisection to ``--perplexity``, Student-t map optimised with
momentum and gains, early exaggeration 12 for the first 250 iterations (van der Maaten & Hinton 2008, as
scikit-learn's ``method="exact"``), initialised from the PCA.

Writes ``<out>/tsne.png`` and ``<out>/tsne.json`` (settings, per-source model top-1 and 10-NN same-source share in
feature space, the KL divergence, and every point's source, class and coordinates), each atomically;
``python -m bench.accuracy --render-only`` then links the figure from ``ACCURACY.md``. Bad input: one ``error: ...``
line, exit status 2.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

EXAGGERATION = 12.0
EXAGGERATION_ITERS = 250
KNN = 10
MARKERS = "os^DvP*Xh<>p"


# ---------------------------------------------------------------------------------------------------- t-SNE

def pca(x: torch.Tensor, dims: int) -> torch.Tensor:
    """``x [N, F]`` centred and projected on its first ``dims`` principal axes (signs fixed: largest |coef| > 0)."""
    x = x - x.mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    v = v[:dims]
    v = v * torch.sign(v.gather(1, v.abs().argmax(1, keepdim=True)))
    return x @ v.T


def conditional_p(d2: torch.Tensor, perplexity: float, tol: float = 1e-5, steps: int = 100) -> torch.Tensor:
    """Rows ``p_{j|i} ∝ exp(-beta_i d2_ij)`` (``p_{i|i} = 0``) whose entropy is ``log(perplexity)``, ``beta_i`` by
    bisection on all rows at once."""
    n = d2.shape[0]
    d = d2 - d2.masked_fill(torch.eye(n, dtype=torch.bool), float("inf")).min(1, keepdim=True).values
    target = math.log(perplexity)
    beta = torch.ones(n, 1, dtype=d2.dtype)
    lo, hi = torch.zeros_like(beta), torch.full_like(beta, float("inf"))
    off = ~torch.eye(n, dtype=torch.bool)
    for _ in range(steps):
        p = torch.exp(-d * beta) * off
        s = p.sum(1, keepdim=True)
        h = torch.log(s) + beta * (d * p).sum(1, keepdim=True) / s
        if (h - target).abs().max() < tol:
            break
        too_flat = h > target  # entropy too high: sharpen (larger beta)
        lo = torch.where(too_flat, beta, lo)
        hi = torch.where(too_flat, hi, beta)
        beta = torch.where(torch.isinf(hi), beta * 2, (lo + hi) / 2)
    p = torch.exp(-d * beta) * off
    return p / p.sum(1, keepdim=True)


def tsne(x: torch.Tensor, perplexity: float = 30.0, iters: int = 1000, pca_dims: int = 50,
         progress: bool = True) -> Tuple[torch.Tensor, float]:
    """Exact t-SNE of ``x [N, F]``: (``Y [N, 2]``, final KL(P || Q)). Deterministic (PCA initialisation)."""
    from tqdm import tqdm

    x = x.double()
    n = x.shape[0]
    if not 1 <= perplexity < n - 1:
        raise ValueError(f"perplexity {perplexity} must be in [1, N - 1) for N = {n} points")
    if x.shape[1] > pca_dims:
        x = pca(x, pca_dims)
    p = conditional_p(torch.cdist(x, x).pow(2), perplexity)
    p = ((p + p.T) / (2 * n)).clamp_min(1e-12)
    y = pca(x, 2)
    y = y / y[:, 0].std() * 1e-4
    lr = max(n / EXAGGERATION / 4, 50.0)
    update, gains = torch.zeros_like(y), torch.ones_like(y)
    eye = torch.eye(n, dtype=torch.bool)
    kl = float("nan")
    for it in tqdm(range(iters), desc="t-SNE", unit="it", disable=not progress, leave=False):
        exaggerated = it < EXAGGERATION_ITERS
        sq = y.pow(2).sum(1, keepdim=True)
        num = (1.0 / (1.0 + (sq + sq.T - 2.0 * y @ y.T).clamp_min(0.0))).masked_fill(eye, 0.0)
        q = (num / num.sum()).clamp_min(1e-12)
        pq = ((EXAGGERATION if exaggerated else 1.0) * p - q) * num
        grad = 4.0 * (pq.sum(1, keepdim=True) * y - pq @ y)
        gains = torch.where(torch.sign(grad) != torch.sign(update), gains + 0.2, gains * 0.8).clamp_min(0.01)
        update = (0.5 if exaggerated else 0.8) * update - lr * gains * grad
        y = y + update
        if it == iters - 1 or it % 50 == 0:
            kl = float((p * torch.log(p / q)).sum())
    return y.float(), kl


# ------------------------------------------------------------------------------------------- data and features

def class_labels(folder) -> List[int]:
    """Class index of each class folder of a :class:`calib.data.ImageFolder`: its name when all names are digits
    (``calib.invert``'s zero-padded folders), else its sorted position."""
    if folder.classes and all(c.isdigit() for c in folder.classes):
        return [int(c) for c in folder.classes]
    return list(range(len(folder.classes)))


def sample_images(root: str, classes: Sequence[int], per_class: int, transform, seed: int,
                  what: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Up to ``per_class`` seeded decodable images of each of ``classes`` from the ImageFolder ``root``."""
    from calib import data as D
    from lowbit.errors import UserError

    folder = D.scan(root, what)
    labels = class_labels(folder)
    by_class: Dict[int, List[str]] = {c: [] for c in classes}
    for path, ci in folder.items:
        if ci >= 0 and labels[ci] in by_class:
            by_class[labels[ci]].append(path)
    xs, ys = [], []
    for c in classes:
        paths = by_class[c]
        if not paths:
            raise UserError(f"{what} {root!r} has no images of class {c}; pass --classes it holds")
        order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed * 1009 + c)).tolist()
        got = 0
        for i in order:
            im = D.load_rgb(paths[i])
            if im is None:
                continue
            xs.append(transform(im))
            ys.append(c)
            got += 1
            if got == per_class:
                break
    return torch.stack(xs), torch.tensor(ys)


@torch.no_grad()
def features(model, x: torch.Tensor, batch_size: int = 256, progress: bool = False,
             desc: str = "features") -> Tuple[torch.Tensor, torch.Tensor]:
    """(pre-logits features ``[N, F]``, predicted class ``[N]``) of normalised images ``x``."""
    from tqdm import tqdm

    feats, preds = [], []
    for i in tqdm(range(0, len(x), batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
        tokens = model.forward_features(x[i:i + batch_size])
        feats.append(model.forward_head(tokens, pre_logits=True))
        preds.append(model.forward_head(tokens).argmax(-1))
    return torch.cat(feats), torch.cat(preds)


def same_source_share(x: torch.Tensor, source: torch.Tensor, k: int = KNN) -> torch.Tensor:
    """Per point: the fraction of its ``k`` nearest neighbours (Euclidean, itself excluded) from its own source."""
    d = torch.cdist(x.double(), x.double()).fill_diagonal_(float("inf"))
    nn = d.topk(min(k, len(x) - 1), largest=False).indices
    return (source[nn] == source[:, None]).double().mean(1)


# ----------------------------------------------------------------------------------------------------- outputs

def _atomic_write(path: str, write) -> None:
    """``write(tmp_path)`` then rename onto ``path`` (the temp file is removed on failure)."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=os.path.splitext(path)[1], dir=d)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 -> what a plain open() would give
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def plot(result: dict, path: str) -> None:
    """The scatter plot: colour per source, marker per class."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    sources = [s["name"] for s in result["sources"]]
    classes = result["settings"]["classes"]
    names = result["settings"]["class_names"]
    colours = plt.get_cmap("tab10").colors
    pts = result["points"]
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    for si, _ in enumerate(sources):
        for ci, c in enumerate(classes):
            xy = [(p["x"], p["y"]) for p in pts if p["source"] == si and p["class"] == c]
            if xy:
                ax.scatter([a for a, _ in xy], [b for _, b in xy], s=14 if si == 0 else 22, alpha=0.55 if si == 0
                           else 0.85, color=colours[si % 10], marker=MARKERS[ci % len(MARKERS)], linewidths=0)
    handles = [Line2D([], [], ls="", marker="o", color=colours[si % 10], label=s) for si, s in enumerate(sources)]
    handles += [Line2D([], [], ls="", marker=MARKERS[ci % len(MARKERS)], color="0.35", label=names[ci])
                for ci in range(len(classes))]
    ax.legend(handles=handles, loc="best", fontsize=8, framealpha=0.8)
    st = result["settings"]
    ax.set_title(f"{st['model']}: t-SNE of last-block features (perplexity {st['perplexity']:g})", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------- CLI

def _images_arg(v: str) -> Tuple[str, str]:
    name, sep, path = v.partition("=")
    if not sep or not name.strip() or not path:
        raise argparse.ArgumentTypeError(f"--images takes NAME=DIR, got {v!r}")
    return name.strip(), path


def build_parser() -> argparse.ArgumentParser:
    from calib.invert import PRIOR_NAMES
    p = argparse.ArgumentParser(prog="python -m bench.tsne",
                                description="t-SNE of a model's last-block features on real vs data-free images "
                                            "(the paper's Figure 6): writes <out>/tsne.png and <out>/tsne.json.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=None, help="real images: a CIFAR-10 root holding test/, or an ImageFolder")
    p.add_argument("--out", default="bench", help="folder of tsne.png and tsne.json")
    p.add_argument("--model", default="demo", help="model alias or timm name (as quant.run --model)")
    p.add_argument("--checkpoint", default=None, help="local weights instead of the shipped/hub ones")
    p.add_argument("--classes", default="0,3,6,8", help="comma list of class indices")
    p.add_argument("--real-per-class", type=int, default=150, help="real images per class")
    p.add_argument("--free-per-class", type=int, default=50, help="data-free images per class (0: none)")
    p.add_argument("--invert-steps", type=int, default=None,
                   help="optimisation steps per data-free batch (default: the model's quant.run default, demo 100)")
    p.add_argument("--invert-prior", default="smooth", choices=PRIOR_NAMES,
                   help="image prior of the data-free images (as quant.run --invert-prior)")
    p.add_argument("--free-dir", default=None,
                   help="keep the data-free images here (an existing folder's finished classes are reused)")
    p.add_argument("--images", type=_images_arg, action="append", default=[], metavar="NAME=DIR",
                   help="a further source, e.g. a diffusion pipeline's ImageFolder (--real-per-class per class)")
    p.add_argument("--perplexity", type=float, default=30.0)
    p.add_argument("--iters", type=int, default=1000, help="t-SNE iterations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def run(args: argparse.Namespace) -> dict:
    """Make the figure; returns the JSON record."""
    from calib.invert import InvertConfig, class_dir_name, write_image_folder
    from lowbit.errors import UserError
    from lowbit.models import eval_transform, load_model, resolve

    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    for flag, v, lo in (("--real-per-class", args.real_per_class, 1), ("--free-per-class", args.free_per_class, 0),
                        ("--iters", args.iters, 1)):
        if v < lo:
            raise UserError(f"{flag} must be >= {lo}, got {v}")
    if not args.data:
        raise UserError("--data is required: a CIFAR-10 root holding test/ (e.g. --data ../shared/data/cifar10)")
    real_root = os.path.join(args.data, "test") if os.path.isdir(os.path.join(args.data, "test")) else args.data
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out!r} is a file; pass a folder")
    try:
        classes = sorted({int(c) for c in args.classes.split(",") if c.strip()})
    except ValueError:
        raise UserError(f"--classes takes comma-separated class indices, got {args.classes!r}") from None
    spec = resolve(args.model)
    model = load_model(args.model, args.checkpoint).eval()
    n_cls = int(getattr(model, "num_classes", 0) or 0)
    if not classes or not all(0 <= c < n_cls for c in classes):
        raise UserError(f"--classes {args.classes!r}: need class indices in 0..{n_cls - 1}")
    invert_steps = args.invert_steps if args.invert_steps is not None else (spec.run_defaults or {}).get(
        "invert_steps", 200)
    if invert_steps < 1:
        raise UserError(f"--invert-steps must be >= 1, got {invert_steps}")
    transform = eval_transform(model, spec)
    progress = not args.no_progress
    times = {}

    from calib import data as D
    real_folder = D.scan(real_root, "--data")
    class_names = [real_folder.classes[c] if len(real_folder.classes) == n_cls else str(c) for c in classes]
    sources: List[Tuple[str, torch.Tensor, torch.Tensor]] = []
    x, y = sample_images(real_root, classes, args.real_per_class, transform, args.seed, "--data")
    sources.append((f"real ({'/'.join(os.path.normpath(os.path.abspath(real_root)).split(os.sep)[-2:])})", x, y))
    if args.free_per_class:
        t0 = time.time()
        with tempfile.TemporaryDirectory(prefix="tsne-free-") as tmp:
            folder = args.free_dir or tmp
            torch.manual_seed(args.seed)
            write_image_folder(model, folder, args.free_per_class, classes,
                               InvertConfig(steps=invert_steps, prior=args.invert_prior), seed=args.seed,
                               progress=progress)
            for c in classes:  # a reused folder may hold more images per class than asked now
                have = len(os.listdir(os.path.join(folder, class_dir_name(c, n_cls))))
                if have < args.free_per_class:
                    raise UserError(f"--free-dir {folder!r} holds {have} images of class {c}, fewer than "
                                    f"--free-per-class {args.free_per_class}; pass another --free-dir")
            x, y = sample_images(folder, classes, args.free_per_class, transform, args.seed, "--free-dir")
        times["invert_s"] = time.time() - t0
        sources.append((f"data-free (calib.invert, {args.invert_prior} prior)", x, y))
    for name, root in args.images:
        x, y = sample_images(root, classes, args.real_per_class, transform, args.seed, f"--images {name}")
        sources.append((name, x, y))

    feats, preds, labels, src = [], [], [], []
    for si, (name, x, y) in enumerate(sources):
        f, p = features(model, x, progress=progress, desc=f"features: {name}")
        feats.append(f)
        preds.append(p)
        labels.append(y)
        src.append(torch.full((len(y),), si))
    feats, preds, labels, src = (torch.cat(t) for t in (feats, preds, labels, src))
    n = len(feats)
    if not 1 <= args.perplexity < n - 1:
        raise UserError(f"--perplexity {args.perplexity:g} must be in [1, {n - 1}) for {n} points; lower it or use "
                        f"more images")
    t0 = time.time()
    emb, kl = tsne(feats, args.perplexity, args.iters, progress=progress)
    times["tsne_s"] = time.time() - t0
    share = same_source_share(pca(feats.double(), min(50, feats.shape[1])), src)
    summary = []
    for si, (name, _, y) in enumerate(sources):
        m = src == si
        summary.append({"name": name, "images": int(m.sum()),
                        "top1": round(100 * float((preds[m] == labels[m]).double().mean()), 2),
                        "knn_same_source": round(float(share[m].mean()), 4),
                        "knn_same_source_chance": round((int(m.sum()) - 1) / (n - 1), 4)})
    result = {
        "settings": {"model": args.model, "data": real_root, "classes": classes, "class_names": class_names,
                     "real_per_class": args.real_per_class, "free_per_class": args.free_per_class,
                     "invert_steps": invert_steps if args.free_per_class else None,
                     "invert_prior": args.invert_prior if args.free_per_class else None,
                     "images": [name for name, _ in args.images], "perplexity": args.perplexity,
                     "iters": args.iters, "seed": args.seed, "knn": KNN},
        "sources": summary, "kl": round(kl, 5), "time_s": {k: round(v, 1) for k, v in times.items()},
        "generated": datetime.date.today().isoformat(),
        "points": [{"source": int(s), "class": int(c), "x": round(float(a), 4), "y": round(float(b), 4)}
                   for s, c, (a, b) in zip(src, labels, emb.tolist())],
    }
    os.makedirs(args.out, exist_ok=True)
    _atomic_write(os.path.join(args.out, "tsne.json"), lambda tmp: _write_text(tmp, json.dumps(result, indent=1)))
    plot(result, os.path.join(args.out, "tsne.png"))
    return result


def main(argv: Optional[List[str]] = None) -> int:
    from lowbit.errors import UserError

    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except UserError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    for s in result["sources"]:
        print(f"{s['name']}: {s['images']} images, model top-1 {s['top1']:.2f} %, {KNN}-NN same-source share "
              f"{s['knn_same_source']:.3f} (chance {s['knn_same_source_chance']:.3f})")
    print(f"t-SNE KL {result['kl']:.4f}; wrote {os.path.join(args.out, 'tsne.png')} and tsne.json; "
          f"`python -m bench.accuracy --out {args.out} --render-only` links it from ACCURACY.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
