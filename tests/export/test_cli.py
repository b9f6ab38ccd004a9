"""``quant.run --export`` and ``python -m export.infer`` end to end on a tiny random-init model and a generated image folder."""
import json
import os

import pytest
import timm
import torch

import export
from export import format as fmt
from export.infer import main as infer_main
from quant.modules import set_mode
from quant.run import main as run_main
from quant.saved import load_quantized
from tests.quant.ptq_utils import one_thread  # noqa: F401

SMALL = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "deit_tiny_random.pth"
    torch.save(timm.create_model("deit_tiny_patch16_224", pretrained=False, **SMALL).state_dict(), path)
    return str(path)


def _run(out, weights, data, *extra):
    return run_main(["--model", "deit_t", "--bits", "w4a8", "--data", str(data), "--out", str(out),
                     "--checkpoint", weights, "--model-args", json.dumps(SMALL), "--calib-size", "8",
                     "--init-size", "8", "--iters", "2", "--batch-size", "8", "--no-progress", "--workers", "0",
                     *extra])


def test_run_export_then_infer(tmp_path, weights, capsys, imagenet_folder):
    ck = tmp_path / "ckpt" / "deit.lowbit"
    assert _run(tmp_path / "run", weights, imagenet_folder, "--export", str(ck)) == 0
    assert os.listdir(ck.parent) == ["deit.lowbit"]  # atomic: no temp file left
    umask = os.umask(0)
    os.umask(umask)
    assert ck.stat().st_mode & 0o777 == 0o666 & ~umask  # as the run's other outputs, not mkstemp's 0600
    man = fmt.read_manifest(ck)
    assert man["architecture"] == "deit_t" and man["bits"] == "w4a8" and man["model_args"] == SMALL
    assert man["preprocess"]["crop_pct"] == 0.875
    q = load_quantized(str(tmp_path / "run" / "quantized.pt"))
    m = export.load(ck)
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    set_mode(q, "int")
    with torch.no_grad():
        a, b = q(x), m(x)
    # the run rounds its float tensors to the file's fp16 and evaluates in "int" mode: the file computes the same
    assert torch.equal(a, b)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["eval_arithmetic"].startswith("int")

    capsys.readouterr()
    assert infer_main(["--checkpoint", str(ck), "--val", str(imagenet_folder), "--val-size", "48",
                       "--batch-size", "16", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "on 48 images" in out and "images/s" in out
    top1 = float(out.split("top-1 ")[1].split("%")[0])
    assert 0.0 <= top1 <= 100.0


def test_run_export_refuses_existing(tmp_path, weights, capsys, imagenet_folder):
    ck = tmp_path / "deit.lowbit"
    ck.write_bytes(b"keep me")
    assert _run(tmp_path / "run", weights, imagenet_folder, "--export", str(ck)) == 2
    assert "--export" in capsys.readouterr().err and ck.read_bytes() == b"keep me"
    assert not (tmp_path / "run").exists()  # refused before any work
    assert _run(tmp_path / "run", weights, imagenet_folder, "--export", str(ck), "--overwrite") == 0
    assert fmt.read_manifest(ck)["bits"] == "w4a8"


@pytest.mark.parametrize("device,msg", [("gpu", "unknown --device 'gpu'; use cpu or cuda[:N]"),
                                        ("cuda", "--device cuda asked for but CUDA is not available"),
                                        ("mps", "unsupported --device 'mps'; use cpu or cuda[:N]")])
def test_infer_bad_device_is_one_error_line(tmp_path, capsys, imagenet_folder, device, msg):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is present on this machine")
    assert infer_main(["--checkpoint", str(tmp_path / "none.lowbit"), "--val", str(imagenet_folder),
                       "--device", device]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and msg in err, err


def test_infer_warns_on_a_folder_with_some_of_the_classes(tmp_path, weights, capsys, imagenet_folder, cifar_root):
    """A --val folder of 10 classes for a 1,000-class model: scored, with one warning line that says why the top-1
    may mean nothing; more class folders than the model has classes: refused (calib.data.check_val_classes)."""
    from calib import data as D
    from lowbit.errors import UserError
    ck = tmp_path / "deit.lowbit"
    assert _run(tmp_path / "run", weights, imagenet_folder, "--export", str(ck)) == 0
    capsys.readouterr()
    assert infer_main(["--checkpoint", str(ck), "--val", str(cifar_root / "test"), "--val-size", "8",
                       "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert err == ("warning: --val holds 10 class folders of the model's 1000: label i is the i-th folder in sorted "
                   "order, so top-1 is meaningful only with a folder for every class\n")
    folder = D.scan(str(cifar_root / "test"))
    assert D.check_val_classes(folder, 10) is None
    with pytest.raises(UserError, match="has 10 class folders but the model predicts 4 classes"):
        D.check_val_classes(folder, 4, "--val")


def test_infer_refuses_more_class_folders_than_classes(tmp_path, capsys, imagenet_folder, cifar_root):
    """A 4-class model on a 10-class --val folder: one error line, exit 2 (it scored 0.00% and exited 0)."""
    small = {**SMALL, "num_classes": 4}
    torch.manual_seed(0)
    w = tmp_path / "w4.pth"
    torch.save(timm.create_model("deit_tiny_patch16_224", pretrained=False, **small).state_dict(), w)
    ck = tmp_path / "four.lowbit"
    assert run_main(["--model", "deit_t", "--bits", "w4a8", "--data", str(imagenet_folder), "--out",
                     str(tmp_path / "run"), "--checkpoint", str(w), "--model-args", json.dumps(small), "--calib-size",
                     "8", "--init-size", "8", "--iters", "1", "--batch-size", "8", "--no-progress", "--workers", "0",
                     "--fidelity-size", "0", "--export", str(ck)]) == 0
    capsys.readouterr()
    assert infer_main(["--checkpoint", str(ck), "--val", str(cifar_root / "test"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: --val has 10 class folders but the model predicts 4 classes; pass a validation folder "
                   "of this model's classes\n")


def test_predict_unlabelled_images(tmp_path, weights, capsys, imagenet_folder):
    """``--images DIR``: the top-k classes of every image (nested folders, grayscale, a corrupt file skipped with a
    warning), printed or written as JSON / CSV, equal to the loaded model's softmax on the checkpoint's
    preprocessing."""
    import csv

    from calib import data as D
    from export.infer import transform_from
    from tests.images import write_image_folder
    ck = tmp_path / "deit.lowbit"
    assert _run(tmp_path / "run", weights, imagenet_folder, "--export", str(ck)) == 0
    pics = tmp_path / "pics"
    write_image_folder(pics / "a" / "deep", ["x"], 2, sizes=[(50, 70)], gray_every=2)
    write_image_folder(pics, ["b"], 3, sizes=[(40, 40)], ext=".png")
    (pics / "broken.jpg").write_bytes(b"not an image")
    capsys.readouterr()
    assert infer_main(["--checkpoint", str(ck), "--images", str(pics), "--top-k", "3", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 5 and all(len(line.split("  ")) == 4 for line in lines)
    assert err.startswith("warning: 1 unreadable files skipped (first: ") and "broken.jpg" in err
    js = tmp_path / "p.json"
    assert infer_main(["--checkpoint", str(ck), "--images", str(pics), "--top-k", "3", "--output", str(js),
                       "--no-progress", "--batch-size", "2"]) == 0
    rows = json.loads(js.read_text())
    m = export.load(ck)
    tf = transform_from(m.lowbit_manifest)
    x = torch.stack([tf(D.load_rgb(r["path"])) for r in rows])
    with torch.no_grad():
        ref = m(x).softmax(-1).topk(3)
    assert [[t["class"] for t in r["top"]] for r in rows] == ref.indices.tolist()
    torch.testing.assert_close(torch.tensor([[t["prob"] for t in r["top"]] for r in rows]), ref.values)
    assert [line.split("  ")[0] for line in lines] == [r["path"] for r in rows]
    cs = tmp_path / "p.csv"
    assert infer_main(["--checkpoint", str(ck), "--images", str(pics), "--top-k", "2", "--output", str(cs),
                       "--no-progress"]) == 0
    table = list(csv.reader(cs.open()))
    assert table[0] == ["path", "class1", "prob1", "class2", "prob2"] and len(table) == 6
    capsys.readouterr()
    for bad, msg in ((["--output", str(tmp_path / "p.txt")], "name a .json or .csv file"),
                     (["--top-k", "0"], "--top-k must be >= 1"),
                     (["--output", str(tmp_path / "nope" / "p.json")], "its folder does not exist")):
        assert infer_main(["--checkpoint", str(ck), "--images", str(pics), *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and msg in err, err
    with pytest.raises(SystemExit):
        infer_main(["--checkpoint", str(ck), "--images", str(pics), "--val", str(pics)])


def test_infer_errors(tmp_path, capsys, imagenet_folder):
    assert infer_main(["--checkpoint", str(tmp_path / "none.lowbit"), "--val", str(imagenet_folder)]) == 2
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.lowbit"
    bad.write_bytes(b"\x00" * 64)
    assert infer_main(["--checkpoint", str(bad), "--val", str(imagenet_folder)]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err


def test_run_export_with_act_correction_and_sulq(tmp_path, weights, imagenet_folder):
    """``--act-correction --softmax-quantizer sulq --export``: the file carries the trained correction matrices
    (fp32, bit-exact) and SULQ quantizers, loads, and matches the run's saved fake-quant model."""
    ck = tmp_path / "deit.lowbit"
    assert _run(tmp_path / "run", weights, imagenet_folder, "--export", str(ck), "--act-correction", "--correction-iters", "3",
                "--softmax-quantizer", "sulq") == 0
    tensors, man = fmt.load(ck)
    assert man["act_correction"] == ["blocks.0", "blocks.1"]
    assert all(e["p_quantizer"] == "sulq" for e in man["modules"] if e["kind"] == "vit_attention")
    q = load_quantized(str(tmp_path / "run" / "quantized.pt"))
    for b in man["act_correction"]:
        mat = q.get_submodule(b).act_correction.matrix.detach()
        assert not torch.equal(mat, torch.eye(mat.shape[0]))  # trained
        assert torch.equal(tensors[f"quant.{b}.act_correction.matrix"], mat)
    m = export.load(ck)
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    set_mode(q, "int")
    with torch.no_grad():
        a, b = q(x), m(x)
    assert torch.equal(a, b)


def test_reported_top1_is_the_exported_files(tmp_path, weights, capsys, imagenet_folder):
    """quant.run evaluates the model as deployed, so export.infer on the same images reports the same top-1."""
    ck = tmp_path / "deit.lowbit"
    assert _run(tmp_path / "run", weights, imagenet_folder, "--export", str(ck), "--val", str(imagenet_folder), "--val-size", "48") == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    capsys.readouterr()
    assert infer_main(["--checkpoint", str(ck), "--val", str(imagenet_folder), "--val-size", "48",
                       "--batch-size", "8", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert report["quantized"]["images"] == 48 and f"top-1 {report['quantized']['top1']:.2f}%" in out
