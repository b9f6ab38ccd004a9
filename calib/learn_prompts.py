"""Learn K multi-mode prompt embeddings per ImageNet class for one-step SD-Turbo (paper section 3.5).

Per class, K prompts ``P [K, T=20, D]`` (D = CLIP token width): tokens 1..10 from the class description (its CLIP
token embeddings, truncated to 10; missing ones random), tokens 11..20 random; random tokens have random directions
and norms uniform in the 5-95 % quantile range of the encoder's token-embedding norms. One step of SD-Turbo turns
the K prompts and one shared noise into K images ``x_k``; the frozen classifier gives logits, pre-logits features
``f_k`` and softmax attention maps ``a_k``. Loss, minimised with Adam::

    L = w_ce  * mean_k CE(logits_k, c)
      + w_orth * mean_{k != l} <e_k, e_l>^2              e_k = EOS text embedding / ||.||
      - w_img  * Var_k(x_k) - w_feat * Var_k(f_k) - w_attn * Var_k(a_k)

``Var_k(v)`` is the per-coordinate variance over the K prompts, averaged over coordinates. A prompt whose CE stays
above ``reinit_threshold`` for ``reinit_patience`` consecutive steps is replaced by ``sum_j w_j P_j`` over the
prompts at or below the threshold (``w`` uniform random, normalised to sum 1) plus noise, and its Adam state is
dropped. The paper's loss weights did not survive text extraction; the defaults here are our choice.

Usage: ``python -m calib.learn_prompts --model vit_b --k 8 --classes all --out DIR`` (``torchrun --nproc-per-node G``
shards classes over G GPUs). One ``DIR/<wnid>.pt`` per class, written atomically; finished classes are skipped (an
existing ``DIR`` must hold only such files, learned with the same settings). Bad input (classifier or SD-Turbo not
loadable, classes, ``--out``, settings) gives one ``error: ...`` line and exit status 2 before anything is written;
offline, hub weights come from the local cache only.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from calib import sd_turbo as S
from calib.classifier import Preprocess, attention_modules, classify, load_classifier
from calib.common import (
    atomic_torch_save,
    cli_main,
    finish_distributed,
    imagenet_info,
    own_entries,
    parse_classes,
    setup_distributed,
    shard,
)
from lowbit.errors import UserError


@dataclass
class PromptConfig:
    k: int = 8
    n_tokens: int = 20
    n_desc: int = 10
    steps: int = 120
    lr: float = 1e-3
    w_ce: float = 1.0
    w_orth: float = 0.1
    w_img: float = 0.1
    w_feat: float = 0.1
    w_attn: float = 0.1
    reinit_threshold: float = 2.0
    reinit_patience: int = 10
    reinit_noise: float = 0.1
    height: int = 512
    width: int = 512
    seed: int = 0

    def __post_init__(self):
        if self.k < 1 or self.steps < 0 or self.reinit_patience < 1:
            raise ValueError(f"need k >= 1, steps >= 0, reinit_patience >= 1; got k={self.k}, steps={self.steps}, "
                             f"reinit_patience={self.reinit_patience}")
        if not 0 <= self.n_desc <= self.n_tokens:
            raise ValueError(f"need 0 <= n_desc <= n_tokens, got n_desc={self.n_desc}, n_tokens={self.n_tokens}")


def token_norm_range(sd: S.SDTurbo) -> tuple[float, float]:
    """5 % and 95 % quantiles of the text encoder's token-embedding norms."""
    norms = sd.text_encoder.get_input_embeddings().weight.detach().float().norm(dim=-1)
    return float(norms.quantile(0.05)), float(norms.quantile(0.95))


def random_tokens(n: int, dim: int, norm_range: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """``[n, dim]`` random directions with norms uniform in ``norm_range``."""
    d = F.normalize(torch.randn(n, dim, generator=generator), dim=-1)
    lo, hi = norm_range
    return d * (lo + (hi - lo) * torch.rand(n, 1, generator=generator))


def init_prompts(sd: S.SDTurbo, description: str, cfg: PromptConfig, generator: torch.Generator) -> torch.Tensor:
    """``[K, T, D]``: description tokens (shared by the K prompts) then random tokens (different per prompt)."""
    desc = S.description_token_embeddings(sd, description, cfg.n_desc).cpu()
    rng = token_norm_range(sd)
    return torch.stack([torch.cat([desc, random_tokens(cfg.n_tokens - len(desc), sd.token_dim, rng, generator)])
                        for _ in range(cfg.k)])


def variance(v: torch.Tensor) -> torch.Tensor:
    """Mean over coordinates of the variance over the batch (dim 0) of ``v`` flattened per sample."""
    return v.flatten(1).float().var(dim=0, unbiased=False).mean()


def orthogonality(eos: torch.Tensor) -> torch.Tensor:
    """Mean squared cosine similarity between distinct rows of ``eos [K, D]`` (0 for K = 1)."""
    k = eos.shape[0]
    if k < 2:
        return eos.new_zeros(())
    e = F.normalize(eos.float(), dim=-1)
    g = e @ e.T
    return (g - torch.diag(torch.diag(g))).pow(2).sum() / (k * (k - 1))


def prompt_losses(sd: S.SDTurbo, classifier, preprocess, prompts: torch.Tensor, target: int, noise: torch.Tensor,
                  cfg: PromptConfig) -> dict[str, torch.Tensor]:
    """All loss terms for ``prompts [K, T, D]`` sharing ``noise [1, C, h, w]``; ``ce_k`` is the per-prompt CE."""
    k = prompts.shape[0]
    cond, eos = S.encode_prompt_embeddings(sd, prompts)
    images = S.one_step_generate(sd, cond, noise.expand(k, -1, -1, -1))
    logits, feats, attn = classify(classifier, preprocess(images), with_attention=cfg.w_attn != 0)
    ce_k = F.cross_entropy(logits.float(), torch.full((k,), target, device=logits.device), reduction="none")
    out = dict(ce_k=ce_k, ce=ce_k.mean(), orth=orthogonality(eos), var_img=variance(images),
               var_feat=variance(feats), var_attn=variance(attn) if attn is not None else ce_k.new_zeros(()))
    out["total"] = (cfg.w_ce * out["ce"] + cfg.w_orth * out["orth"] - cfg.w_img * out["var_img"]
                    - cfg.w_feat * out["var_feat"] - cfg.w_attn * out["var_attn"])
    return out


def reinit_prompts(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, bad: list[int],
                   good: list[int], noise: float, generator: torch.Generator, fallback=None) -> None:
    """Replace each ``params[i]``, i in ``bad``, by ``sum_j w_j params[j]`` over ``good`` (``w = u / sum u``,
    ``u ~ U(0, 1)``) plus Gaussian noise of std ``noise * rms token norm / sqrt(D)``, and drop its Adam state.
    Without good prompts ``fallback()`` gives the new value."""
    with torch.no_grad():
        for i in bad:
            if good:
                w = torch.rand(len(good), generator=generator)
                w = (w / w.sum()).to(params[i].device)
                new = sum(wj * params[j] for wj, j in zip(w, good))
                scale = new.norm(dim=-1).pow(2).mean().sqrt() / new.shape[-1] ** 0.5
                new = new + noise * scale * torch.randn(new.shape, generator=generator).to(new.device)
            else:
                new = fallback().to(params[i].device)
            params[i].copy_(new)
            optimizer.state.pop(params[i], None)


def learn_class(sd: S.SDTurbo, classifier, preprocess, class_index: int, cfg: PromptConfig,
                description: str | None = None, progress: bool = True) -> dict:
    """Optimise the K prompts of one class; returns ``{"prompts": [K, T, D] fp32 cpu, "history": [...], ...}``."""
    device = sd.device
    description = description or imagenet_info().index_to_description(class_index)
    gen = torch.Generator().manual_seed(cfg.seed * 100003 + class_index)
    params = [torch.nn.Parameter(p.to(device)) for p in init_prompts(sd, description, cfg, gen)]
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    above = [0] * cfg.k
    history = []
    shape = S.latent_shape(sd, 1, cfg.height, cfg.width)
    for step in tqdm(range(cfg.steps), desc=f"class {class_index}", leave=False, disable=not progress):
        noise = torch.randn(shape, generator=gen)
        losses = prompt_losses(sd, classifier, preprocess, torch.stack(params), class_index, noise, cfg)
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        optimizer.step()
        ce = losses["ce_k"].detach().cpu()
        above = [a + 1 if c > cfg.reinit_threshold else 0 for a, c in zip(above, ce.tolist())]
        bad = [i for i, a in enumerate(above) if a >= cfg.reinit_patience]
        if bad:
            good = [i for i, c in enumerate(ce.tolist()) if c <= cfg.reinit_threshold]
            reinit_prompts(params, optimizer, bad, good, cfg.reinit_noise, gen,
                           fallback=lambda: init_prompts(sd, description, cfg, gen)[0])
            for i in bad:
                above[i] = 0
        history.append({**{n: float(v.detach()) for n, v in losses.items() if n != "ce_k"}, "ce_k": ce.tolist(), "reinit": bad})
    return dict(prompts=torch.stack([p.detach().float().cpu() for p in params]), history=history,
                class_index=class_index, wnid=imagenet_info().index_to_label_name(class_index),
                description=description, config=asdict(cfg))


def prompt_path(out: Path, class_index: int) -> Path:
    return Path(out) / f"{imagenet_info().index_to_label_name(class_index)}.pt"


def learn_all(sd: S.SDTurbo, classifier, classes: list[int], out: Path, cfg: PromptConfig, rank: int = 0,
              world: int = 1) -> list[int]:
    """Learn and save this rank's share of ``classes``, skipping classes whose file exists; returns those done."""
    preprocess = Preprocess(classifier).to(sd.device)
    todo = [c for c in shard(classes, rank, world) if not prompt_path(out, c).exists()]
    bar = tqdm(todo, desc=f"prompts (rank {rank})", position=rank, disable=None)
    for c in bar:
        result = learn_class(sd, classifier, preprocess, c, cfg, progress=bar.disable is False)
        atomic_torch_save(result, prompt_path(out, c))
        bar.set_postfix(ce=f"{result['history'][-1]['ce']:.3f}")
    return todo


def build_parser() -> argparse.ArgumentParser:
    d = PromptConfig()
    ap = argparse.ArgumentParser(prog="python -m calib.learn_prompts", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_b", help="timm model name or alias (vit_s, vit_b, deit_s, ...)")
    ap.add_argument("--checkpoint", default=None, help="local classifier weights instead of downloading them")
    ap.add_argument("--sd-path", default=S.DEFAULT_SD, help="SD-Turbo hub id or local diffusers folder")
    ap.add_argument("--classes", default="all", help="all | a-b | comma list of indices or wnids")
    ap.add_argument("--out", required=True, type=Path,
                    help="folder of <wnid>.pt files (a folder from an earlier run with the same settings is resumed)")
    for f, v in asdict(d).items():
        ap.add_argument(f"--{f.replace('_', '-')}", type=type(v), default=v)
    return ap


def check_out(out: Path, cfg: PromptConfig) -> None:
    """``--out`` must be new, or a folder of this command's ``<wnid>.pt`` files learned with the same settings
    (checked on its first file); :class:`UserError` otherwise."""
    entries = own_entries(out, lambda p, wnids: p.suffix == ".pt" and p.stem in wnids and p.is_file(),
                          "learned prompts (<wnid>.pt)")
    if entries:
        try:
            old = torch.load(entries[0], map_location="cpu", weights_only=True).get("config")
        except Exception as e:  # noqa: BLE001 - any reader failure means an unusable file
            raise UserError(f"--out {str(out)!r}: cannot read {entries[0].name} ({type(e).__name__}); delete it or "
                            f"pick a new --out") from None
        diff = {k: (old.get(k), v) for k, v in asdict(cfg).items() if not isinstance(old, dict) or old.get(k) != v}
        if diff:
            shown = ", ".join(f"--{k.replace('_', '-')} {a} (now {b})" for k, (a, b) in list(diff.items())[:4])
            raise UserError(f"--out {str(out)!r} holds prompts learned with other settings ({shown}); pass the same "
                            f"settings to resume or pick a new --out")


def run(args: argparse.Namespace) -> None:
    """Validate everything cheap first (settings, classes, --out, file paths), then load, then learn."""
    try:
        cfg = PromptConfig(**{f: getattr(args, f) for f in asdict(PromptConfig())})
    except ValueError as e:
        raise UserError(str(e)) from None
    try:
        classes = parse_classes(args.classes)
    except ValueError as e:
        raise UserError(f"--classes: {e}") from None
    if not classes:
        raise UserError(f"--classes {args.classes!r} selects no class; use all, a-b, or a comma list")
    check_out(args.out, cfg)
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        raise UserError(f"--checkpoint {args.checkpoint!r} does not exist; pass a local weights file of {args.model}")
    S.check_sd_path(args.sd_path)
    classifier = load_classifier(args.model, args.checkpoint)
    if cfg.w_attn != 0 and not attention_modules(classifier):
        raise UserError(f"{args.model} has no timm attention module to read maps from; pass --w-attn 0")
    sd = S.load_sd_turbo(args.sd_path)
    if cfg.n_tokens + 2 > sd.tokenizer.model_max_length:
        raise UserError(f"--n-tokens {cfg.n_tokens} + BOS + EOS exceed the text encoder's "
                        f"{sd.tokenizer.model_max_length} positions")
    try:
        S.latent_shape(sd, 1, cfg.height, cfg.width)
    except ValueError as e:
        raise UserError(f"--height/--width: {e}") from None
    rank, world, device = setup_distributed()
    classifier.to(device)
    if device.type == "cuda":
        sd.to(device, torch.bfloat16)
        sd.enable_gradient_checkpointing()
    else:
        sd.to(device)
    learn_all(sd, classifier, classes, args.out, cfg, rank, world)
    finish_distributed()


def main(argv: list[str] | None = None) -> int:
    """Exit status 0, or 2 with one ``error: ...`` line on bad input (nothing written then)."""
    args = build_parser().parse_args(argv)
    return cli_main(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
