"""The packed checkpoint file: one safetensors file whose metadata holds a JSON manifest.

Metadata key ``lowbit`` is JSON::

    {"format": "lowbit-vit", "format_version": 1, "package_version": ...,
     "tensors": {name: {"sha256": hex digest of the tensor's raw bytes, "dtype": ..., "shape": [...]}},
     ...caller's fields (architecture, config, bits, layouts)}

Writes go to a temporary file in the target folder, then ``os.replace``: a reader never sees half a file.
Reading checks, in order: the file exists and parses as safetensors, the manifest is ours and of a known version,
every listed tensor is present with its dtype/shape, and every checksum matches. Any failure raises
:class:`CheckpointError` naming the problem.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Dict, Tuple

import torch
from torch import Tensor

FORMAT = "lowbit-vit"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A packed checkpoint is missing, corrupt, of another version, or does not fit the model asked for."""


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("lowbit-vit")
    except Exception:
        return "unknown"


def tensor_digest(t: Tensor) -> str:
    t = t.detach().contiguous().cpu()
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()


def save(path: "str | os.PathLike", tensors: Dict[str, Tensor], meta: dict, overwrite: bool = False) -> Path:
    """Write ``tensors`` and ``meta`` to ``path`` atomically; refuse to replace an existing file unless ``overwrite``."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"folder {path.parent} does not exist; create it first")
    bad = [k for k, v in tensors.items() if not torch.is_tensor(v)]
    if bad:
        raise TypeError(f"not tensors: {bad[:5]}")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    manifest = dict(meta)
    manifest.update(format=FORMAT, format_version=FORMAT_VERSION, package_version=_package_version(),
                    tensors={k: {"sha256": tensor_digest(v), "dtype": str(v.dtype).replace("torch.", ""),
                                 "shape": list(v.shape)} for k, v in tensors.items()})
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"lowbit": json.dumps(manifest)})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; a written file gets the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read_manifest(path: "str | os.PathLike") -> dict:
    """The manifest alone (no tensor data read), with the format and version checked."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; pass the path of a file written by `quant.run --export`")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("lowbit")
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    if raw is None:
        raise CheckpointError(f"{path} has no lowbit-vit manifest: it was not written by lowbit-vit's exporter")
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: manifest is not valid JSON (corrupt header?): {e}") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    v = manifest.get("format_version")
    if v != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {v!r} is not supported (this package reads version "
                              f"{FORMAT_VERSION}); re-export with this version of lowbit-vit")
    return manifest


def load(path: "str | os.PathLike", device: "str | torch.device" = "cpu",
         verify: bool = True) -> Tuple[Dict[str, Tensor], dict]:
    """``(tensors, manifest)`` from a checkpoint written by :func:`save`, verified against the manifest."""
    from safetensors import safe_open

    manifest = read_manifest(path)
    listed = manifest.get("tensors", {})
    tensors: Dict[str, Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            missing = sorted(set(listed) - keys)
            if missing:
                raise CheckpointError(f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
            for k in listed:
                tensors[k] = f.get_tensor(k)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: tensor data unreadable (truncated or corrupt?): {e}") from None
    for k, info in listed.items():
        t = tensors[k]
        if str(t.dtype).replace("torch.", "") != info["dtype"] or list(t.shape) != info["shape"]:
            raise CheckpointError(f"{path}: tensor {k!r} is {t.dtype} {list(t.shape)}, manifest says "
                                  f"{info['dtype']} {info['shape']}")
        if verify and tensor_digest(t) != info["sha256"]:
            raise CheckpointError(f"{path}: checksum mismatch in tensor {k!r}: the file is corrupt; re-export it")
    return {k: v.to(device) for k, v in tensors.items()}, manifest
