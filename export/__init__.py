"""Export of packed quantized checkpoints and loading them back for inference.

``export_model(qmodel, path, arch=..., config=..., bits=...)`` writes one; ``load(path, device=...)`` returns the
inference ``nn.Module`` (weights packed, quantized ops through :mod:`kernels.ops`; on the CPU by default the
bit-identical fast path of :mod:`export.fast`).
"""
from .exporter import export_model
from .format import CheckpointError
from .loader import load

__all__ = ["export_model", "load", "CheckpointError"]
