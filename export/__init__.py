"""Export of packed quantized checkpoints and loading them back for inference."""
