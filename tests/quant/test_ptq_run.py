"""``python -m quant.run`` end to end on real images, and its errors (which leave no output behind)."""
import json
import os

import pytest
import timm
import torch

from calib import data as D
from lowbit import models as M
from quant.modules import set_mode
from quant.run import evaluate, main, state_path
from quant.saved import load_quantized

from .ptq_utils import one_thread  # noqa: F401

SMALL = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "deit_small_random.pth"
    torch.save(timm.create_model("deit_tiny_patch16_224", pretrained=False, **SMALL).state_dict(), path)
    return str(path)


def _args(out, checkpoint, data, *extra):
    return ["--model", "deit_t", "--bits", "w4a4", "--data", str(data), "--out", str(out),
            "--checkpoint", checkpoint, "--model-args", json.dumps(SMALL), "--calib-size", "16", "--init-size", "8",
            "--iters", "4", "--batch-size", "8", "--no-progress", "--workers", "0", *extra]


def test_cli_end_to_end(tmp_path, checkpoint, capsys, imagenet_folder):
    out = tmp_path / "runs" / "deit_w4a4"
    rc = main(_args(out, checkpoint, imagenet_folder, "--val", str(imagenet_folder), "--val-size", "16", "--save-every", "2"))
    assert rc == 0
    assert sorted(os.listdir(out)) == ["quantized.pt", "report.json", "report.txt"]
    assert os.listdir(out.parent) == ["deit_w4a4"]  # no temp folder, no leftover state file
    assert not os.path.exists(state_path(str(out)))
    rep = json.loads((out / "report.json").read_text())
    assert rep["timm_name"] == "deit_tiny_patch16_224.fb_in1k" and rep["fp_top1_literature"] == 72.21
    assert rep["bits"] == "w4a4" and rep["method"] == "e2e" and rep["steps"] == 4 and rep["calib_images"] == 16
    for k in ("fp", "quantized"):
        assert rep[k]["images"] == 16 and 0 <= rep[k]["top1"] <= rep[k]["top5"] <= 100
    assert rep["size"]["quantized_bytes"] < rep["size"]["fp32_bytes"] / 3
    assert rep["peak_memory"]["cpu_max_rss_bytes"] > 0 and rep["time_s"] > 0
    assert isinstance(rep["skipped_images"]["calib"], int)
    table = capsys.readouterr().out
    assert "quantized top-1 / top-5" in table and table == (out / "report.txt").read_text()
    saved = torch.load(out / "quantized.pt", weights_only=False)
    assert saved["bits"] == "w4a4" and any(k.endswith("dW") for k in saved["state_dict"])
    rebuilt = load_quantized(str(out / "quantized.pt"))
    folder = D.scan(str(imagenet_folder))
    acc = evaluate({"q": rebuilt}, folder, M.eval_transform(rebuilt, M.resolve("deit_t")), 8, torch.device("cpu"), 16)
    assert acc["q"] == rep["quantized"]
    sd = rebuilt.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in saved["state_dict"].items())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        yq = rebuilt(x)
        set_mode(rebuilt, "float")
        yf = rebuilt(x)
    assert torch.isfinite(yq).all() and not torch.allclose(yq, yf, atol=1e-4)


def _offline(monkeypatch):
    monkeypatch.setattr(M, "hub_reachable", lambda endpoint, timeout=3.0: False)


BAD = {
    "unknown model": (["--model", "vit_nope"], "unknown model 'vit_nope'; use one of the aliases deit_b"),
    "bad bits": (["--bits", "w5a4"], "--bits: unsupported bit spec"),
    "missing data": (["--data", "/nonexistent/folder"], "--data folder '/nonexistent/folder' does not exist"),
    "empty data": (["--data", "EMPTY"], "holds no images"),
    "offline weights": (["--checkpoint", None], "pass --checkpoint PATH"),
    "no cuda": (["--device", "cuda"], "CUDA is not available"),
    "bad model args": (["--model-args", "[1]"], "--model-args must be a JSON object"),
    "bad hard steps": (["--hard-steps", "-1"], "--hard-steps must be >= 0, got -1"),
    "bad hard step size": (["--hard-step-size", "0"], "--hard-step-size must be > 0, got 0.0"),
    "no val images": (["--val-size", "0"], "--val-size must be >= 1, got 0"),
    "negative val size": (["--val-size", "-9990"], "--val-size must be >= 1, got -9990"),
    "bad augment": (["--augment", "flip,crop"], "--augment: unknown augmentation 'crop'; use 'none' or a comma list"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_cli_errors_leave_no_output(tmp_path, checkpoint, capsys, monkeypatch, case, imagenet_folder):
    if case == "no cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is present on this machine")
    _offline(monkeypatch)
    override, message = BAD[case]
    args = _args(tmp_path / "runs" / "out", checkpoint, imagenet_folder)
    flag, value = override
    if value == "EMPTY":
        value = str(tmp_path / "empty")
        os.makedirs(os.path.join(value, "class_a"))
    if flag in args:
        i = args.index(flag)
        args[i:i + 2] = [] if value is None else [flag, value]
    else:
        args += [flag, value]
    if case == "offline weights":
        args[args.index("deit_t")] = "vit_tiny_r_s16_p8_224"  # a model that is certainly not in the local cache
        args[args.index("--model-args") + 1] = "{}"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "runs").exists()


def test_cli_refuses_existing_out_and_missing_resume_state(tmp_path, checkpoint, capsys, imagenet_folder):
    out = tmp_path / "out"
    out.mkdir()
    assert main(_args(out, checkpoint, imagenet_folder)) == 2
    assert "already exists" in capsys.readouterr().err and os.listdir(out) == []
    assert main(_args(tmp_path / "fresh", checkpoint, imagenet_folder, "--resume")) == 2
    assert "no checkpoint" in capsys.readouterr().err and not (tmp_path / "fresh").exists()


def test_registry_and_preprocessing(tmp_path):
    assert M.resolve("swin_b").timm_name == "swin_base_patch4_window7_224.ms_in22k_ft_in1k"
    assert M.resolve("deit_s").crop_pct == 0.875 and M.resolve("vit_b").crop_pct == 0.9
    assert M.resolve("deit_small_patch16_224").crop_pct == 0.875
    built = []
    M.register_model("tiny_test", loader=lambda ckpt, kw: built.append((ckpt, kw)) or timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, **SMALL), fp_top1=50.0, crop_pct=1.0, mean=(0.5,) * 3, std=(0.5,) * 3)
    try:
        model = M.load_model("tiny_test", "w.pth", {"a": 1})
        assert built == [("w.pth", {"a": 1})] and not model.training
        tf = M.eval_transform(model, M.resolve("tiny_test"))
        from PIL import Image
        x = tf(Image.new("RGB", (50, 40), (255, 0, 128)))
        assert x.shape == (3, 32, 32)
        assert torch.allclose(x[:, 5, 5], torch.tensor([1.0, -1.0, (128 / 255 - 0.5) / 0.5]), atol=1e-2)
    finally:
        M._REGISTRY.pop("tiny_test")
    with pytest.raises(M.UserError, match="does not match"):
        bad = tmp_path / "bad.pth"
        torch.save({"foo": torch.zeros(1)}, bad)
        M.load_model("deit_t", str(bad), SMALL)


def test_cli_stop_and_resume_equals_uninterrupted(tmp_path, checkpoint, capsys, imagenet_folder):
    ref, out = tmp_path / "ref", tmp_path / "resumed"
    flags = ["--iters", "5", "--save-every", "2", "--method", "e2e"]
    assert main(_args(ref, checkpoint, imagenet_folder, *flags)) == 0
    assert main(_args(out, checkpoint, imagenet_folder, *flags, "--stop-after", "2")) == 0
    assert "continue with the same flags and --resume" in capsys.readouterr().err
    assert not out.exists() and os.path.isfile(state_path(str(out)))
    assert main(_args(out, checkpoint, imagenet_folder, *flags, "--resume")) == 0
    assert not os.path.exists(state_path(str(out)))
    a = torch.load(ref / "quantized.pt", weights_only=False)["state_dict"]
    b = torch.load(out / "quantized.pt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (ref, out))
    assert ra["losses"] == rb["losses"] and rb["steps"] == 5


def test_unwritable_outputs_are_refused_before_any_work(tmp_path, checkpoint, capsys, imagenet_folder, monkeypatch):
    """``--out`` under a file or in a folder that cannot be written, ``--out`` naming a file even with
    ``--overwrite``, and an ``--export`` folder that cannot be written: one error line, exit 2, before the model is
    even built."""
    from quant import run as RUN
    monkeypatch.setattr(RUN, "load_model", lambda *a, **k: pytest.fail("built the model before refusing"))
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [(["--out", str(afile / "out")], "is a file, not a folder"),
             (["--out", str(afile), "--overwrite"], "is a file, not a folder; pick another path"),
             (["--export", str(afile / "m.lowbit")], "--export")]
    if os.path.isdir("/proc/self"):  # a read-only file system even for root
        cases += [(["--out", "/proc/self/lowbit-out"], "cannot write in /proc/self"),
                  (["--export", "/proc/self/m.lowbit"], "--export '/proc/self/m.lowbit': cannot write in")]
    for extra, msg in cases:
        assert main(_args(tmp_path / "runs" / "out", checkpoint, imagenet_folder, *extra)) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and msg in err, (extra, err)
    assert not (tmp_path / "runs").exists()


def test_second_run_on_the_same_out_is_refused(tmp_path, checkpoint, capsys, imagenet_folder):
    """While a live process holds ``<out>.lock`` a second run on that --out is refused before any work; a lock left
    by a dead process is taken over, and a finished run leaves none."""
    import subprocess
    import sys

    from quant.run import lock_path
    out = tmp_path / "runs" / "out"
    out.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out.parent / "out.lock").write_text(str(holder.pid))
        assert main(_args(out, checkpoint, imagenet_folder)) == 2
        err = capsys.readouterr().err
        assert f"is being written by another quant.run (process {holder.pid}); wait for it" in err
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    assert lock_path(str(out)) == str(out.parent / "out.lock")
    assert main(_args(out, checkpoint, imagenet_folder)) == 0  # the holder is dead: its lock is taken over
    assert sorted(os.listdir(out.parent)) == ["out"]


def test_small_calibration_folder_warns(tmp_path, checkpoint, capsys):
    """A folder with fewer images than --calib-size: one warning line, the run calibrates on what there is; a batch
    larger than the images is cut to them with a warning (it repeated images, and a huge one filled the memory)."""
    from tests.images import write_image_folder
    few = write_image_folder(tmp_path / "few", ["a", "b"], 3)
    args = _args(tmp_path / "out", checkpoint, few, "--batch-size", "4", "--fidelity-size", "0")
    assert main(args) == 0
    err = capsys.readouterr().err
    assert err == "warning: --data holds 6 images, fewer than --calib-size 16: calibrating on 6\n"
    assert json.loads((tmp_path / "out" / "report.json").read_text())["calib_images"] == 6
    assert main(_args(tmp_path / "out2", checkpoint, few, "--batch-size", "4", "--fidelity-size", "4",
                      "--invert-steps", "2")) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[1].startswith("warning: --data has no images beyond the 6 it calibrates on, so")
    assert json.loads((tmp_path / "out2" / "report.json").read_text())["fidelity"]["source"] == "synthesized"
    assert main(_args(tmp_path / "out3", checkpoint, few, "--batch-size", "100000", "--fidelity-size", "0")) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[1] == "warning: --batch-size 100000 is larger than the 6 calibration images: using --batch-size 6"
    assert json.loads((tmp_path / "out3" / "report.json").read_text())["batch_size"] == 6


def test_ctrl_c_keeps_the_checkpoint_and_says_how_to_resume(tmp_path, checkpoint, capsys, imagenet_folder,
                                                           monkeypatch):
    """Ctrl-C during the optimisation: exit status 130, one line naming the last checkpoint and --resume (no
    traceback); resuming finishes the run."""
    from quant import optimize as O
    real, calls = O.train_step, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(O, "train_step", interrupted)
    out = tmp_path / "run"
    assert main(_args(out, checkpoint, imagenet_folder, "--save-every", "1")) == 130
    err = capsys.readouterr().err
    assert err == f"interrupted; the last checkpoint is {state_path(str(out))}: continue with the same flags and " \
                  "--resume\n"
    monkeypatch.setattr(O, "train_step", real)
    assert main(_args(out, checkpoint, imagenet_folder, "--save-every", "1", "--resume")) == 0
    assert json.loads((out / "report.json").read_text())["steps"] == 4
    calls.clear()
    monkeypatch.setattr(O, "train_step", interrupted)
    assert main(_args(tmp_path / "other", checkpoint, imagenet_folder)) == 130
    assert "nothing to resume (--save-every N" in capsys.readouterr().err


def test_cli_forward_flag(tmp_path, checkpoint, capsys, imagenet_folder):
    """``--forward fake`` trains with the float fake-quant forward (a different run from the default integer one:
    resuming its checkpoint under the other forward is refused); a bad value exits with status 2."""
    out = tmp_path / "fake"
    flags = ["--iters", "3", "--save-every", "1"]
    assert main(_args(out, checkpoint, imagenet_folder, *flags, "--forward", "fake", "--stop-after", "1")) == 0
    capsys.readouterr()
    assert main(_args(out, checkpoint, imagenet_folder, *flags, "--resume")) == 2
    err = capsys.readouterr().err
    assert "other settings: forward: fake -> int;" in err and err.count("\n") == 1 and len(err) < 400, err
    assert main(_args(out, checkpoint, imagenet_folder, *flags, "--forward", "fake", "--resume")) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["forward"] == "fake" and rep["steps"] == 3 and rep["optimize_s"] > 0
    assert "(fake forward)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(_args(tmp_path / "bad", checkpoint, imagenet_folder, "--forward", "float"))
    assert e.value.code == 2 and "error: argument --forward: invalid choice" in capsys.readouterr().err


def test_model_size_counts_packed_codes():
    from quant.modules import QuantConv2dPatch, QuantLinear, quant_modules
    from quant.run import model_size
    from quant.surgery import quantize_model

    from .ptq_utils import make_model
    fp = make_model("vit")
    sizes = {b: model_size(fp, quantize_model(make_model("vit"), b)) for b in ("w8a8", "w4a4", "w1.58a8", "w4a16")}
    assert len({s["fp32_bytes"] for s in sizes.values()}) == 1
    weights = [m.weight for m in quant_modules(quantize_model(make_model("vit"), "w4a4"))
               if isinstance(m, (QuantLinear, QuantConv2dPatch))]
    nk = sum(w.numel() for w in weights)
    assert sizes["w8a8"]["quantized_bytes"] - sizes["w4a4"]["quantized_bytes"] == nk // 2
    assert sizes["w4a4"]["quantized_bytes"] - sizes["w1.58a8"]["quantized_bytes"] == nk // 4
    assert sizes["w8a8"]["quantized_bytes"] < sizes["w8a8"]["fp32_bytes"] / 3
    assert sizes["w4a16"]["quantized_bytes"] < sizes["w4a4"]["quantized_bytes"]  # no activation quantizers
