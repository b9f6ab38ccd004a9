import math

import pytest
import torch

from calib.classifier import Preprocess
from calib.common import imagenet_info
from calib.learn_prompts import (PromptConfig, init_prompts, learn_all, learn_class, orthogonality, prompt_losses,
                                 prompt_path, reinit_prompts, token_norm_range, variance)

CFG = PromptConfig(k=3, height=16, width=16, steps=2)


def test_init_prompts_layout(sd, gen):
    p = init_prompts(sd, "tench, Tinca tinca", CFG, gen)
    assert p.shape == (3, 20, sd.token_dim)
    desc = sd.tokenizer("tench, Tinca tinca", add_special_tokens=False).input_ids[:10]
    table = sd.text_encoder.get_input_embeddings().weight
    assert len(desc) == 10
    torch.testing.assert_close(p[:, :10], table[desc].expand(3, -1, -1))
    lo, hi = token_norm_range(sd)
    norms = p[:, 10:].norm(dim=-1)
    assert norms.min() >= lo - 1e-6 and norms.max() <= hi + 1e-6
    assert (p[0, 10:] - p[1, 10:]).abs().max() > 1e-3
    short = init_prompts(sd, "ab", CFG, gen)  # 2 description tokens, 18 random
    assert short.shape == (3, 20, sd.token_dim) and (short[0, 2:] - short[1, 2:]).abs().min() > 0


def test_bad_config_raises():
    with pytest.raises(ValueError, match="n_desc"):
        PromptConfig(n_desc=21)
    with pytest.raises(ValueError, match="k="):
        PromptConfig(k=0)


def test_loss_terms_on_known_inputs(gen):
    e = torch.eye(4)[:3] * 5
    assert orthogonality(e) == 0
    assert orthogonality(torch.ones(3, 4)).item() == pytest.approx(1.0)
    v = torch.randn(5, 2, 3, generator=gen)
    assert variance(v).item() == pytest.approx(v.reshape(5, 6).var(0, unbiased=False).mean().item())


def test_gradients_reach_prompts(sd, vit, gen):
    prompts = init_prompts(sd, "tench", CFG, gen).requires_grad_(True)
    losses = prompt_losses(sd, vit, Preprocess(vit), prompts, 0, torch.randn(1, 4, 8, 8, generator=gen), CFG)
    for name in ("ce", "orth", "var_img", "var_feat", "var_attn"):
        (g,) = torch.autograd.grad(losses[name], prompts, retain_graph=True)
        assert torch.isfinite(g).all() and (g.flatten(1).norm(dim=1) > 0).all(), name
    assert losses["ce_k"].shape == (3,)


def test_loss_falls_on_fixed_classifier(sd, vit, gen):
    prompts = torch.nn.Parameter(init_prompts(sd, "goldfish", CFG, gen))
    noise = torch.randn(1, 4, 8, 8, generator=gen)
    opt = torch.optim.Adam([prompts], lr=1e-2)
    pre = Preprocess(vit)
    hist = []
    for _ in range(5):
        losses = prompt_losses(sd, vit, pre, prompts, 1, noise, CFG)
        opt.zero_grad()
        losses["total"].backward()
        opt.step()
        hist.append((losses["total"].item(), losses["ce"].item()))
    assert hist[-1][0] < hist[0][0] and hist[-1][1] < hist[0][1], hist


def test_reinit_replaces_bad_prompt_by_mix_of_good_and_resets_adam(gen):
    params = [torch.nn.Parameter(torch.randn(4, 6, generator=gen)) for _ in range(3)]
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        sum((p ** 3).sum() for p in params).backward()
        opt.step()
    good = [p.detach().clone() for p in params[:2]]
    reinit_prompts(params, opt, bad=[2], good=[0, 1], noise=0.0, generator=gen)
    a = torch.stack([g.flatten() for g in good], 1)
    w = torch.linalg.lstsq(a, params[2].detach().flatten()[:, None]).solution.flatten()
    torch.testing.assert_close(a @ w, params[2].detach().flatten(), rtol=0, atol=1e-5)
    assert (w >= 0).all() and w.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert params[2] not in opt.state and all(opt.state[p]["step"] == 3 for p in params[:2])
    torch.testing.assert_close(params[0].detach(), good[0])
    opt.zero_grad()
    sum((p ** 3).sum() for p in params).backward()
    opt.step()
    assert opt.state[params[2]]["step"] == 1 and opt.state[params[0]]["step"] == 4
    mix = params[1].detach().clone()
    reinit_prompts(params, opt, bad=[0], good=[1], noise=0.5, generator=gen)
    delta = params[0].detach() - mix
    assert 0 < delta.abs().max() and delta.std().item() == pytest.approx(
        0.5 * mix.norm(dim=-1).pow(2).mean().sqrt().item() / math.sqrt(6), rel=0.5)


def test_reinit_branch_runs_in_training(sd, vit):
    cfg = PromptConfig(k=2, height=16, width=16, steps=2, reinit_threshold=-1.0, reinit_patience=1)
    out = learn_class(sd, vit, Preprocess(vit), 3, cfg, progress=False)
    assert [h["reinit"] for h in out["history"]] == [[0, 1], [0, 1]]  # no good prompt: fresh initialisation
    assert torch.isfinite(out["prompts"]).all()


def test_learning_resumes_per_class(sd, vit, tmp_path):
    cfg = PromptConfig(k=2, height=16, width=16, steps=1)
    assert learn_all(sd, vit, [0, 2], tmp_path, cfg) == [0, 2]
    names = imagenet_info().label_names()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{names[0]}.pt", f"{names[2]}.pt"]
    saved = torch.load(prompt_path(tmp_path, 2), weights_only=True)
    assert saved["prompts"].shape == (2, 20, sd.token_dim) and saved["wnid"] == names[2] and saved["class_index"] == 2
    before = prompt_path(tmp_path, 2).stat().st_mtime_ns
    prompt_path(tmp_path, 0).unlink()
    assert learn_all(sd, vit, [0, 2], tmp_path, cfg) == [0]
    assert prompt_path(tmp_path, 2).stat().st_mtime_ns == before and prompt_path(tmp_path, 0).exists()
    assert learn_all(sd, vit, [0, 2], tmp_path, cfg, rank=1, world=2) == []


def test_bf16_and_gradient_checkpointing_path(tmp_path, vit, gen):
    """The GPU setting (bf16 UNet/VAE, checkpointing; prompts and losses fp32) gives fp32 prompt gradients that
    point the same way as the fp32 ones (run on CPU here)."""
    from calib.sd_turbo import SDTurbo
    from tests.calib.tiny_sd import tiny_pipeline

    sd = SDTurbo.from_pipeline(tiny_pipeline(tmp_path))
    p0, noise, pre = init_prompts(sd, "tench", CFG, gen), torch.randn(1, 4, 8, 8, generator=gen), Preprocess(vit)
    grads = []
    for half in (False, True):
        if half:
            sd.to("cpu", torch.bfloat16)
            sd.enable_gradient_checkpointing()
        p = p0.clone().requires_grad_(True)
        losses = prompt_losses(sd, vit, pre, p, 0, noise, CFG)
        assert losses["total"].dtype == torch.float32
        (losses["ce"] - losses["var_img"]).backward()
        grads.append(p.grad)
    assert sd.unet.dtype == torch.bfloat16 and sd.text_encoder.dtype == torch.float32
    assert grads[1].dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(grads[0].flatten(), grads[1].flatten(), dim=0) > 0.9
