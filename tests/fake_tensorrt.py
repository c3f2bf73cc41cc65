"""A stand-in for the `tensorrt` module and for torch's CUDA device calls, for the CPU tests of
what fastprompt does around TensorRT (error translation, engine files, device choice, timing cache).

It implements only the calls fastprompt makes, with the behaviour the TensorRT 10.12 / 11.1
Python bindings document for them (python/src/infer/pyCore.cpp, python/src/parsers/pyOnnx.cpp,
include/NvInfer.h of NVIDIA/TensorRT):
- Builder, OnnxParser and Runtime are pybind11 factories: when TensorRT cannot start CUDA they
  raise `TypeError: pybind11::init(): factory function returned nullptr` (`fail=` picks one);
- Logger.min_severity is read-write; a message prints when its severity <= min_severity
  (DefaultLogger::log), kept here in `Logger.printed`;
- IBuilderConfig.set_timing_cache(cache, ignore_mismatch=False) refuses a cache whose header
  records other device properties, logs an error and returns False;
- Runtime.deserialize_cuda_engine returns None for bytes that are not a plan.
A "plan" is JSON after b"FAKEPLAN" saying what the engine holds (image size, profile, dtypes), so
that engines can be built, written and loaded without a GPU. Nothing here computes.
"""
from __future__ import annotations

import contextlib
import enum
import json
import types

import torch

NULLPTR = "pybind11::init(): factory function returned nullptr"


class Severity(enum.IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class Logger:
    Severity = Severity
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = Severity
    printed: list = []  # (severity, message) of every message that got through

    def __init__(self, min_severity=Severity.WARNING):
        self.min_severity = min_severity

    def log(self, severity, msg):
        if severity <= self.min_severity:
            Logger.printed.append((Severity(severity), msg))


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    BF16 = 7
    INT8 = 2


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


# TensorRT 11.1's members (pyCore.cpp, release/11.1)
BuilderFlag = enum.IntEnum("BuilderFlag", {n: i for i, n in enumerate(
    "DEBUG GPU_FALLBACK REFIT DISABLE_TIMING_CACHE EDITABLE_TIMING_CACHE TF32".split())})
NetworkDefinitionCreationFlag = enum.IntEnum(
    "NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 0, "PREFER_JIT_PYTHON_PLUGINS": 1})


class _Cache:
    def __init__(self, blob: bytes):
        self.blob = blob

    def serialize(self):
        return self.blob or b"timings:" + State.device_key()


class _Config:
    def __init__(self, logger):
        self.logger, self.flags, self.cache, self.profiles = logger, {BuilderFlag.TF32}, None, []

    def clear_flag(self, flag):
        self.flags.discard(flag)

    def get_flag(self, flag):
        return flag in self.flags

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, blob):
        if bytes(blob).startswith(b"damaged"):
            self.logger.log(Severity.ERROR, "timing cache: bad magic tag")
            raise RuntimeError("could not deserialize the timing cache")
        return _Cache(bytes(blob))

    def set_timing_cache(self, cache, ignore_mismatch):
        if cache.blob and cache.blob != b"timings:" + State.device_key() and not ignore_mismatch:
            self.logger.log(Severity.ERROR, "Timing cache: CUDA device property mismatch")
            return False
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache


class _Profile:
    def set_shape(self, name, lo, opt, hi):
        self.shapes = (tuple(lo), tuple(opt), tuple(hi))


class _Input:
    name = "images"


class _Network:
    num_inputs = 0

    def get_input(self, i):
        return _Input()


class _Parser:
    num_errors = 0

    def __init__(self, network, logger):
        self.network = network

    def parse(self, model: bytes):
        self.network.num_inputs = 1
        return True


class _Builder:
    def __init__(self, logger):
        self.logger = logger

    def create_network(self, flags):
        return _Network()

    def create_builder_config(self):
        return _Config(self.logger)

    def create_optimization_profile(self):
        return _Profile()

    def build_serialized_network(self, network, config):
        State.builds += 1
        lo, opt, hi = config.profiles[0].shapes
        desc = {"shapes": [lo, opt, hi], "classes": State.classes, "build": State.builds,
                "input_dtype": State.input_dtype, "output_dtype": "FLOAT"}
        return b"FAKEPLAN" + json.dumps(desc).encode()


class _Engine:
    num_io_tensors = 2

    def __init__(self, desc):
        self.desc = desc

    def get_tensor_name(self, i):
        return ("images", "logits")[i]

    def get_tensor_mode(self, name):
        return TensorIOMode.INPUT if name == "images" else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return DataType[self.desc["input_dtype" if name == "images" else "output_dtype"]]

    def get_tensor_shape(self, name):
        lo = self.desc["shapes"][0]
        return (-1, *lo[1:]) if name == "images" else (-1, self.desc["classes"])

    def get_tensor_profile_shape(self, name, index):
        return [tuple(s) for s in self.desc["shapes"]]

    def create_execution_context(self):
        return object()


class _Runtime:
    def __init__(self, logger):
        self.logger = logger

    def deserialize_cuda_engine(self, data):
        State.deserialized_on.append(State.current)
        if not bytes(data).startswith(b"FAKEPLAN"):
            self.logger.log(Severity.ERROR, "not a serialized engine")
            return None
        return _Engine(json.loads(bytes(data)[len(b"FAKEPLAN"):]))


class State:
    """What the fake GPU and TensorRT are, and what happened to them."""

    fail = None           # "Builder", "OnnxParser" or "Runtime": that factory returns nullptr
    builds = 0
    classes = 5
    input_dtype = "FLOAT"
    current = 0           # the current CUDA device
    devices = ("NVIDIA Fake A", "NVIDIA Fake B")
    capability = (9, 0)
    deserialized_on: list = []
    entered: list = []    # device indices made current with torch.cuda.device

    @classmethod
    def device_key(cls) -> bytes:
        return f"{cls.devices[cls.current]}/{cls.capability}".encode()


def _factory(name, cls):
    def make(*args):
        if State.fail == name:
            raise TypeError(NULLPTR)
        return cls(*args)
    make.__name__ = name
    return make


def module(version: str = "11.4.0.106") -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.Logger, trt.DataType, trt.TensorIOMode = Logger, DataType, TensorIOMode
    trt.BuilderFlag, trt.NetworkDefinitionCreationFlag = BuilderFlag, NetworkDefinitionCreationFlag
    trt.float32, trt.float16, trt.bfloat16, trt.int8 = (DataType.FLOAT, DataType.HALF,
                                                        DataType.BF16, DataType.INT8)
    trt.Builder = _factory("Builder", _Builder)
    trt.OnnxParser = _factory("OnnxParser", _Parser)
    trt.Runtime = _factory("Runtime", _Runtime)
    return trt


@contextlib.contextmanager
def _device(index):
    old, State.current = State.current, int(index)
    State.entered.append(int(index))
    try:
        yield
    finally:
        State.current = old


class _Stream:
    def __init__(self, device=None):
        self.device = torch.device("cuda", State.current if device is None else int(device))


def install(monkeypatch, version: str = "11.4.0.106") -> types.ModuleType:
    """Put the fake `tensorrt` in sys.modules and give torch two fake CUDA devices (names,
    capability, current device, torch.cuda.device, Stream); state reset."""
    from fastprompt.export import engine

    State.fail, State.builds, State.current, State.input_dtype = None, 0, 0, "FLOAT"
    State.deserialized_on, State.entered, Logger.printed = [], [], []
    trt = module(version)
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", trt)
    engine.trt_logger.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(State.devices))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: State.current)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: State.devices[
        State.current if i is None else i])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: State.capability)
    monkeypatch.setattr(torch.cuda, "device", _device)
    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    return trt
