"""Train the demo ViT on CIFAR-10: ``python -m bench.train_demo --data ../shared/data/cifar10``.

AdamW, linear warm-up then cosine decay, label smoothing, random-crop (pad 4) + horizontal-flip augmentation.
Resumable: a checkpoint is written atomically after every epoch into ``--work`` and picked up by ``--resume``.
The result (fp16 weights + a JSON card with recipe, time and test accuracy) goes to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from calib.data import subset_order
from lowbit.zoo.cifar import cache_dir, load_split, normalize
from lowbit.zoo.demo import WEIGHTS, DemoConfig, build_demo_model

SUBSET = 500


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop with 4-pixel zero padding and random horizontal flip on uint8 ``[B, 3, 32, 32]``."""
    b, _, h, w = x.shape
    xp = F.pad(x, (4, 4, 4, 4))
    i = torch.randint(0, 9, (b,), generator=gen)
    j = torch.randint(0, 9, (b,), generator=gen)
    out = torch.stack([xp[n, :, i[n]: i[n] + h, j[n]: j[n] + w] for n in range(b)])
    flip = torch.rand(b, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


@torch.no_grad()
def evaluate(model, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    correct = 0
    for k in range(0, len(x), batch):
        correct += int((model(normalize(x[k: k + batch])).argmax(-1) == y[k: k + batch]).sum())
    return correct / len(x)


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/cifar10", help="folder with train/ and test/ ImageFolders")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--warmup-epochs", type=float, default=2.0)
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--limit", type=int, default=0, help="use a random subset of N training images (smoke runs)")
    ap.add_argument("--work", default=str(cache_dir() / "train_demo"), help="checkpoint folder")
    ap.add_argument("--resume", action="store_true", help="continue from the checkpoint in --work")
    ap.add_argument("--out", default=str(WEIGHTS), help="where to write the fp16 weights (.safetensors)")
    ap.add_argument("--note", default="", help="free text recorded in the card (e.g. a schedule change on resume)")
    ap.add_argument("--export-only", action="store_true",
                    help="write --out from the checkpoint in --work as it stands (card marks unfinished training)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    xtr, ytr, classes = load_split(args.data, "train")
    xte, yte, _ = load_split(args.data, "test")
    if args.limit:
        keep = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(args.seed))[: args.limit]
        xtr, ytr = xtr[keep], ytr[keep]
    torch.manual_seed(args.seed)
    cfg = DemoConfig()
    model = build_demo_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = len(xtr) // args.batch_size
    total = steps_per_epoch * args.epochs
    warmup = int(args.warmup_epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(args.seed)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "last.pt"
    epoch0, elapsed, history = 0, 0.0, []
    if args.resume and ckpt.exists():
        st = torch.load(ckpt, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        gen.set_state(st["gen"])
        epoch0, elapsed, history = st["epoch"], st["elapsed"], st["history"]
        print(f"resumed from {ckpt} at epoch {epoch0}")
    if args.export_only:
        if not ckpt.exists():
            raise SystemExit(f"error: no checkpoint at {ckpt}; train first")
        if not args.resume:
            st = torch.load(ckpt, weights_only=False)
            model.load_state_dict(st["model"])
            epoch0, elapsed, history = st["epoch"], st["elapsed"], st["history"]
        acc = evaluate(model, xte, yte)
        write_result(model, cfg, args, acc, subset_accuracy(model, xte, yte), elapsed, history, len(xtr),
                     Path(args.out), epochs_done=epoch0)
        print(f"test top-1 {acc * 100:.2f}% after {epoch0}/{args.epochs} epochs; wrote {args.out}")
        return

    for epoch in range(epoch0, args.epochs):
        model.train()
        t0 = time.time()
        perm = torch.randperm(len(xtr), generator=gen)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", unit="step")
        for it in bar:
            step = epoch * steps_per_epoch + it
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, warmup, args.lr)
            idx = perm[it * args.batch_size: (it + 1) * args.batch_size]
            xb = normalize(augment(xtr[idx], gen))
            loss = F.cross_entropy(model(xb), ytr[idx], label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if it % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
        elapsed += time.time() - t0
        entry = {"epoch": epoch + 1, "loss": round(loss.item(), 4), "time_s": round(elapsed, 1)}
        if (epoch + 1) % 5 == 0 or epoch + 1 == args.epochs:
            entry["test_top1"] = evaluate(model, xte, yte)
        history.append(entry)
        print(json.dumps(entry), flush=True)
        tmp = work / "last.tmp"
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                    "epoch": epoch + 1, "elapsed": elapsed, "history": history}, tmp)
        os.replace(tmp, ckpt)

    acc = evaluate(model, xte, yte)
    write_result(model, cfg, args, acc, subset_accuracy(model, xte, yte), elapsed, history, len(xtr), Path(args.out))
    print(f"test top-1 {acc * 100:.2f}% after {args.epochs} epochs, {elapsed / 60:.1f} min; wrote {args.out}")


def subset_accuracy(model, x: torch.Tensor, y: torch.Tensor, n: int = SUBSET) -> float:
    """Top-1 on the fixed ``n``-image subset that ``quant.run --val-size n --seed 0`` evaluates."""

    idx = torch.tensor(subset_order(len(x), 0)[:n])
    return evaluate(model, x[idx], y[idx])


def write_result(model, cfg, args, acc, acc_subset, elapsed, history, n_train, out: Path,
                 epochs_done: "int | None" = None):

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, out)
    done = args.epochs if epochs_done is None else epochs_done
    card = {"config": asdict(cfg), "test_top1": acc, f"test{SUBSET}_top1": acc_subset, "epochs_done": done,
            "finished": done >= args.epochs,
            "train_images": n_train, "train_time_min": round(elapsed / 60, 1),
            "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "recipe": {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "weight_decay", "warmup_epochs",
                                                     "label_smoothing", "seed")} | {
                "optimizer": "AdamW", "schedule": "linear warm-up then cosine", "augment": "crop pad 4 + hflip"},
            "history": history}
    if args.note:
        card["note"] = args.note
    card_path = out.with_suffix(".json")
    tmp = card_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(card, indent=1))
    os.replace(tmp, card_path)


if __name__ == "__main__":
    main()
