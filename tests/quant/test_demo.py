"""The shipped demo model and the newcomer's command (``python -m quant.run --model demo --bits w4a4``), shortened."""
import json
import os

import pytest
import torch

import export
from calib import data as D
from lowbit import models as M
from lowbit.zoo.demo import demo_card
from quant.run import evaluate, main

from .ptq_utils import one_thread  # noqa: F401


@pytest.mark.data
def test_demo_reaches_recorded_accuracy(real_data):
    """The recorded top-1 on the first 500 seeded CIFAR-10 test images: only the real test set can show it."""
    card = demo_card()
    assert card is not None, "lowbit/zoo/demo_vit.json is missing: train the demo (python -m bench.train_demo)"
    model = M.load_model("demo")
    acc = evaluate({"fp": model}, D.scan(str(real_data / "cifar10" / "test"), "--val"), M.eval_transform(model, M.resolve("demo")),
                   100, torch.device("cpu"), size=500, seed=0)["fp"]
    assert acc["images"] == 500
    assert abs(acc["top1"] - 100 * card["test500_top1"]) <= 1.0


def test_newcomer_command_shortened(tmp_path, monkeypatch, capsys, cifar_root):
    monkeypatch.chdir(tmp_path)
    rc = main(["--model", "demo", "--bits", "w4a4", "--iters", "3", "--calib-size", "10", "--invert-steps", "2",
               "--val", str(cifar_root / "test"), "--val-size", "50", "--no-progress", "--workers", "0"])
    assert rc == 0
    out = tmp_path / "runs" / "demo-w4a4-e2e"
    assert sorted(p.name for p in out.iterdir()) == ["model.lowbit", "quantized.pt", "report.json", "report.txt"]
    rep = json.loads((out / "report.json").read_text())
    assert rep["data"] == "invert" and rep["steps"] == 3 and rep["quantized"]["images"] == 50
    assert rep["export"]["bytes"] == (out / "model.lowbit").stat().st_size
    printed = capsys.readouterr().out
    assert "quantized top-1" in printed
    assert str(out / "model.lowbit") in printed.split("exported model", 1)[1].splitlines()[0]
    assert f"{out}{os.sep} (report.txt, report.json, quantized.pt)" in printed  # where the run wrote what
    assert printed == (out / "report.txt").read_text()
    loaded = export.load(out / "model.lowbit")
    folder = D.scan(str(cifar_root / "test"), "--val")
    acc = evaluate({"packed": loaded}, folder, M.eval_transform(M.load_model("demo"), M.resolve("demo")), 25,
                   torch.device("cpu"), size=50, seed=0)["packed"]
    assert abs(acc["top1"] - rep["quantized"]["top1"]) <= 2.0  # at most one of 50 images differs (integer path)


def test_data_free_images_are_recognised_by_the_demo(tmp_path):
    """Classifier-only synthesis (``--data invert``) makes images the FP demo labels as their target class."""
    from calib.invert import InvertConfig, write_image_folder

    model = M.load_model("demo")
    out = write_image_folder(model, tmp_path / "syn", per_class=2, cfg=InvertConfig(steps=60, batch_size=20),
                             progress=False)
    folder = D.scan(str(out), "--data")
    acc = evaluate({"fp": model}, folder, M.eval_transform(model, M.resolve("demo")), 20, torch.device("cpu"))["fp"]
    assert acc["images"] == 20 and acc["top1"] > 80.0
