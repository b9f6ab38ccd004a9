"""The ground floor: the quantization math (:mod:`lowbit.primitives`), packed weight formats (:mod:`lowbit.packing`),
bit specs (:mod:`lowbit.bits`), the user-facing error (:mod:`lowbit.errors`) and the model registry
(:mod:`lowbit.models`, :mod:`lowbit.zoo`). Imports nothing else of the project."""
from .bits import BitConfig, parse_bits

__all__ = ["BitConfig", "parse_bits"]
