"""Streaming calibration (``calib.stream``): the on-disk cache gives exactly ``load_subset``'s images, optimisers
fed from it (DataLoader worker processes) compute exactly what they compute in memory, resume stays bit-exact, and a
``quant.run`` process's peak memory does not grow with ``--calib-size``."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from calib import data as D
from calib import stream as S
from calib.invert import InvertConfig, write_image_folder
from lowbit.errors import UserError
from quant.calibrate import calibrate
from quant.correction import add_act_correction, train_act_correction
from quant.optimize import OptimConfig, optimize
from quant.surgery import quantize_model

from .ptq_utils import make_model, one_thread  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]


def _write_images(root: Path, n: int, size=(40, 36), seed: int = 0, classes: int = 3) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(d / f"{i:05d}.png")
    return root


def _model_transform(size=32):
    from timm.data import create_transform
    return create_transform(input_size=(3, size, size), is_training=False, interpolation="bicubic", crop_pct=0.9,
                            mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = _write_images(tmp_path_factory.mktemp("calib") / "imgs", 40)
    (root / "c1" / "broken.jpg").write_bytes(b"not an image")
    Image.new("L", (50, 30), 99).save(root / "c2" / "gray.png")
    return root


def test_cache_is_load_subset_bit_for_bit(folder, tmp_path):
    tf = _model_transform()
    ref_folder, f = D.scan(str(folder)), D.scan(str(folder))
    ref, _ = D.load_subset(ref_folder, tf, 30, seed=3)
    cache = S.build_cache(f, tf, 30, str(tmp_path / "c"), seed=3, workers=2, progress=False)
    assert cache.meta["dtype"] == "uint8" and cache.meta["shape"] == [32, 32, 3]  # the compact form
    assert os.path.getsize(tmp_path / "c" / "images.bin") == 30 * 32 * 32 * 3
    assert len(cache) == 30 and torch.equal(cache.head(30), ref)
    order = [[5, 0, 29], [3], [7, 7, 1]]
    cache.workers = 2
    got = list(cache.batches(iter(order)))
    assert all(torch.equal(g, ref[i]) for g, i in zip(got, order))
    assert f.skipped == ref_folder.skipped and sorted(os.listdir(tmp_path)) == ["c"]  # no temporary left
    # reused as is (no decoding) when nothing changed; rebuilt when a source file changes
    again = D.scan(str(folder))
    assert S.build_cache(again, tf, 30, str(tmp_path / "c"), seed=3, progress=False).meta == cache.meta
    assert again.skipped == f.skipped
    # a transform without a ToTensor step is cached as its float32 output
    plain = lambda im: torch.from_numpy(np.asarray(im.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1)  # noqa
    fl = S.build_cache(D.scan(str(folder)), plain, 10, str(tmp_path / "f"), seed=1, progress=False)
    assert fl.meta["dtype"] == "float32" and torch.equal(fl.head(10), D.load_subset(D.scan(str(folder)), plain,
                                                                                     10, seed=1)[0])


def test_cache_errors(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(b"nope")
    with pytest.raises(UserError, match="could be decoded"):
        S.build_cache(D.scan(str(bad)), _model_transform(), 4, str(tmp_path / "c"), progress=False)
    assert not os.path.exists(tmp_path / "c") and os.listdir(tmp_path) == ["bad"]
    mixed = _write_images(tmp_path / "mixed", 2)
    Image.new("RGB", (10, 20)).save(mixed / "c0" / "tall.png")
    plain = lambda im: torch.zeros(3, im.size[1], im.size[0])  # noqa: E731 - sizes differ, no crop
    with pytest.raises(UserError, match="same size"):
        S.build_cache(D.scan(str(mixed)), plain, None, str(tmp_path / "c"), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["bad", "mixed"]


def _trainable(m):
    return {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}


def test_streamed_optimisation_equals_in_memory_and_resumes_bit_exactly(folder, tmp_path):
    tf = _model_transform()
    x, _ = D.load_subset(D.scan(str(folder)), tf, 20, seed=0)
    cache = S.build_cache(D.scan(str(folder)), tf, 20, str(tmp_path / "c"), workers=2, progress=False)
    fp = make_model("vit")
    q0 = calibrate(quantize_model(copy.deepcopy(fp), "w4a4"), cache.head(8))
    base = dict(method="e2e", iters=6, batch_size=6, progress=False, seed=2, warmup=2)
    q_mem = copy.deepcopy(q0)
    ref = optimize(q_mem, fp, x, OptimConfig(**base))
    state = str(tmp_path / "state.pt")
    q_part, q_res = copy.deepcopy(q0), copy.deepcopy(q0)
    part = optimize(q_part, fp, cache, OptimConfig(**base, save_every=3, state_path=state, stop_after=3))
    res = optimize(q_res, fp, cache, OptimConfig(**base, save_every=3, state_path=state, resume=True))
    assert not part["completed"] and res["completed"] and res["losses"] == ref["losses"]
    a, b = _trainable(q_mem), _trainable(q_res)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    # activation correction and is-vit (init batch + two block-wise stages) read the cache the same way
    for q in (q_mem, q_res):
        add_act_correction(q)
    h1 = train_act_correction(q_mem, fp, x, iters=4, batch_size=6, lr=1e-2, progress=False)
    h2 = train_act_correction(q_res, fp, cache, iters=4, batch_size=6, lr=1e-2, progress=False)
    assert h1["losses"] == h2["losses"]
    sos = dict(method="is-vit", iters=2, batch_size=6, progress=False)
    q_a, q_b = copy.deepcopy(q0), copy.deepcopy(q0)
    assert optimize(q_a, fp, x, OptimConfig(**sos))["losses"] == optimize(q_b, fp, cache, OptimConfig(**sos))["losses"]


def test_data_free_images_are_written_as_they_are_made(tmp_path, monkeypatch):
    from calib import invert
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, embed_dim=32,
                          depth=1, num_heads=2, num_classes=3).eval()
    on_disk = []
    real = invert.synthesize
    monkeypatch.setattr(invert, "synthesize", lambda *a, **k: on_disk.append(
        len(list((tmp_path / "syn").rglob("*.png")))) or real(*a, **k))
    write_image_folder(m, tmp_path / "syn", per_class=3, cfg=InvertConfig(steps=1, batch_size=2), progress=False)
    assert on_disk == [0, 2, 4, 6, 8]  # every batch on disk before the next is made: memory holds one batch
    assert sorted(p.name for p in (tmp_path / "syn").iterdir()) == [".synthesis.json", "0000", "0001", "0002"]
    assert len(list((tmp_path / "syn").rglob("*.png"))) == 9


SMALL96 = {"img_size": 96, "patch_size": 16, "embed_dim": 48, "depth": 1, "num_heads": 3, "num_classes": 3}


def test_peak_memory_does_not_grow_with_calib_size(tmp_path):
    """Two quant.run processes over one folder of 1,200 images (32x32 files, 96x96 model input): in memory the
    larger subset alone would take 1,136 x 3 x 96 x 96 x 4 B = 126 MB more; streamed, peak RSS stays put. The
    fidelity check is off in both: its held-out images differ with the calibration size (the folder's tail for 64, a
    synthesized batch with its autograd memory for 1,200, which leaves no tail)."""
    data = _write_images(tmp_path / "many", 1200, size=(32, 32))
    torch.manual_seed(0)
    ckpt = tmp_path / "vit.pth"
    torch.save(timm.create_model("vit_small_patch16_224", pretrained=False, **SMALL96).state_dict(), ckpt)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = {}
    for n in (64, 1200):
        procs[n] = subprocess.Popen(
            [sys.executable, "-m", "quant.run", "--model", "vit_s", "--bits", "w4a4", "--data", str(data),
             "--checkpoint", str(ckpt), "--model-args", json.dumps(SMALL96), "--calib-size", str(n),
             "--init-size", "8", "--iters", "3", "--batch-size", "8", "--workers", "1", "--no-progress",
             "--fidelity-size", "0", "--out", str(tmp_path / f"run{n}")], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
    rss = {}
    for n, p in procs.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        rep = json.loads((tmp_path / f"run{n}" / "report.json").read_text())
        assert rep["calib_images"] == n
        rss[n] = rep["peak_memory"]["cpu_max_rss_bytes"]
    assert not list(tmp_path.glob("run*.calib")), "the cache is removed when the run completes"
    in_memory_growth = (1200 - 64) * 3 * 96 * 96 * 4
    assert rss[1200] - rss[64] < 0.15 * in_memory_growth, (rss, in_memory_growth)
