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
from __future__ import annotations

import importlib

#: public name -> the module of this package that defines it; imported on first use (PEP 562), so
#: `python -m fastprompt.export --help` answers without importing torch
_LAZY = {"ExportCheckError": "onnx", "ExportError": "onnx", "export_onnx": "onnx",
         "run_fingerprint": "model", "OnnxRunner": "runners", "Runner": "runners",
         "TensorRTRunner": "runners", "TorchRunner": "runners", "open_runner": "runners",
         "TensorRTUnavailable": "engine", "build_engine": "tensorrt",
         "export_tensorrt": "tensorrt"}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        try:  # the submodules (`onnx`, `runners`, `tensorrt`, `fp16`, ...) as attributes, as before
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
