import numpy as np
import pytest
import timm
import torch
from PIL import Image

from calib.classifier import Preprocess, capture_attention, classify, load_classifier
from lowbit.errors import UserError


def test_preprocess_matches_timm_eval_transform(imagenet_folder):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1)
    tf = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    files = sorted(imagenet_folder.glob("*/*.JPEG"))[:3] + sorted(imagenet_folder.glob("*/*.JPEG"))[39:40]
    assert len(files) == 4 and Image.open(files[-1]).mode == "L"  # odd sizes, and a grayscale file
    for f in files:
        im = Image.open(f).convert("RGB")
        x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)[None].float() / 255
        out, ref = Preprocess(model)(x)[0], tf(im)
        assert out.shape == ref.shape == (3, 224, 224)
        assert (out - ref).abs().mean() < 5e-3 and (out - ref).abs().max() < 0.1  # PIL rounds to uint8


def test_classify_logits_features_and_attention(vit, gen):
    x = torch.randn(3, 3, 16, 16, generator=gen)
    logits, feats, attn = classify(vit, x)
    torch.testing.assert_close(logits, vit(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, vit.head(feats), rtol=1e-4, atol=1e-5)
    n = 1 + 16  # cls + 4x4 patches
    assert attn.shape == (3, 2 * 2 * n * n)
    torch.testing.assert_close(attn.view(3, 2, 2, n, n).sum(-1), torch.ones(3, 2, 2, n))
    assert all(b.attn.fused_attn == timm.layers.use_fused_attn() for b in vit.blocks)
    with capture_attention(vit) as maps:
        assert not any(b.attn.fused_attn for b in vit.blocks)
        vit(x)
    assert len(maps) == 2 and maps[0].shape == (3, 2, n, n)
    assert len(vit.blocks[0].attn.attn_drop._forward_hooks) == 0


def test_load_classifier_from_local_checkpoint(tmp_path):
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    model = load_classifier("vit_tiny_patch16_224", checkpoint=tmp_path / "w.pth")
    torch.testing.assert_close(model.head.weight, ref.head.weight)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    with pytest.raises(UserError, match="--checkpoint .*missing.pth' does not exist.*vit_tiny_patch16_224"):
        load_classifier("vit_tiny_patch16_224", checkpoint=tmp_path / "missing.pth")
    torch.save({"not": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="could not load classifier 'vit_tiny_patch16_224'.*this architecture"):
        load_classifier("vit_tiny_patch16_224", checkpoint=tmp_path / "other.pth")
