"""Label-free fidelity (:mod:`quant.fidelity`): agreement and KL against plain torch, held-out images that the
calibration did not draw, and ``quant.run``'s report without ``--val``."""
import json

import pytest
import timm
import torch
import torch.nn.functional as F

from calib import data as D
from quant import fidelity as FI
from quant.run import main

from .ptq_utils import one_thread  # noqa: F401

SMALL = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3, "num_classes": 10}


def _model(seed):
    torch.manual_seed(seed)
    return timm.create_model("vit_small_patch16_224", pretrained=False, **SMALL).eval()


def test_agreement_and_kl_match_plain_torch():
    a, b = _model(0), _model(1)
    x = torch.randn(37, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    got = FI.agreement(a, b, x, batch_size=16)
    with torch.no_grad():
        la, lb = a(x).double(), b(x).double()
    want_agree = 100.0 * float((la.argmax(1) == lb.argmax(1)).double().mean())
    want_kl = float(F.kl_div(F.log_softmax(lb, 1), F.log_softmax(la, 1), log_target=True, reduction="batchmean"))
    assert got["images"] == 37
    assert got["top1_agreement"] == pytest.approx(want_agree, abs=1e-9)
    assert got["kl"] == pytest.approx(want_kl, rel=1e-9) and got["kl"] > 0
    same = FI.agreement(a, a, x)
    assert same["top1_agreement"] == 100.0 and same["kl"] == 0.0
    with pytest.raises(ValueError, match="at least one image"):
        FI.agreement(a, b, x[:0])


def test_folder_tail_is_held_out(imagenet_folder):
    folder = D.scan(str(imagenet_folder))
    tf = lambda im: torch.from_numpy(__import__("numpy").asarray(im.resize((8, 8)), dtype="float32"))  # noqa: E731
    calib = D.load_subset(folder, tf, 40, seed=3)[0]
    tail = FI.folder_tail(folder, tf, 25, skip=40, seed=3)
    assert tail.shape[0] == 25
    flat_c, flat_t = calib.flatten(1), tail.flatten(1)
    assert not (flat_t[:, None] == flat_c[None]).all(-1).any()  # no calibration image among the held-out ones
    assert FI.folder_tail(folder, tf, 10, skip=len(folder), seed=3).shape[0] == 0


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "vit_random.pth"
    torch.save(_model(0).state_dict(), path)
    return str(path)


@pytest.mark.parametrize("data", ["invert", "folder"])
def test_run_reports_fidelity_without_val(tmp_path, checkpoint, capsys, data, imagenet_folder):
    out = tmp_path / "run"
    rc = main(["--model", "vit_s", "--bits", "w4a4", "--checkpoint", checkpoint, "--model-args", json.dumps(SMALL),
               "--data", "invert" if data == "invert" else str(imagenet_folder), "--calib-size", "6",
               "--init-size", "4", "--iters", "2", "--batch-size", "4", "--invert-steps", "2", "--no-progress",
               "--workers", "0", "--out", str(out)]
              + ([] if data == "invert" else ["--fidelity-size", "20"]))
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    fid = rep["fidelity"]
    assert rep["quantized"] is None and fid["source"] == ("synthesized" if data == "invert" else "data")
    assert fid["images"] == (6 if data == "invert" else 20)  # default for synthesis: min(64, --calib-size)
    assert 0.0 <= fid["top1_agreement"] <= 100.0 and fid["kl"] >= 0.0
    table = capsys.readouterr().out
    assert f"held-out {fid['source']} images" in table and f"{fid['top1_agreement']:.2f}%" in table


def test_fidelity_size_flag(tmp_path, checkpoint, capsys):
    assert main(["--model", "vit_s", "--bits", "w4a4", "--checkpoint", checkpoint, "--fidelity-size", "-1",
                 "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.count("error: --fidelity-size must be >= 0") == 1


@pytest.mark.parametrize("prior,want", [("mixed", ["smooth", "noise", "smooth"]), ("noise", ["noise", "noise"])])
def test_synthesized_fidelity_images_follow_a_mixture_prior(monkeypatch, prior, want):
    """A mixture prior alternates over half-size batches (both kinds even in one calibration batch's worth); a
    single prior keeps whole batches."""
    from calib import invert
    seen = []
    monkeypatch.setattr(invert, "synthesize", lambda m, y, cfg, **k: seen.append((cfg.prior, len(y))) or
                        torch.rand(len(y), 3, 32, 32))
    x = FI.synthesized(_model(0), lambda img: torch.zeros(3, 32, 32), 80, steps=1, seed=0, prior=prior)
    assert x.shape == (80, 3, 32, 32)
    assert [p for p, _ in seen] == want
    assert [n for _, n in seen] == ([32, 32, 16] if prior == "mixed" else [64, 16])
