import json

import pytest
import torch

from export import format as fmt


def _write(tmp_path, gen, **kw):
    tensors = {"blocks.0.qkv.w.lo": torch.randint(0, 255, (12, 8), generator=gen, dtype=torch.uint8),
               "blocks.0.qkv.w_scale": torch.rand(12, generator=gen),
               "norm.weight": torch.randn(16, generator=gen).half()}
    meta = {"architecture": "vit_tiny_patch16_224", "bits": "w4a4"}
    return fmt.save(tmp_path / "m.lowbit", tensors, meta, **kw), tensors, meta


def test_roundtrip(tmp_path, gen):
    p, tensors, meta = _write(tmp_path, gen)
    got, man = fmt.load(p)
    assert set(got) == set(tensors) and all(torch.equal(got[k], tensors[k]) for k in tensors)
    assert man["architecture"] == meta["architecture"] and man["format_version"] == fmt.FORMAT_VERSION
    assert [f.name for f in tmp_path.iterdir()] == ["m.lowbit"]  # no temp file left behind


def test_refuses_overwrite(tmp_path, gen):
    p, _, _ = _write(tmp_path, gen)
    before = p.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        _write(tmp_path, gen)
    assert p.read_bytes() == before
    _write(tmp_path, gen, overwrite=True)


def test_truncated(tmp_path, gen):
    p, _, _ = _write(tmp_path, gen)
    data = p.read_bytes()
    for cut in (len(data) - 7, 40, 5):
        p.write_bytes(data[:cut])
        with pytest.raises(fmt.CheckpointError, match="truncated or corrupt|not a readable"):
            fmt.load(p)


def test_flipped_byte_in_data(tmp_path, gen):
    p, _, _ = _write(tmp_path, gen)
    data = bytearray(p.read_bytes())
    data[-3] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(fmt.CheckpointError, match="checksum mismatch"):
        fmt.load(p)


def test_flipped_byte_in_header(tmp_path, gen):
    p, _, _ = _write(tmp_path, gen)
    data = bytearray(p.read_bytes())
    i = data.index(b'"format_version')
    data[i + 2] ^= 0x20  # the key's case flips: manifest still JSON, version no longer found
    p.write_bytes(bytes(data))
    with pytest.raises(fmt.CheckpointError, match="version"):
        fmt.load(p)
    data[i + 2] ^= 0x20
    data[8] = ord("}")  # header JSON broken
    p.write_bytes(bytes(data))
    with pytest.raises(fmt.CheckpointError):
        fmt.load(p)


def test_unknown_version_and_foreign_file(tmp_path, gen):
    from safetensors.torch import save_file

    t = {"a": torch.ones(2)}
    man = {"format": fmt.FORMAT, "format_version": 99, "tensors": {}}
    save_file(t, str(tmp_path / "v99"), metadata={"lowbit": json.dumps(man)})
    with pytest.raises(fmt.CheckpointError, match="version 99 is not supported"):
        fmt.load(tmp_path / "v99")
    save_file(t, str(tmp_path / "plain"))
    with pytest.raises(fmt.CheckpointError, match="no lowbit-vit manifest"):
        fmt.load(tmp_path / "plain")
    with pytest.raises(fmt.CheckpointError, match="not found"):
        fmt.load(tmp_path / "nope")


def test_missing_tensor(tmp_path, gen):
    from safetensors.torch import save_file

    p, tensors, _ = _write(tmp_path, gen)
    man = fmt.read_manifest(p)
    tensors.pop("norm.weight")
    save_file(tensors, str(tmp_path / "short"), metadata={"lowbit": json.dumps(man)})
    with pytest.raises(fmt.CheckpointError, match="missing tensors.*norm.weight"):
        fmt.load(tmp_path / "short")
