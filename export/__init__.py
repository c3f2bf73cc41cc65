"""Deployment: ONNX export, TensorRT engines, and runners with one interface.

```python
from fastprompt.export import export_onnx, open_runner
export_onnx("runs/maple", "maple.onnx")          # checked against torch with onnxruntime
runner = open_runner("maple.onnx")               # or a run directory, or a TensorRT .plan
logits = runner.run(images)
```
Command line: `python -m fastprompt.export --run RUN_DIR --format onnx|tensorrt --out FILE`.
Nothing here imports onnx, onnxruntime or tensorrt until it is used.
"""
from .onnx import ExportCheckError, ExportError, export_onnx, run_fingerprint
from .runners import OnnxRunner, Runner, TensorRTRunner, TorchRunner, open_runner
from .tensorrt import TensorRTUnavailable, build_engine, export_tensorrt

__all__ = [
    "ExportCheckError", "ExportError", "OnnxRunner", "Runner", "TensorRTRunner",
    "TensorRTUnavailable", "TorchRunner", "build_engine", "export_onnx", "export_tensorrt",
    "open_runner", "run_fingerprint",
]
