"""Runners: one interface over a run directory (torch), an ONNX file and a TensorRT engine.

    runner = open_runner("model.onnx")          # or a RUN_DIR, or "model.plan" (CUDA)
    logits = runner.run(images)                 # images [B, 3, S, S], normalised like evaluation
    runner.classnames, runner.image_size, runner.mean, runner.std, runner.output

`run` returns the input's kind: a numpy array for a numpy array, a torch tensor for a tensor
(on the input's device). `output` is "logits" or "features" (an export made with --features).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .onnx import ExportError, read_metadata

ENGINE_SUFFIXES = (".plan", ".engine", ".trt")


class Runner:
    classnames: list[str]
    image_size: int
    mean: tuple
    std: tuple
    output: str = "logits"
    method: str = "?"
    device: str = "cpu"

    def _set_meta(self, meta: dict) -> None:
        self.classnames = list(meta["classnames"])
        self.image_size = int(meta["image_size"])
        self.mean, self.std = tuple(meta["mean"]), tuple(meta["std"])
        self.output = meta.get("output", "logits")
        self.method = meta.get("method", "?")

    def _forward(self, images: torch.Tensor) -> torch.Tensor:  # float32 tensor in, tensor out
        raise NotImplementedError

    def run(self, images):
        if isinstance(images, np.ndarray):
            return self._forward(torch.from_numpy(np.ascontiguousarray(images, np.float32))).cpu().numpy()
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a numpy array or a torch tensor, got {type(images).__name__}")
        return self._forward(images.float()).to(images.device)

    __call__ = run

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(method={self.method}, classes={len(self.classnames)}, "
                f"image_size={self.image_size}, output={self.output}, device={self.device})")


class TorchRunner(Runner):
    """The run's own classifier in torch (any method, CoCoOp included)."""

    def __init__(self, source, device: str = "cpu"):
        from .onnx import load_run

        model = load_run(source) if isinstance(source, (str, Path)) else source
        self.device = device
        self.model = model.to(device)
        self.clf = model.classifier()
        self._set_meta({"classnames": self.clf.classnames, "image_size": self.clf.image_size,
                        "mean": self.clf.mean, "std": self.clf.std, "method": model.name})

    @torch.no_grad()
    def _forward(self, images):
        return self.clf(images.to(self.device))


class OnnxRunner(Runner):
    """An exported ONNX file under onnxruntime (CPU, or CUDA when onnxruntime-gpu has it)."""

    def __init__(self, path, device: str = "cpu", threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ExportError("onnxruntime has no CUDA provider here (install onnxruntime-gpu) "
                                  "- use --device cpu")
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as err:  # onnxruntime raises its own exception types
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ExportError(f"cannot load {path} with onnxruntime: {first}") from None
        self.device = device
        self._set_meta(read_metadata(self.session.get_modelmeta().custom_metadata_map))
        self.input = self.session.get_inputs()[0].name

    def _forward(self, images):
        out = self.session.run(None, {self.input: images.detach().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(out)


class TensorRTRunner(Runner):
    """A TensorRT engine (.plan) built by fastprompt.export; classifies CUDA tensors."""

    def __init__(self, path, device: str = "cuda"):
        from .tensorrt import check_compatible, read_sidecar, require_tensorrt

        trt = require_tensorrt()
        if not str(device).startswith("cuda"):
            raise ExportError("TensorRT engines run on CUDA only: use --device cuda")
        meta = read_sidecar(path)
        check_compatible(meta, path)
        self._set_meta(meta)
        self.device = "cuda"
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise ExportError(f"TensorRT could not load {path} (corrupt file, or built elsewhere)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = self.engine.get_tensor_mode
        self.input = next(n for n in names if mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if mode(n) == trt.TensorIOMode.OUTPUT)
        self.min_batch, _, self.max_batch = (s[0] for s in
                                             self.engine.get_tensor_profile_shape(self.input, 0))
        dtypes = {trt.float32: torch.float32, trt.float16: torch.float16}
        self._in_dtype = dtypes[self.engine.get_tensor_dtype(self.input)]
        self._out_dtype = dtypes[self.engine.get_tensor_dtype(self.output_name)]

    @torch.no_grad()
    def _forward(self, images):
        x = images.to("cuda", self._in_dtype)
        if x.shape[0] < self.min_batch:
            raise ValueError(f"batch {x.shape[0]} is below the engine's minimum {self.min_batch}")
        stream = torch.cuda.current_stream(x.device)
        outs = []
        for chunk in x.split(self.max_batch):  # the profile's max batch at a time
            chunk = chunk.contiguous()
            if not self.context.set_input_shape(self.input, tuple(chunk.shape)):
                raise ValueError(f"input shape {tuple(chunk.shape)} is outside the engine's profile "
                                 f"(batch {self.min_batch}..{self.max_batch}, "
                                 f"{self.image_size}x{self.image_size} images)")
            out = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)),
                              dtype=self._out_dtype, device=x.device)
            self.context.set_tensor_address(self.input, chunk.data_ptr())
            self.context.set_tensor_address(self.output_name, out.data_ptr())
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed (see the TensorRT messages above)")
            outs.append(out)
        return torch.cat(outs).float()


def open_runner(model, device: str | None = None) -> Runner:
    """A runner for a run directory, an .onnx file or a TensorRT engine (.plan/.engine/.trt)."""
    path = Path(model)
    if path.is_dir():
        return TorchRunner(path, device or "cpu")
    if not path.exists():
        raise ExportError(f"model not found: {model} (give a run directory, a .onnx file or a .plan engine)")
    if path.suffix == ".onnx":
        return OnnxRunner(path, device or "cpu")
    if path.suffix in ENGINE_SUFFIXES:
        return TensorRTRunner(path, device or "cuda")
    raise ExportError(f"unknown model format '{path.suffix or path.name}': give a run directory, "
                      f"a .onnx file or a TensorRT engine ({', '.join(ENGINE_SUFFIXES)})")
