"""Emission: HF / ONNX / .pt2 writers with their reload checks, the report, and atomic output (`save.save`)."""
