"""Export of packed quantized checkpoints and loading them back for inference.

``export_model(qmodel, path, arch=..., config=..., bits=...)`` writes one; ``load(path, device=...)`` returns the
inference ``nn.Module`` (weights packed, every quantized op through :mod:`kernels.ops`).
"""
from .exporter import export_model
from .format import CheckpointError
from .loader import load

__all__ = ["export_model", "load", "CheckpointError"]
