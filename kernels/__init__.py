"""Quantized ops: plain-torch references (:mod:`kernels.reference`) and the Triton kernels."""
