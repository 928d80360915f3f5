"""Eager-mode int8 quantization: fusion, qconfigs, calibration, data-free tools, QAT, checkpoint I/O."""
