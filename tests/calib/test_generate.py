import numpy as np
import pytest
import torch
from PIL import Image

from calib import generate as G
from calib import sd_turbo as S
from calib.common import atomic_torch_save, imagenet_info

NAMES = imagenet_info().label_names()


@pytest.fixture
def prompt_dir(sd, tmp_path, gen):
    d = tmp_path / "prompts"
    for c in (0, 5, 9):
        atomic_torch_save({"prompts": torch.randn(2, 20, sd.token_dim, generator=gen) * 0.1}, d / f"{NAMES[c]}.pt")
    return d


def test_generate_imagefolder_matches_one_step_and_resumes(sd, prompt_dir, tmp_path):
    out = tmp_path / "synth"
    kw = dict(per_class=3, prompt_dir=prompt_dir, batch_size=2, height=16, width=16, seed=7)
    assert G.generate_all(sd, [9, 0, 5], out, **kw) == [9, 0, 5]
    folders = sorted(p.name for p in out.iterdir())
    assert folders == [NAMES[0], NAMES[5], NAMES[9]]  # sorted folder order == ImageNet index order
    assert all(sorted(p.name for p in (out / f).iterdir()) == ["0.png", "1.png", "2.png"] for f in folders)
    assert not (tmp_path / "synth.partial-rank0").exists()
    # image 2 of class 5 = prompt 2 mod K=2 -> prompt 0, second batch's noise of the class generator
    gen = torch.Generator().manual_seed(7 * 100003 + 5)
    torch.randn(2, 4, 8, 8, generator=gen)
    noise = torch.randn(1, 4, 8, 8, generator=gen)
    prompts = torch.load(prompt_dir / f"{NAMES[5]}.pt", weights_only=True)["prompts"]
    with torch.no_grad():
        ref = G.to_uint8(S.one_step_generate(sd, S.encode_prompt_embeddings(sd, prompts[:1])[0], noise))[0]
    img = np.asarray(Image.open(out / NAMES[5] / "2.png"))
    assert img.shape == (16, 16, 3) and np.abs(img.astype(int) - ref.astype(int)).max() <= 1
    stamp = {f: (out / f / "0.png").stat().st_mtime_ns for f in folders}
    import shutil
    shutil.rmtree(out / NAMES[0])
    assert G.generate_all(sd, [0, 5, 9], out, **kw) == [0]
    assert all((out / f / "0.png").stat().st_mtime_ns == stamp[f] for f in folders[1:])
    assert G.generate_all(sd, [0, 5, 9], out, **kw) == []


def test_sharding_splits_classes_between_ranks(sd, prompt_dir, tmp_path):
    kw = dict(per_class=1, prompt_dir=prompt_dir, height=16, width=16)
    done = [G.generate_all(sd, [0, 5, 9], tmp_path / "o", rank=r, world=2, **kw) for r in (0, 1)]
    assert done == [[0, 9], [5]]
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [NAMES[0], NAMES[5], NAMES[9]]


def test_missing_prompts_raise(sd, prompt_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=NAMES[1]):
        G.generate_all(sd, [0, 1], tmp_path / "o", per_class=1, prompt_dir=prompt_dir, height=16, width=16)


def test_baseline_prompts_and_generation(sd, tmp_path):
    texts = G.baseline_prompts(0, 4, torch.Generator().manual_seed(0))
    assert len(texts) == 4 and all(t.startswith("a ") and " photo of " in t and t.endswith(" tench") for t in texts)
    assert len(set(texts)) > 1
    assert G.generate_all(sd, [1], tmp_path / "b", per_class=2, height=16, width=16) == [1]
    assert sorted(p.name for p in (tmp_path / "b" / NAMES[1]).iterdir()) == ["0.png", "1.png"]


def test_command_lines_with_local_paths(tiny_pipe, tmp_path, capsys):
    """Both CLIs end to end from a saved tiny pipeline (--sd-path) and a local classifier file (--checkpoint); a
    second run with the same settings resumes, one with other settings is refused."""
    import timm

    from calib import learn_prompts

    tiny_pipe.save_pretrained(tmp_path / "sd")
    torch.save(timm.create_model("vit_tiny_patch16_224").state_dict(), tmp_path / "vit.pth")
    lp_argv = ["--model", "vit_tiny_patch16_224", "--checkpoint", str(tmp_path / "vit.pth"), "--sd-path",
               str(tmp_path / "sd"), "--classes", "n01443537", "--k", "2", "--steps", "1", "--height", "16",
               "--width", "16", "--out", str(tmp_path / "p")]
    assert learn_prompts.main(lp_argv) == 0
    assert [p.name for p in (tmp_path / "p").iterdir()] == [f"{NAMES[1]}.pt"]
    stamp = (tmp_path / "p" / f"{NAMES[1]}.pt").stat().st_mtime_ns
    assert learn_prompts.main(lp_argv + ["--classes", "1-2"]) == 0  # resumed: class 1 kept, class 2 learned
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == [f"{NAMES[1]}.pt", f"{NAMES[2]}.pt"]
    assert (tmp_path / "p" / f"{NAMES[1]}.pt").stat().st_mtime_ns == stamp
    capsys.readouterr()
    assert learn_prompts.main(lp_argv + ["--k", "3", "--classes", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--k 2 (now 3)" in err, err
    assert not (tmp_path / "p" / f"{NAMES[3]}.pt").exists()
    g_argv = ["--prompts", str(tmp_path / "p"), "--per-class", "2", "--out", str(tmp_path / "g"), "--sd-path",
              str(tmp_path / "sd"), "--height", "16", "--width", "16"]
    assert G.main(g_argv + ["--classes", "1"]) == 0
    assert sorted(p.name for p in (tmp_path / "g" / NAMES[1]).iterdir()) == ["0.png", "1.png"]
    assert G.main(g_argv) == 0  # default classes: those with prompts; class 1 resumed
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == [NAMES[1], NAMES[2]]
    capsys.readouterr()
    assert G.main(g_argv[:3] + ["3"] + g_argv[4:]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "pass --per-class 2 to resume" in err, err
    assert G.main(g_argv + ["--height", "15"]) == 2  # not a multiple of the VAE factor (2)
    assert "--height/--width" in capsys.readouterr().err


def test_existing_out_of_another_kind_is_refused(tmp_path, capsys):
    """Folders holding something else than the command's own outputs are never written into."""
    from calib import learn_prompts

    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "notes.txt").write_text("mine")
    (tmp_path / "o" / NAMES[0]).mkdir()
    for main, argv, what, example in (
            (learn_prompts.main, ["--out", str(tmp_path / "o")], "not learned prompts", NAMES[0]),
            (G.main, ["--baseline", "--per-class", "1", "--out", str(tmp_path / "o")], "not class folders",
             "notes.txt")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and what in err and f"'{example}'" in err, err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [NAMES[0], "notes.txt"]


def test_failed_class_leaves_nothing_behind(sd, tmp_path, monkeypatch):
    """An error while a class is being generated removes its partial folder; earlier classes stay complete."""
    real = G.generate_class

    def fail_on_class_5(sd_, c, n, folder, *a, **k):
        if c == 5:
            folder.mkdir(parents=True)
            (folder / "0.png").write_bytes(b"half")
            raise RuntimeError("boom")
        return real(sd_, c, n, folder, *a, **k)

    monkeypatch.setattr(G, "generate_class", fail_on_class_5)
    with pytest.raises(RuntimeError, match="boom"):
        G.generate_all(sd, [0, 5], tmp_path / "o", per_class=1, height=16, width=16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]
    assert [p.name for p in (tmp_path / "o").iterdir()] == [NAMES[0]]


def test_atomic_save_failure_leaves_no_temp_file(tmp_path):
    with pytest.raises(Exception):
        atomic_torch_save({"f": lambda: 0}, tmp_path / "x.pt")  # a lambda does not pickle
    assert list(tmp_path.iterdir()) == []
