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


def test_command_lines_with_local_paths(tiny_pipe, tmp_path):
    """Both CLIs end to end from a saved tiny pipeline (--sd-path) and a local classifier file (--checkpoint)."""
    import timm

    from calib import learn_prompts

    tiny_pipe.save_pretrained(tmp_path / "sd")
    torch.save(timm.create_model("vit_tiny_patch16_224").state_dict(), tmp_path / "vit.pth")
    learn_prompts.main(["--model", "vit_tiny_patch16_224", "--checkpoint", str(tmp_path / "vit.pth"), "--sd-path",
                        str(tmp_path / "sd"), "--classes", "n01443537", "--k", "2", "--steps", "1", "--height", "16",
                        "--width", "16", "--out", str(tmp_path / "p")])
    assert [p.name for p in (tmp_path / "p").iterdir()] == [f"{NAMES[1]}.pt"]
    G.main(["--prompts", str(tmp_path / "p"), "--per-class", "2", "--out", str(tmp_path / "g"), "--sd-path",
            str(tmp_path / "sd"), "--height", "16", "--width", "16"])
    assert sorted(p.name for p in (tmp_path / "g" / NAMES[1]).iterdir()) == ["0.png", "1.png"]
