"""Quantization math (:mod:`quant.primitives`, :mod:`quant.packing`), bit configurations (:mod:`quant.bits`)."""
from .bits import BitConfig, parse_bits

__all__ = ["BitConfig", "parse_bits"]
