"""``python -m bench.tsne``: the exact t-SNE itself, the command end to end on tiny settings, its bad-input exit, and
the ACCURACY.md section that links the figure."""
import json
import math
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from bench import accuracy as A
from bench import tsne as T
from tests.quant.ptq_utils import one_thread  # noqa: F401 (autouse: one intra-op thread)

ROOT = Path(__file__).resolve().parents[1]


def test_conditional_p_hits_the_perplexity(gen):
    x = torch.randn(120, 8, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 3, 8, dtype=torch.float64)
    p = T.conditional_p(torch.cdist(x, x).pow(2), perplexity=15.0)
    assert torch.allclose(p.sum(1), torch.ones(120, dtype=torch.float64))
    assert (p.diagonal() == 0).all()
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum(1)
    assert torch.allclose(entropy.exp(), torch.full((120,), 15.0, dtype=torch.float64), rtol=1e-3)


def test_tsne_keeps_separated_clusters_apart(gen):
    centres = torch.randn(3, 20, generator=gen) * 8
    x = torch.cat([c + torch.randn(50, 20, generator=gen) for c in centres])
    label = torch.arange(3).repeat_interleave(50)
    y, kl = T.tsne(x, perplexity=15, iters=400, progress=False)
    assert y.shape == (150, 2) and torch.isfinite(y).all() and 0 < kl < 2
    assert T.same_source_share(y, label, k=10).min() == 1.0  # every 2-D neighbourhood stays in its cluster
    y2, kl2 = T.tsne(x, perplexity=15, iters=400, progress=False)
    assert torch.equal(y, y2) and kl == kl2  # deterministic
    shuffled = label[torch.randperm(150, generator=gen)]
    assert T.same_source_share(y, shuffled, k=10).mean() < 0.6  # the share measure can tell


def test_tsne_command_on_tiny_settings(tmp_path, capsys, cifar_root):
    extra = tmp_path / "extra"  # a further source laid out by class name, like a generated ImageFolder
    for cls in sorted(os.listdir(cifar_root / "train")):
        (extra / cls).mkdir(parents=True)
        for name in sorted(os.listdir(cifar_root / "train" / cls))[:4]:
            (extra / cls / name).symlink_to((cifar_root / "train" / cls / name).resolve())
    out = tmp_path / "fig"
    argv = ["--data", str(cifar_root), "--out", str(out), "--classes", "1,6", "--real-per-class", "8",
            "--free-per-class", "3", "--invert-steps", "2", "--free-dir", str(tmp_path / "free"), "--images",
            f"train={extra}", "--perplexity", "4", "--iters", "60", "--no-progress"]
    assert T.main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    res = json.loads((out / "tsne.json").read_text())
    assert [s["name"] for s in res["sources"]] == ["real (cifar10/test)", "data-free (calib.invert, smooth prior)",
                                                  "train"]
    assert [s["images"] for s in res["sources"]] == [16, 6, 8]
    assert res["settings"]["class_names"] == ["automobile", "frog"] and res["settings"]["invert_steps"] == 2
    pts = res["points"]
    assert len(pts) == 30 and {p["class"] for p in pts} == {1, 6} and {p["source"] for p in pts} == {0, 1, 2}
    assert all(math.isfinite(p["x"]) and math.isfinite(p["y"]) for p in pts)
    assert all(0 <= s["knn_same_source"] <= 1 and 0 <= s["top1"] <= 100 for s in res["sources"])
    with Image.open(out / "tsne.png") as im:
        assert im.format == "PNG" and im.size[0] > 400
    assert sorted(p.name for p in out.iterdir()) == ["tsne.json", "tsne.png"]  # no temp files left
    # the data-free images are kept there, with the record of their synthesis time
    assert sorted(os.listdir(tmp_path / "free")) == [".synthesis.json", "0001", "0006"]


@pytest.mark.parametrize("argv, message", [
    (["--data", "/nonexistent/cifar"], "--data folder '/nonexistent/cifar' does not exist"),
    (["--classes", "2,10"], "need class indices in 0..9"),
    (["--classes", "cat"], "comma-separated class indices"),
    (["--real-per-class", "0"], "--real-per-class must be >= 1"),
    (["--classes", "0", "--real-per-class", "3", "--free-per-class", "0"], "--perplexity 30 must be in [1, 2)"),
])
def test_tsne_bad_input_is_one_error_line(tmp_path, capsys, argv, message, cifar_root):
    full = ["--data", str(cifar_root), "--out", str(tmp_path / "fig"), "--no-progress", *argv]
    assert T.main(full) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "fig").exists()


def test_accuracy_markdown_links_the_figure(tmp_path):
    tsne = {"settings": {"model": "demo", "class_names": ["cat", "ship"], "perplexity": 30.0, "iters": 1000,
                         "knn": 10, "invert_steps": 100, "free_per_class": 50, "real_per_class": 150,
                         "data": "cifar10/test"},
            "kl": 1.234, "sources": [{"name": "real (cifar10/test)", "images": 300, "top1": 80.0,
                                      "knn_same_source": 0.9, "knn_same_source_chance": 0.75}]}
    results = A.load_results(str(ROOT / "bench" / "accuracy.json"))
    md = A.render_markdown(results, tsne)
    assert "![t-SNE" in md and "](tsne.png)" in md and "| real (cifar10/test) | 300 | 80.00 | 0.900 | 0.750 |" in md
    assert md.index("(tsne.png)") < md.index("## Settings")
    assert "tsne.png" not in A.render_markdown(results)
    (tmp_path / "accuracy.json").write_text(json.dumps(results))
    (tmp_path / "tsne.json").write_text(json.dumps(tsne))
    A.render(str(tmp_path))  # the generator picks tsne.json up, so a re-render keeps the link
    assert "](tsne.png)" in (tmp_path / "ACCURACY.md").read_text()
