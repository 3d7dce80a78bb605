"""ONNX export and running exported models.

- `vidistill.export.onnx`: `export_onnx` (dynamo exporter + parity gate), `check_parity`, `latency`,
  `ExportError` (needs torch).
- `vidistill.export.runtime`: `make_session`, `providers`, `read_metadata` (onnx + onnxruntime only,
  what the server imports).
"""
