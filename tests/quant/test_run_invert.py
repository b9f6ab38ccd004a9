"""``quant.run`` with the default data-free calibration (``--data invert``) and per-model run defaults."""
import json
import os

import pytest
import timm
import torch

from lowbit import models as M
from quant.run import main

from .ptq_utils import one_thread  # noqa: F401

SMALL = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3, "num_classes": 10}


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "vit_random.pth"
    torch.save(timm.create_model("vit_small_patch16_224", pretrained=False, **SMALL).state_dict(), path)
    return str(path)


def test_data_free_default(tmp_path, checkpoint, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = main(["--model", "vit_s", "--bits", "w4a4", "--checkpoint", checkpoint, "--model-args", json.dumps(SMALL),
               "--calib-size", "6", "--init-size", "4", "--iters", "2", "--batch-size", "4", "--invert-steps", "3",
               "--no-progress", "--workers", "0"])
    assert rc == 0
    out = tmp_path / "runs" / "vit_s-w4a4-e2e"  # default --out
    rep = json.loads((out / "report.json").read_text())
    assert rep["data"] == "invert" and rep["calib_images"] == 6 and rep["steps"] == 2
    assert sorted(os.listdir(tmp_path / "runs")) == ["vit_s-w4a4-e2e"]  # synthesized folder cleaned up


@pytest.mark.parametrize("synthesis", ["lowbit", "psaq"])
def test_synthesis_flag_reaches_the_inversion(tmp_path, checkpoint, monkeypatch, synthesis):
    from calib import invert
    seen = []
    real = invert.synthesize
    monkeypatch.setattr(invert, "synthesize", lambda m, y, cfg, **k: seen.append(cfg.synthesis) or real(m, y, cfg, **k))
    argv = ["--model", "vit_s", "--bits", "w4a4", "--checkpoint", checkpoint, "--model-args", json.dumps(SMALL),
            "--calib-size", "4", "--init-size", "4", "--iters", "1", "--batch-size", "4", "--invert-steps", "2",
            "--no-progress", "--workers", "0", "--out", str(tmp_path / "o")]
    assert main(argv + ([] if synthesis == "lowbit" else ["--synthesis", synthesis])) == 0
    assert seen and set(seen) == {synthesis}


@pytest.mark.parametrize("bits,flag,prior", [("w1.58a8", None, "smooth"), ("w4a4", None, "mixed"),
                                              ("w4a4", "smooth", "smooth"), ("w1.58a8", "noise", "noise"),
                                              ("w1.58a8", "mixed", "mixed")])
def test_invert_prior_auto_follows_the_activation_bits(tmp_path, checkpoint, monkeypatch, bits, flag, prior):
    """``--invert-prior auto`` (the default): smooth images for 8-bit activations, mixed ones below; the calibration
    set and the synthesized fidelity images use the same prior (a mixture: its first for batch 0), and the report
    records it."""
    from calib import invert
    from calib.invert import MIXTURES, PRIORS
    seen = []
    real = invert.synthesize
    monkeypatch.setattr(invert, "synthesize", lambda m, y, cfg, **k: seen.append(
        (cfg.for_batch(0).prior, cfg.for_batch(0).w_tv)) or real(m, y, cfg, **k))
    argv = ["--model", "vit_s", "--bits", bits, "--checkpoint", checkpoint, "--model-args", json.dumps(SMALL),
            "--calib-size", "4", "--init-size", "4", "--iters", "1", "--batch-size", "4", "--invert-steps", "2",
            "--no-progress", "--workers", "0", "--out", str(tmp_path / "o")]
    assert main(argv + ([] if flag is None else ["--invert-prior", flag])) == 0
    first = MIXTURES.get(prior, (prior,))[0]
    assert len(seen) >= 2 and set(seen) == {(first, PRIORS[first]["w_tv"])}
    assert json.loads((tmp_path / "o" / "report.json").read_text())["invert_prior"] == prior


def test_demo_run_defaults():
    spec = M.resolve("demo")
    assert spec.run_defaults["iters"] < 24000 and spec.crop_pct == 1.0
    assert spec.mean is not None and spec.std is not None
