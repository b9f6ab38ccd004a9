"""Image folders: RGB conversion, skipped unreadable files, deterministic subsets, clear errors."""
import io

import pytest
import torch
from PIL import Image

from calib import data as D
from lowbit.errors import UserError


def _to_tensor(im):
    hwc = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(im.size[1], im.size[0], 3)
    return hwc.permute(2, 0, 1).float()


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    Image.new("RGB", (4, 4), (10, 20, 30)).save(root / "a" / "rgb.png")
    Image.new("L", (4, 4), 77).save(root / "a" / "gray.png")
    Image.new("CMYK", (4, 4), (0, 255, 0, 0)).save(root / "b" / "cmyk.jpg", "JPEG")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, "JPEG")
    (root / "b" / "truncated.jpg").write_bytes(buf.getvalue()[:60])
    (root / "b" / "garbage.JPEG").write_bytes(b"definitely not an image")
    (root / "b" / "notes.txt").write_text("ignored")
    return str(root)


def test_scan_converts_and_skips(folder):
    f = D.scan(folder)
    assert f.classes == ["a", "b"] and len(f) == 5
    x, y = D.load_subset(f, _to_tensor, None)
    assert x.shape == (3, 3, 4, 4) and y.tolist() == [0, 0, 1]
    assert sorted(p.rsplit("/", 1)[1] for p in f.skipped) == ["garbage.JPEG", "truncated.jpg"]
    assert torch.all(x[0, :, 0, 0] == torch.tensor([77.0, 77.0, 77.0]))  # gray.png sorts first
    assert torch.all(x[1, :, 0, 0] == torch.tensor([10.0, 20.0, 30.0]))
    assert x[2, 0, 0, 0] > 200 and x[2, 1, 0, 0] < 60  # CMYK magenta -> RGB (255, 0, 255)-ish
    batches = list(D.stream(D.scan(folder), _to_tensor, batch_size=2))
    assert [b[0].shape[0] for b in batches] == [2, 1]


def test_subset_is_deterministic_and_skips_replace(folder):
    f1, f2 = D.scan(folder), D.scan(folder)
    a, _ = D.load_subset(f1, _to_tensor, 2, seed=4)
    b, _ = D.load_subset(f2, _to_tensor, 2, seed=4)
    assert torch.equal(a, b) and a.shape[0] == 2
    full, _ = D.load_subset(D.scan(folder), _to_tensor, 10, seed=4)
    assert full.shape[0] == 3  # only three decodable images exist


def test_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        D.scan(str(tmp_path / "missing"))
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(UserError, match="holds no images"):
        D.scan(str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(b"nope")
    with pytest.raises(UserError, match="could be decoded"):
        D.load_subset(D.scan(str(bad)), _to_tensor, 4)


def test_stream_with_worker_processes_matches_in_process(folder):
    f0, f1 = D.scan(folder), D.scan(folder)
    a = list(D.stream(f0, _to_tensor, batch_size=2, workers=0))
    b = list(D.stream(f1, _to_tensor, batch_size=2, workers=2))
    assert len(a) == len(b) and all(torch.equal(x[0], z[0]) and torch.equal(x[1], z[1]) for x, z in zip(a, b))
    assert sorted(f0.skipped) == sorted(f1.skipped) and len(f1.skipped) == 2
