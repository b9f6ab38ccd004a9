"""Post-training quantization: quantized modules and model surgery, calibration, the joint optimiser and the seed
methods' baselines, and the command line (``python -m quant.run``)."""
