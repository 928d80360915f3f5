"""Where a model runs: torch eager, ONNX export + ONNX Runtime / OpenVINO, and other engines.

Submodules are imported explicitly (``from qcompress.runtime.onnx_export import export_onnx``) so that
optional runtimes cost nothing until used.
"""
