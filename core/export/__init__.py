"""ONNX export (`onnx.py`), its int8 paths (`int8.py`) and the torch-free onnxruntime runner
that verifies an export and ships next to it as generate.py (`ort_runner.py`)."""
