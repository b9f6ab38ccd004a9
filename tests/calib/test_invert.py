import dataclasses
import json
import math
import torch
import pytest
from timm.models.vision_transformer import VisionTransformer

from calib import invert


def _tiny(num_classes=3):
    torch.manual_seed(0)
    m = VisionTransformer(img_size=16, patch_size=4, num_classes=num_classes, embed_dim=32, depth=2, num_heads=2)
    m.pretrained_cfg = {"input_size": (3, 16, 16), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    return m.eval()


def test_patch_similarity_entropy_prefers_diverse_patches(gen):
    same = torch.randn(2, 1, 8, generator=gen).expand(2, 10, 8)
    diverse = torch.randn(2, 10, 8, generator=gen)
    assert invert.patch_similarity_entropy(diverse, 0.05, 64) > invert.patch_similarity_entropy(same + 1e-3 * diverse, 0.05, 64)


def test_random_resized_crop_keeps_a_window_of_the_drawn_area():
    ramp = torch.arange(32.0).view(1, 1, 1, 32).expand(1, 3, 32, 32)
    assert torch.equal(invert._random_resized_crop(ramp, 1.0, torch.Generator().manual_seed(0)), ramp)
    spans = []
    for seed in range(40):
        y = invert._random_resized_crop(ramp, 0.25, torch.Generator().manual_seed(seed))
        assert y.shape == ramp.shape and torch.equal(y[:, :, :1].expand_as(y), y)  # rows stay equal
        row = y[0, 0, 0]
        assert bool((row[1:] >= row[:-1]).all()) and 0 <= float(row[0]) and float(row[-1]) <= 31
        spans.append(float(row[-1] - row[0]))
    assert min(spans) >= 0.5 * 32 - 2 and max(spans) > 28 and min(spans) < 24  # side in [sqrt(0.25), 1] x 32


def test_init_std_scales_the_starting_noise():
    m = _tiny()
    lab = torch.tensor([0, 1])
    flat = invert.synthesize(m, lab, invert.InvertConfig(steps=0, init_std=0.0), progress=False)
    assert torch.allclose(flat, torch.full_like(flat, 0.5))
    a = invert.synthesize(m, lab, invert.InvertConfig(steps=0, init_std=0.1), progress=False)
    b = invert.synthesize(m, lab, invert.InvertConfig(steps=0, init_std=0.2), progress=False)
    torch.testing.assert_close(b - 0.5, 2 * (a - 0.5))
    c = invert.synthesize(m, lab, invert.InvertConfig(steps=3, crop_scale=0.5, color_shift=0.2), progress=False)
    d = invert.synthesize(m, lab, invert.InvertConfig(steps=3, prior="noise"), progress=False)
    assert not torch.equal(c, d) and float(c.min()) >= 0 and float(c.max()) <= 1


def test_soft_targets_easy_to_hard(gen):
    y = torch.tensor([0, 1, 2, 2])
    easy = invert.soft_targets(y, 3, 0.0, 0.4, gen)
    hard = invert.soft_targets(y, 3, 1.0, 0.4, gen)
    assert torch.equal(easy.argmax(1), y) and torch.allclose(easy.max(1).values, torch.ones(4))
    assert torch.allclose(hard[torch.arange(4), y], torch.full((4,), 0.6))
    torch.testing.assert_close(hard.sum(1), torch.ones(4))


def test_synthesis_reaches_targets_and_stays_in_range():
    m = _tiny()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    cfg = invert.InvertConfig(steps=60, lr=0.1)
    x = invert.synthesize(m, y, cfg, progress=False)
    assert x.shape == (6, 3, 16, 16) and float(x.min()) >= 0 and float(x.max()) <= 1
    norm = (x - 0.5) / 0.25
    with torch.no_grad():
        acc = (m(norm).argmax(1) == y).float().mean()
        ce0 = torch.nn.functional.cross_entropy(m(torch.randn(6, 3, 16, 16)), y)
        ce1 = torch.nn.functional.cross_entropy(m(norm), y)
    assert acc >= 5 / 6 and ce1 < ce0
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())  # the FP model stays frozen
    assert all(p.grad is None for p in m.parameters())


def test_image_folder_resumes_and_is_atomic(tmp_path, monkeypatch):
    m = _tiny()
    cfg = invert.InvertConfig(steps=3, batch_size=4)
    out = invert.write_image_folder(m, tmp_path / "syn", per_class=2, classes=[0, 2], cfg=cfg, progress=False)
    dirs = sorted(p.name for p in out.iterdir() if p.name != ".synthesis.json")
    assert dirs == ["0000", "0002"]
    assert all(len(list((out / d).glob("*.png"))) == 2 for d in dirs)
    calls = []
    real = invert.synthesize
    monkeypatch.setattr(invert, "synthesize", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    invert.write_image_folder(m, out, per_class=2, classes=[0, 1, 2], cfg=cfg, progress=False)
    assert sorted(torch.cat(calls).tolist()) == [1, 1]  # only the missing class was synthesized
    assert sorted(p.name for p in out.iterdir() if p.name != ".synthesis.json") == ["0000", "0001", "0002"]
    with pytest.raises(ValueError, match="outside"):
        invert.write_image_folder(m, out, per_class=1, classes=[5], cfg=cfg, progress=False)


def test_interrupted_synthesis_resumes_at_its_batch_with_the_same_images(tmp_path, monkeypatch):
    m = _tiny()
    cfg = invert.InvertConfig(steps=2, batch_size=3)
    whole = invert.write_image_folder(m, tmp_path / "whole", per_class=4, classes=[0, 1, 2], cfg=cfg, progress=False)
    real, calls = invert.synthesize, []

    def crash_at_third(*a, **k):
        calls.append(k["seed"])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(invert, "synthesize", crash_at_third)
    with pytest.raises(KeyboardInterrupt):
        invert.write_image_folder(m, tmp_path / "cut", per_class=4, classes=[0, 1, 2], cfg=cfg, progress=False)
    assert (tmp_path / "cut" / ".progress.json").is_file()
    calls.clear()
    monkeypatch.setattr(invert, "synthesize", lambda *a, **k: calls.append(k["seed"]) or real(*a, **k))
    invert.write_image_folder(m, tmp_path / "cut", per_class=4, classes=[0, 1, 2], cfg=cfg, progress=False)
    assert calls == [2, 3]  # 12 images in 4 batches of 3: batches 0 and 1 were kept
    files = sorted(p.relative_to(whole) for p in whole.rglob("*.png"))
    assert len(files) == 12 and sorted(p.relative_to(tmp_path / "cut") for p in (tmp_path / "cut").rglob("*")
                                      if p.is_file() and p.name != ".synthesis.json") == files
    assert all((whole / f).read_bytes() == (tmp_path / "cut" / f).read_bytes() for f in files)
    timing = json.loads((tmp_path / "cut" / ".synthesis.json").read_text())
    assert timing["batches"] == 4 and timing["seconds"] > 0 and timing["partial"] is False  # both runs timed

    # cut between a class's last recorded batch and its folder's rename: the next run renames it, making nothing
    (tmp_path / "cut" / "0001").rename(tmp_path / "cut" / ".tmp-0001")
    progress = {"classes": [1], "per_class": 4, "seed": 0, "config": dataclasses.asdict(cfg), "done": [0, 1, 2, 3]}
    (tmp_path / "cut" / ".progress.json").write_text(json.dumps(progress))
    calls.clear()
    invert.write_image_folder(m, tmp_path / "cut", per_class=4, classes=[0, 1, 2], cfg=cfg, progress=False)
    assert calls == [] and len(list((tmp_path / "cut" / "0001").glob("*.png"))) == 4
    assert not (tmp_path / "cut" / ".progress.json").exists()
    # that progress file (as written before synthesis was timed) had no seconds: the total is marked partial
    assert json.loads((tmp_path / "cut" / ".synthesis.json").read_text())["partial"] is True


# PSAQ-ViT's patch-similarity entropy, from the paper's definition: normalised Gaussian KDE of the cosine
# similarities, differential entropy by the trapezoid rule (values below are computed by hand in plain Python).


def _phi(x, h):
    return math.exp(-x * x / (2 * h * h)) / math.sqrt(2 * math.pi * h * h)


def _g(f):
    return -(f + 1e-4) * math.log(f + 1e-4)


def test_kde_differential_entropy_hand_computed():
    # one sample at 0, h = 1, t in {-1, 0, 1} (dt = 1): H = g(f(-1))/2 + g(f(0)) + g(f(1))/2
    h0 = invert.kde_differential_entropy(torch.tensor([[0.0]]), -1.0, 1.0, bandwidth=1.0, points=3)
    assert float(h0) == pytest.approx(_g(_phi(1, 1)) / 2 + _g(_phi(0, 1)) + _g(_phi(1, 1)) / 2, rel=1e-6)
    # two samples {0, 1}, h = 0.5, t in {0, 1}: f(0) = f(1) = (phi(0) + phi(1)) / 2, H = (g(f(0)) + g(f(1))) / 2
    f = (_phi(0, 0.5) + _phi(1, 0.5)) / 2
    rows = invert.kde_differential_entropy(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), 0.0, 1.0, 0.5, 2)
    torch.testing.assert_close(rows, torch.full((2,), _g(f)), rtol=1e-6, atol=0)


def test_psaq_entropy_head_mean_prefix_and_all_pairs():
    # 2 heads of width 2; token 0 is the class token. Head means: (1, 0) and (0, 2) -> similarities [[1, 0], [0, 1]]
    x = torch.tensor([[[5.0, -3.0, 2.0, 7.0], [1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 3.0]]])
    vals, ts = [1.0, 0.0, 0.0, 1.0], [i / 9 for i in range(10)]  # all 4 ordered pairs; 10 points over [0, 1]
    fs = [sum(_phi(t - v, 0.01) for v in vals) / 4 for t in ts]
    want = sum((_g(fs[i]) + _g(fs[i + 1])) / 2 * (ts[i + 1] - ts[i]) for i in range(9))
    got = invert.psaq_patch_similarity_entropy(x, heads=2, prefix=1)
    assert float(got) == pytest.approx(want, rel=1e-5)
    y = x.clone()
    y[0, 0] = torch.tensor([-1.0, 4.0, 0.5, 0.5])  # the dropped class token does not matter
    assert float(invert.psaq_patch_similarity_entropy(y, 2, 1)) == pytest.approx(want, rel=1e-5)
    # one head of width 4 sees other vectors: (1, 0, 1, 0) and (0, 1, 0, 3) are orthogonal too, but the
    # head mean is what is compared when heads = 2; with a non-orthogonal pair the two readings differ
    z = x.clone()
    z[0, 2] = torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert float(invert.psaq_patch_similarity_entropy(z, 2, 1)) != pytest.approx(
        float(invert.psaq_patch_similarity_entropy(z, 1, 1)), rel=1e-3)


def test_psaq_entropy_gradient_reaches_the_tokens(gen):
    # (With h = 0.01 and 10 points the published estimator is coarse: it does not rank a random token set above
    # near-identical tokens -- whose similarities span a ~1e-6 interval, so the integral is ~0 -- hence no such test.)
    x = torch.randn(2, 10, 8, generator=gen, requires_grad=True)
    invert.psaq_patch_similarity_entropy(x, 2, 1).backward()
    assert bool(torch.isfinite(x.grad).all()) and float(x.grad[:, 1:].abs().sum()) > 0
    assert float(x.grad[:, 0].abs().sum()) == 0  # the class token is dropped


def test_psaq_config_defaults_and_unknown_synthesis():
    c = invert.InvertConfig(synthesis="psaq")
    assert (c.w_ps, c.kde_bandwidth, c.kde_points) == (1.0, 0.01, 10)
    c = invert.InvertConfig()
    assert (c.synthesis, c.w_ps, c.kde_bandwidth, c.kde_points) == ("lowbit", 0.1, 0.05, 64)
    with pytest.raises(ValueError, match="unknown synthesis 'nope'"):
        invert.InvertConfig(synthesis="nope")


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_psaq_synthesis_hooks_attention_outputs(kind, monkeypatch):
    if kind == "vit":
        m = _tiny()
        heads = [2, 2]
    else:
        import timm
        torch.manual_seed(0)
        m = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=16, patch_size=2,
                              window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2), num_classes=3).eval()
        m.pretrained_cfg = {"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.25,) * 3}
        heads = [1, 2]
    seen = []
    real = invert.psaq_patch_similarity_entropy
    monkeypatch.setattr(invert, "psaq_patch_similarity_entropy",
                        lambda f, h, p, *a, **k: seen.append((tuple(f.shape), h, p, k["images"])) or real(f, h, p, *a,
                                                                                                           **k))
    x = invert.synthesize(m, torch.tensor([0, 1]), invert.InvertConfig(steps=2, synthesis="psaq"), progress=False)
    assert x.shape == (2, 3, 16, 16) and bool(torch.isfinite(x).all())
    assert [h for _, h, _, _ in seen[:2]] == heads
    if kind == "vit":
        assert seen[0] == ((2, 17, 32), 2, 1, 2)  # 16 patches + class token, width 32, class token dropped
    else:  # 4 windows of 4x4 tokens per image, pooled per image; the first token of each window dropped (as published)
        assert seen[0] == ((2 * 4, 16, 16), 1, 1, 2)


def test_psaq_entropy_pools_the_windows_of_an_image(gen):
    """Swin: one density estimate per image over the similarities of all its windows (the authors' code views the
    per-window similarities as ``[images, -1]``), not one per window; worked out here from the formula."""
    images, windows, n, c = 2, 3, 5, 8
    x = torch.randn(images * windows, n, c, generator=gen)
    u = torch.nn.functional.normalize(x.reshape(images * windows, n, 2, c // 2).mean(2)[:, 1:], dim=-1)
    sims = torch.einsum("wic,wjc->wij", u, u)
    lo, hi = float(sims.min()), float(sims.max())
    t = torch.linspace(lo, hi, 10)
    want = []
    for v in sims.reshape(images, -1):  # every pair of every window of the image
        f = torch.tensor([sum(_phi(float(ti - vi), 0.01) for vi in v) / len(v) for ti in t])
        g = -(f + 1e-4) * torch.log(f + 1e-4)
        want.append(float(torch.trapezoid(g, t)))
    got = invert.psaq_patch_similarity_entropy(x, heads=2, prefix=1, images=images)
    assert float(got) == pytest.approx(sum(want) / images, rel=1e-4)
    per_window = invert.psaq_patch_similarity_entropy(x, heads=2, prefix=1)
    assert float(per_window) != pytest.approx(float(got), rel=1e-3)


def test_mixed_prior_alternates_the_priors_batch_by_batch(tmp_path):
    """``prior="mixed"``: batch ``b`` is made exactly as ``("smooth", "noise")[b % 2]`` makes it (same labels, seed
    and difficulty), so the set is the even batches of a smooth set and the odd batches of a noise set."""
    c = invert.InvertConfig(prior="mixed", w_l2=2e-4)
    assert c.w_tv is None and c.for_batch(0) == invert.InvertConfig(prior="smooth", w_l2=2e-4)
    assert c.for_batch(3) == invert.InvertConfig(prior="noise", w_l2=2e-4)
    assert invert.InvertConfig(prior="mixed", w_tv=0.5).for_batch(1).w_tv == 0.5
    assert invert.InvertConfig(prior="noise").for_batch(0).prior == "noise"
    with pytest.raises(ValueError, match="unknown image prior 'nope'; use one of smooth, noise, mixed"):
        invert.InvertConfig(prior="nope")
    m = _tiny()
    sets = {p: invert.write_image_folder(m, tmp_path / p, per_class=3, classes=[0, 1, 2],
                                         cfg=invert.InvertConfig(steps=2, batch_size=2, prior=p), progress=False)
            for p in ("mixed", "smooth", "noise")}
    files = sorted(p.relative_to(sets["mixed"]) for p in sets["mixed"].rglob("*.png"))
    assert len(files) == 9 and {int(f.name.split("-")[0]) for f in files} == set(range(5))
    for f in files:
        twin = sets[("smooth", "noise")[int(f.name.split("-")[0]) % 2]] / f
        assert (sets["mixed"] / f).read_bytes() == twin.read_bytes()
    assert (sets["smooth"] / files[0]).read_bytes() != (sets["noise"] / files[0]).read_bytes()


def test_gaussian_kernel_mean_matches_autograd_of_the_formula(gen):
    """The KDE of the lowbit entropy (analytic backward) against autograd through the plain formula."""
    v = (torch.rand(3, 50, generator=gen, dtype=torch.float64) * 2 - 1).requires_grad_()
    grid, h = torch.linspace(-1, 1, 7, dtype=torch.float64), 0.05
    g = torch.randn(3, 7, generator=gen, dtype=torch.float64)
    ref = torch.exp(-0.5 * ((v[:, :, None] - grid) / h) ** 2).mean(1)
    (ref_grad,) = torch.autograd.grad((ref * g).sum(), v)
    out = invert._GaussianKernelMean.apply(v, grid, h)
    (grad,) = torch.autograd.grad((out * g).sum(), v)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)
    assert grad.abs().max() > 0.1  # the check is not on vanishing gradients
    assert torch.autograd.gradcheck(lambda x: invert._GaussianKernelMean.apply(x, grid, h), (v[:1, :6].detach()
                                                                                         .requires_grad_(),))


def test_synthesize_refuses_an_unresolved_mixture():
    with pytest.raises(ValueError, match=r"mixture; pass cfg.for_batch\(b\)"):
        invert.synthesize(_tiny(), torch.tensor([0]), invert.InvertConfig(steps=1, prior="mixed"), progress=False)


def test_image_folder_shows_a_bar_per_step(tmp_path, capsys):
    """A synthesis batch takes minutes on a CPU: under the batch bar a step bar moves (it was silent)."""
    m = _tiny()
    invert.write_image_folder(m, tmp_path / "syn", per_class=2, classes=[0, 2], cfg=invert.InvertConfig(
        steps=12, batch_size=4), progress=True)
    err = capsys.readouterr().err
    assert "data-free batches" in err and "synthesizing" in err and "/12 [" in err  # the step bar, 12 steps
