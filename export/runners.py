"""Runners: one interface over a run directory (torch), an ONNX file and a TensorRT engine.

    runner = open_runner("model.onnx")          # or a RUN_DIR, or "model.plan" (CUDA)
    logits = runner.run(images)                 # images [B, 3, S, S], normalised like evaluation
    runner.classnames, runner.image_size, runner.mean, runner.std, runner.output

`run` returns the input's kind: a numpy array for a numpy array, a torch tensor for a tensor
(on the input's device). `output` is "logits" or "features" (an export made with --features).
Opening a model that cannot be used raises ExportError; a model that fails while running raises
RunnerError (both one line).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fastprompt.errors import ExportError, RunnerError, first_line  # noqa: F401 (RunnerError: as before)

from .model import read_metadata

ENGINE_SUFFIXES = (".plan", ".engine", ".trt")
ALIGNMENT = 256  # bytes: IExecutionContext::setTensorAddress needs it (NvInferRuntime.h, TRT 10/11)


def check_out_suffix(fmt: str, out) -> None:
    """Refuse an export file name that `open_runner` (and so predict) could not open again."""
    suffixes = (".onnx",) if fmt == "onnx" else ENGINE_SUFFIXES
    if Path(out).suffix not in suffixes:
        kind = "an ONNX" if fmt == "onnx" else "a TensorRT"
        raise ExportError(f"--out {out}: {kind} export is opened by its suffix, so name it "
                          f"{' or '.join('model' + s for s in suffixes)}")


def chunks(n: int, min_batch: int, max_batch: int) -> list[tuple[int, int, int]]:
    """(start, stop, rows fed to the engine) per chunk of an n-image batch: at most max_batch
    images each; a chunk under min_batch (the last one, or a small batch) is padded to min_batch,
    since the engine's profile accepts no smaller batch."""
    if n < 0 or not 1 <= min_batch <= max_batch:
        raise ValueError(f"bad chunking: n={n}, batch profile {min_batch}..{max_batch}")
    return [(a, min(a + max_batch, n), max(min(a + max_batch, n) - a, min_batch))
            for a in range(0, n, max_batch)]


def aligned_empty(shape, dtype, device) -> torch.Tensor:
    """An uninitialised contiguous tensor whose first element is ALIGNMENT-byte aligned."""
    numel, item = int(np.prod(shape, dtype=np.int64)), torch.empty((), dtype=dtype).element_size()
    buf = torch.empty(numel + ALIGNMENT // item, dtype=dtype, device=device)
    skip = (-buf.data_ptr() % ALIGNMENT) // item
    return buf[skip: skip + numel].view(tuple(shape))


def engine_input(x: torch.Tensor, start: int, stop: int, rows: int) -> torch.Tensor:
    """x[start:stop] as the engine reads it: `rows` rows (zero images after the real ones),
    contiguous and ALIGNMENT-aligned; the slice itself when it already is, a copy otherwise
    (a view with an offset, a non-contiguous tensor, a short chunk)."""
    part = x[start:stop]
    if rows == stop - start and part.is_contiguous() and part.data_ptr() % ALIGNMENT == 0:
        return part
    buf = aligned_empty((rows, *x.shape[1:]), x.dtype, x.device)
    buf[: stop - start].copy_(part)
    buf[stop - start:].zero_()
    return buf


def run_in_chunks(x: torch.Tensor, min_batch: int, max_batch: int, run_chunk, empty: torch.Tensor):
    """Concatenated `run_chunk(engine_input)` over the chunks of x, each cut back to its real rows
    (`empty`: the result for zero images, [0, ...] of the output's dtype)."""
    outs = [empty]
    for start, stop, rows in chunks(x.shape[0], min_batch, max_batch):
        outs.append(run_chunk(engine_input(x, start, stop, rows))[: stop - start])
    return torch.cat(outs)


class Runner:
    classnames: list[str]
    image_size: int
    mean: tuple
    std: tuple
    output: str = "logits"
    method: str = "?"
    device: str = "cpu"

    def _set_meta(self, meta: dict, where="the model") -> None:
        self.where = str(where)
        self.classnames = list(meta["classnames"])
        self.image_size = int(meta["image_size"])
        self.mean, self.std = tuple(meta["mean"]), tuple(meta["std"])
        self.output = meta.get("output", "logits")
        self.method = meta.get("method", "?")

    def _forward(self, images: torch.Tensor) -> torch.Tensor:  # float32 tensor in, tensor out
        raise NotImplementedError

    def run(self, images):
        if isinstance(images, np.ndarray):
            x = torch.from_numpy(np.ascontiguousarray(images, np.float32))
            return self._checked(self._forward(x), len(x)).cpu().numpy()
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a numpy array or a torch tensor, got {type(images).__name__}")
        return self._checked(self._forward(images.float()), len(images)).to(images.device)

    def _checked(self, out: torch.Tensor, n: int) -> torch.Tensor:
        """The output must be [n, C] (C: the metadata's classes) for logits, [n, D] for features:
        a file whose graph and metadata disagree would print other classes' names."""
        if out.ndim != 2 or out.shape[0] != n or (
                self.output == "logits" and out.shape[1] != len(self.classnames)):
            raise ExportError(f"{self.where} gave an output of shape {list(out.shape)} for {n} "
                              f"images, expected [{n}, {len(self.classnames)}] (its metadata names "
                              f"{len(self.classnames)} classes): export the run again")
        return out

    __call__ = run

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(method={self.method}, classes={len(self.classnames)}, "
                f"image_size={self.image_size}, output={self.output}, device={self.device})")


class TorchRunner(Runner):
    """The run's own classifier in torch (any method, CoCoOp included)."""

    def __init__(self, source, device: str = "cpu"):
        from .model import load_run

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
            raise ExportError(f"cannot load {path} with onnxruntime: {first_line(err)}") from None
        self.device = device
        self._set_meta(read_metadata(self.session.get_modelmeta().custom_metadata_map, path), path)
        self.input = self.session.get_inputs()[0].name
        check_graph(path, self.session.get_inputs(), self.session.get_outputs(), self.image_size,
                    len(self.classnames) if self.output == "logits" else None)

    def _forward(self, images):
        try:
            out = self.session.run(None, {self.input: images.detach().cpu().contiguous().numpy()})
        except Exception as err:  # onnxruntime raises its own exception types
            raise RunnerError(f"onnxruntime failed: {first_line(err)}") from None
        return torch.from_numpy(out[0])


def check_graph(path, inputs, outputs, image_size: int, classes: int | None) -> None:
    """One image input [B, 3, S, S] (S: the metadata's image size) and one output [B, C]
    (C: its class count, for logits), wherever the graph fixes those sizes."""
    def fits(shape, want):
        return shape is not None and len(shape) == len(want) and all(
            not isinstance(d, int) or w is None or d == w for d, w in zip(shape, want))

    if len(inputs) != 1 or not fits(inputs[0].shape, (None, 3, image_size, image_size)):
        raise ExportError(f"{path} takes {[i.shape for i in inputs]}, not one image batch "
                          f"[B, 3, {image_size}, {image_size}] as its metadata says: export the run "
                          f"again")
    if not outputs or not fits(outputs[0].shape, (None, classes)):
        raise ExportError(f"{path} outputs {[o.shape for o in outputs][:2]}, not [B, "
                          f"{classes or 'D'}] as its metadata says ({classes} classes): export the "
                          f"run again")


class TensorRTRunner(Runner):
    """A TensorRT engine (.plan) built by fastprompt.export; classifies CUDA tensors.

    The engine lives on one GPU: `device` "cuda" means the device current when the runner is
    made, "cuda:N" device N. The engine is deserialized with that device current (TensorRT binds
    an engine to it) and every call runs there, whatever device is current at call time; images
    on another device (or the CPU) are copied to it and the result is returned on theirs.
    Runs on a stream of its own (enqueueV3 on the legacy default stream costs extra device
    synchronisations), ordered after the caller's current stream and before whatever the caller
    queues next. Every buffer handed to TensorRT is contiguous and 256-byte aligned. Batches are
    cut into chunks of at most the profile's max batch; a chunk under its min batch is padded with
    zero images and the padding's rows are dropped."""

    def __init__(self, path, device: str = "cuda"):
        from .engine import (check_compatible, construct, device_info, engine_io, read_engine,
                             require_tensorrt, trt_logger)

        trt = require_tensorrt()
        self.device_index = _cuda_index(device)
        self.torch_device = torch.device("cuda", self.device_index)
        self.device = "cuda"
        meta, data = read_engine(path)
        with torch.cuda.device(self.device_index):
            check_compatible(meta, path, device_info(self.device_index))
            self._set_meta(meta, path)
            self._runtime = construct(trt, "Runtime", trt_logger())
            self.engine = self._runtime.deserialize_cuda_engine(data)
            if self.engine is None:
                raise ExportError(f"TensorRT could not load {path} (see the TensorRT messages "
                                  f"above); rebuild it with python -m fastprompt.export --format "
                                  f"tensorrt")
            io = engine_io(trt, self.engine, meta, path)
            self.context = self.engine.create_execution_context()
            if self.context is None:
                raise ExportError(f"TensorRT could not create an execution context for {path} "
                                  f"(out of GPU memory?)")
            self.stream = torch.cuda.Stream(device=self.device_index)
        self.input, self.output_name = io["input"], io["output"]
        self._in_dtype, self._out_dtype = io["input_dtype"], io["output_dtype"]
        self.min_batch, self.max_batch = io["min_batch"], io["max_batch"]
        self._out_dims = io["output_dims"]

    def _fail(self, what: str):
        raise RunnerError(f"TensorRT {what} (see the TensorRT messages above)")

    def _enqueue(self, inp: torch.Tensor) -> torch.Tensor:
        """Queue one chunk on self.stream; return its (not yet computed) output."""
        ctx = self.context
        if not ctx.set_input_shape(self.input, tuple(inp.shape)):
            self._fail(f"refused input shape {tuple(inp.shape)} (profile batch "
                       f"{self.min_batch}..{self.max_batch})")
        shape = tuple(ctx.get_tensor_shape(self.output_name))
        if min(shape, default=-1) < 0:
            self._fail(f"could not infer the output shape ({shape})")
        out = aligned_empty(shape, self._out_dtype, inp.device)
        for name, tensor in ((self.input, inp), (self.output_name, out)):
            if not ctx.set_tensor_address(name, tensor.data_ptr()):
                self._fail(f"refused the address of {name}")
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            self._fail("execution failed")
        return out

    @torch.no_grad()
    def _forward(self, images):
        size = self.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise RunnerError(f"images must be [B, 3, {size}, {size}] for this engine, got "
                              f"{list(images.shape)}")
        with torch.cuda.device(self.device_index):  # the engine's GPU, not the current one
            x = images.to(self.torch_device, self._in_dtype)
            caller = torch.cuda.current_stream(self.torch_device)
            self.stream.wait_stream(caller)  # x is ready before our stream reads it
            with torch.cuda.stream(self.stream):  # copies, padding, engine and cat in one order
                empty = torch.empty((0, *self._out_dims), dtype=self._out_dtype, device=x.device)
                out = run_in_chunks(x, self.min_batch, self.max_batch, self._enqueue, empty).float()
            caller.wait_stream(self.stream)  # the caller's next work sees the outputs
            x.record_stream(self.stream)     # x's memory is not reused before our stream is done
            out.record_stream(caller)        # out was allocated on our stream, used on the caller's
        return out


def _cuda_index(device) -> int:
    """The CUDA device index `device` ("cuda", "cuda:N", a torch.device or an int) names; "cuda"
    is the current device."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type != "cuda":
        raise ExportError(f"TensorRT engines run on CUDA only: use --device cuda (got {device!r})")
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if not 0 <= index < torch.cuda.device_count():
        raise ExportError(f"device cuda:{index}: torch sees {torch.cuda.device_count()} CUDA "
                          f"device(s)")
    return index


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
