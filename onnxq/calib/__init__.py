"""Calibration data sources, streaming observers, and the onnxruntime runner that feeds them."""
