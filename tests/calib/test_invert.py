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
    dirs = sorted(p.name for p in out.iterdir())
    assert dirs == ["0000", "0002"]
    assert all(len(list((out / d).glob("*.png"))) == 2 for d in dirs)
    calls = []
    real = invert.synthesize
    monkeypatch.setattr(invert, "synthesize", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    invert.write_image_folder(m, out, per_class=2, classes=[0, 1, 2], cfg=cfg, progress=False)
    assert sorted(torch.cat(calls).tolist()) == [1, 1]  # only the missing class was synthesized
    assert sorted(p.name for p in out.iterdir()) == ["0000", "0001", "0002"]
    with pytest.raises(ValueError, match="outside"):
        invert.write_image_folder(m, out, per_class=1, classes=[5], cfg=cfg, progress=False)
