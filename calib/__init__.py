"""Calibration data: real image folders and data-free synthesis."""
