"""Batch augmentation of the optimiser (``calib.augment``), checked against its definition image by image."""
import pytest
import torch
import torch.nn.functional as F

from calib.augment import AUGMENTS, augment_batch, parse_augment


def test_parse():
    assert parse_augment("none") == () and parse_augment("") == ()
    assert parse_augment("mix, flip,shift") == AUGMENTS
    with pytest.raises(ValueError, match="unknown augmentation 'crop'"):
        parse_augment("flip,crop")


def test_shift_is_a_reflected_translation():
    x = torch.randn(16, 3, 32, 24)
    y = augment_batch(x, ("shift",), seed=7)
    assert torch.equal(y, augment_batch(x, ("shift",), seed=7)) and not torch.equal(y, augment_batch(x, ("shift",), 8))
    pad = F.pad(x, (3, 3, 4, 4), mode="reflect")
    moved = 0
    for n in range(16):
        hits = [(i, j) for i in range(9) for j in range(7) if torch.equal(y[n], pad[n, :, i:i + 32, j:j + 24])]
        assert len(hits) == 1, f"image {n} is not one reflected translation of the input"
        moved += hits[0] != (4, 3)
    assert moved >= 8


def test_flip_mirrors_about_half():
    x = torch.randn(64, 3, 8, 8)
    y = augment_batch(x, ("flip",), seed=1)
    same = [torch.equal(y[n], x[n]) for n in range(64)]
    mirrored = [torch.equal(y[n], x[n].flip(-1)) for n in range(64)]
    assert all(a or b for a, b in zip(same, mirrored))
    assert 16 <= sum(mirrored) <= 48


def test_mix_blends_half_the_images_with_another():
    x = torch.randn(64, 3, 8, 8, dtype=torch.float64)
    y = augment_batch(x, ("mix",), seed=3)
    mixed = 0
    for n in range(64):
        if torch.equal(y[n], x[n]):
            continue
        mixed += 1
        fits = []
        for j in range(64):
            d = (x[n] - x[j]).flatten()
            if j == n:
                continue
            lam = float(((y[n] - x[j]).flatten() @ d) / (d @ d))
            if 0 <= lam <= 1 and torch.allclose(y[n], lam * x[n] + (1 - lam) * x[j], atol=1e-12):
                fits.append(j)
        assert len(fits) == 1, f"image {n} is not a blend of itself and one other image"
    assert 16 <= mixed <= 48
    assert torch.equal(augment_batch(x[:1], ("mix",), seed=3), x[:1])


def test_no_ops_returns_the_batch_and_never_writes_it():
    x = torch.randn(4, 3, 8, 8)
    keep = x.clone()
    assert augment_batch(x, (), seed=0) is x
    augment_batch(x, AUGMENTS, seed=0)
    assert torch.equal(x, keep)
