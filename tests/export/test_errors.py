"""Bad checkpoints and bad export requests fail with a clear CheckpointError / ValueError, never a wrong model."""
import copy
import json

import pytest
import timm

import export
from export import CheckpointError
from export import format as fmt
from quant.surgery import quantize_model
from tests.quant.ptq_utils import one_thread  # noqa: F401

from .export_utils import arch, quantized


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    _, q = quantized("vit", "w4a4")
    name, kw = arch("vit")
    path = tmp_path_factory.mktemp("ckpt") / "vit.lowbit"
    export.export_model(q, path, arch=name, config=kw, bits="w4a4")
    return path


def _rewrite(src, dst, edit):
    """Re-save ``src`` as a well-formed safetensors file after ``edit(manifest, tensors)`` (no checksum fix-up
    needed when only the manifest changes)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(src), framework="pt") as f:
        man = json.loads(f.metadata()["lowbit"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(man, tensors)
    save_file(tensors, str(dst), metadata={"lowbit": json.dumps(man)})
    return dst


def test_good_file_loads(ckpt):
    assert export.load(ckpt) is not None


def test_truncated(ckpt, tmp_path):
    data = ckpt.read_bytes()
    p = tmp_path / "t.lowbit"
    for cut in (len(data) // 2, len(data) - 3, 100):
        p.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            export.load(p)


def test_flipped_bytes(ckpt, tmp_path):
    data = bytearray(ckpt.read_bytes())
    header = int.from_bytes(data[:8], "little")
    p = tmp_path / "f.lowbit"
    for pos in (8 + header + 5, len(data) - 1, 8 + header + (len(data) - 8 - header) // 2):
        bad = bytearray(data)
        bad[pos] ^= 0x10
        p.write_bytes(bytes(bad))
        with pytest.raises(CheckpointError, match="checksum mismatch"):
            export.load(p)
    bad = bytearray(data)
    bad[20] ^= 0xFF  # inside the JSON header
    p.write_bytes(bytes(bad))
    with pytest.raises(CheckpointError):
        export.load(p)


def test_unknown_version(ckpt, tmp_path):
    p = _rewrite(ckpt, tmp_path / "v.lowbit", lambda m, t: m.update(format_version=99))
    with pytest.raises(CheckpointError, match="format version 99 is not supported"):
        export.load(p)


def test_wrong_skeleton(ckpt):
    name, kw = arch("vit")
    wrong = timm.create_model(name, pretrained=False, **{**kw, "embed_dim": 64, "num_heads": 4})
    with pytest.raises(CheckpointError, match="another architecture"):
        export.load(ckpt, model=wrong)
    deeper = timm.create_model(name, pretrained=False, **{**kw, "depth": 3})
    with pytest.raises(CheckpointError, match="do not fit"):
        export.load(ckpt, model=deeper)


@pytest.mark.parametrize("edit,msg", [
    (lambda m, t: m["model_args"].update(depth=3), "do not fit"),
    (lambda m, t: m["model_args"].update(embed_dim=96), "another architecture"),
    (lambda m, t: m.update(architecture="no_such_model_xyz"), "cannot build architecture"),
    (lambda m, t: m["modules"].pop(), "belong to no layer"),
    (lambda m, t: m["modules"][0].update(kind="conv3d"), "unknown module kind"),
])
def test_metadata_mismatch(ckpt, tmp_path, edit, msg):
    p = _rewrite(ckpt, tmp_path / "m.lowbit", edit)
    with pytest.raises(CheckpointError, match=msg):
        export.load(p)


def test_missing_tensor(ckpt, tmp_path):
    key = "quant.blocks.0.attn.qkv.w_scale"

    def drop_both(m, t):
        del t[key]
        del m["tensors"][key]
    p = _rewrite(ckpt, tmp_path / "a.lowbit", drop_both)
    with pytest.raises(CheckpointError, match=f"tensor '{key}' is missing"):
        export.load(p)
    p = _rewrite(ckpt, tmp_path / "b.lowbit", lambda m, t: t.pop(key))
    with pytest.raises(CheckpointError, match="missing tensors"):
        export.load(p)


def test_export_refusals(tmp_path):
    fp, q = quantized("vit", "w4a4")
    name, kw = arch("vit")
    path = tmp_path / "x.lowbit"
    export.export_model(q, path, arch=name, config=kw)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        export.export_model(q, path, arch=name, config=kw)
    assert path.read_bytes() == before
    export.export_model(q, path, arch=name, config=kw, overwrite=True)
    raw = quantize_model(copy.deepcopy(fp), "w4a4")
    with pytest.raises(ValueError, match="not initialised"):
        export.export_model(raw, tmp_path / "raw.lowbit", arch=name, config=kw)
    with pytest.raises(ValueError, match="A16"):
        export.export_model(raw, tmp_path / "a16.lowbit", arch=name, config=kw, bits="w4a16")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["x.lowbit"]


def test_manifest_round_trip(ckpt):
    man = fmt.read_manifest(ckpt)
    assert man["preprocess"]["input_size"] == 32 and man["layouts"]["int3"]["planes"] == [["lo", 4], ["hi", 8]]
    assert {e["kind"] for e in man["modules"]} == {"vit_attention", "mlp", "linear", "patch"}
