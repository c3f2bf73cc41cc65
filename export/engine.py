"""TensorRT engine files and the `tensorrt` module: what a build writes and a runner reads.

An engine is two files: the plan `X.plan` and its sidecar `X.plan.json`, which holds what a runner
needs (class names, image size, mean/std, output; `model.metadata`), what the engine is bound to
(GPU name, compute capability, TensorRT version, run fingerprint) and the sha256 of the plan.
`write_engine` writes each file atomically, plan first; `read_engine` refuses a plan that is not
the one its sidecar describes, or one that failed the export's check (`X.rejected.plan`, see
`tensorrt.export_tensorrt`); `check_compatible` refuses an engine built on another GPU or
TensorRT version, `engine_io` one whose tensors are not what the sidecar says.

The `tensorrt` module: `require_tensorrt` imports it (10.12+ or 11.x) or says in one line what is
missing or broken, and `construct` turns TensorRT's failure to create a Builder, OnnxParser or
Runtime (pybind11's "factory function returned nullptr" when CUDA does not start for it) into
one line naming the TensorRT build, torch's CUDA and what to install. The builder is
`tensorrt.py`, the runner `runners.TensorRTRunner`; both import this module, so neither imports
the other's module for it.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import re
from pathlib import Path

import torch

from fastprompt.errors import ExportError, first_line
from fastprompt.files import move_into_place, write_bytes, write_text

SIDECAR_FORMAT = "fastprompt-engine/2"   # /2: plan_sha256 added; /1 sidecars are refused
SUPPORTED_MAJORS = (10, 11)
MIN_VERSION = (10, 12)      # strong typing as NVIDIA supports it: 10.12 deprecated weak typing
CUDA_EXTRAS = (11, 12, 13)  # pyproject's fastprompt[tensorrt-cuNN] extras, one per CUDA major


class TensorRTUnavailable(ExportError):
    """TensorRT or CUDA is missing or broken (one-line reason)."""


# ------------------------------------------------------------------ the installed TensorRT build
def install_hint(torch_cuda: str | None = None) -> str:
    """The extra that installs TensorRT for torch's CUDA major (`torch.version.cuda` by default)."""
    cuda = torch.version.cuda if torch_cuda is None else torch_cuda
    major = _major(cuda)
    if major in CUDA_EXTRAS:
        return f"pip install 'fastprompt[tensorrt-cu{major}]'"
    if major is None:
        return ("install a CUDA build of torch, then pip install 'fastprompt[tensorrt-cuNN]' for "
                "its CUDA")
    return (f"torch uses CUDA {cuda}, for which TensorRT 10.12+ has no wheels: install a torch built "
            f"for CUDA {' or '.join(map(str, CUDA_EXTRAS[1:]))}")


def _major(version) -> int | None:
    m = re.match(r"\s*(\d+)", str(version or ""))
    return int(m.group(1)) if m else None


def tensorrt_major(version: str) -> int:
    """10 for '10.16.1.11'; TensorRTUnavailable for a version fastprompt does not support
    (before 10.12, 12 and later)."""
    parts = [int(p) for p in re.findall(r"\d+", str(version))[:2]] + [0]
    if not re.match(r"\d", str(version)) or parts[0] not in SUPPORTED_MAJORS or \
            tuple(parts[:2]) < MIN_VERSION:
        raise TensorRTUnavailable(
            f"TensorRT {version or '?'} is not supported: fastprompt builds and runs engines with "
            f"TensorRT 10.12 or later 10.x, or 11.x ({install_hint()})")
    return parts[0]


def tensorrt_cuda_builds(names=None) -> list[int]:
    """The CUDA majors of the TensorRT pip wheels installed (`tensorrt-cu12`, its `_bindings` and
    `_libs`, ...; NVIDIA's packaging names them so, python/packaging in NVIDIA/TensorRT). Empty
    for a TensorRT installed otherwise (tar / deb / conda), whose CUDA build is not recorded."""
    if names is None:
        import importlib.metadata

        names = [d.metadata["Name"] or "" for d in importlib.metadata.distributions()]
    wheel = re.compile(r"tensorrt[-_.]cu(\d+)(?:[-_.](?:bindings|libs))?")
    return sorted({int(m.group(1)) for m in (wheel.fullmatch(str(n).lower()) for n in names) if m})


def _reinstall(remove: list[int], torch_cuda: str | None) -> str:
    names = " ".join(f"tensorrt-cu{m} tensorrt-cu{m}-bindings tensorrt-cu{m}-libs" for m in remove)
    return f"pip uninstall -y tensorrt {names} && {install_hint(torch_cuda)}"


def setup_problem(version: str | None, builds: list[int], torch_cuda: str | None) -> str:
    """Why CUDA may not start for TensorRT on this setup and what to do (one clause)."""
    what, tmajor = f"TensorRT {version}" if version else "TensorRT", _major(torch_cuda)
    if len(builds) > 1:
        return (f"{what}: wheels for CUDA {' and '.join(map(str, builds))} are all installed and "
                f"overwrite each other's `tensorrt` module; torch uses CUDA {torch_cuda}: "
                f"{_reinstall([b for b in builds if b != tmajor] or builds, torch_cuda)}")
    if builds and builds[0] != tmajor:
        return (f"{what} is the CUDA {builds[0]} build but torch uses CUDA {torch_cuda}: "
                f"{_reinstall(builds, torch_cuda)}")
    if builds:
        return (f"{what} is the CUDA {builds[0]} build, as torch (CUDA {torch_cuda}): check that the "
                f"NVIDIA driver supports CUDA {builds[0]} (nvidia-smi), that the GPU has free "
                f"memory and that {what} supports this GPU")
    return (f"{what} was not installed from NVIDIA's pip wheels, so its CUDA build is unknown, and "
            f"torch uses CUDA {torch_cuda}: install the wheels for torch's CUDA: "
            f"{install_hint(torch_cuda)}")


def require_tensorrt():
    """The `tensorrt` module (10.12+ / 11.x) and a CUDA device, or TensorRTUnavailable saying
    what is missing or broken."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as err:  # OSError: the bindings load their libraries with
        # ctypes where no libs wheel did (FileNotFoundError for a DLL not found on Windows)
        if isinstance(err, ImportError) and err.name == "tensorrt":
            raise TensorRTUnavailable(f"TensorRT is not installed: {install_hint()} (needs an "
                                      f"NVIDIA GPU with CUDA)") from None
        raise TensorRTUnavailable(
            f"TensorRT is installed but does not load ({first_line(err)}): "
            f"{setup_problem(None, tensorrt_cuda_builds(), torch.version.cuda)}") from None
    tensorrt_major(getattr(trt, "__version__", ""))
    if not torch.cuda.is_available():
        raise TensorRTUnavailable("TensorRT engines need a CUDA device and torch sees none")
    return trt


def tensorrt_missing() -> str | None:
    """Why engines cannot be built or run here (`require_tensorrt`'s reason), or None."""
    try:
        require_tensorrt()
    except TensorRTUnavailable as err:
        return str(err)
    return None


def construct(trt, name: str, *args):
    """`trt.<name>(*args)` (Builder, OnnxParser, Runtime). The bindings create these through
    pybind11 factories (python/src/infer/pyCore.cpp, parsers/pyOnnx.cpp), which raise
    `TypeError: pybind11::init(): factory function returned nullptr` when TensorRT cannot start
    CUDA (a driver too old for its CUDA build, no usable GPU): that, or a None, becomes one line."""
    try:
        obj = getattr(trt, name)(*args)
    except TypeError as err:
        if "returned nullptr" not in str(err):
            raise
        obj = None
    if obj is None:
        raise TensorRTUnavailable(
            f"TensorRT could not create its {name} (CUDA did not start for it): "
            f"{setup_problem(trt.__version__, tensorrt_cuda_builds(), torch.version.cuda)}")
    return obj


@functools.lru_cache(maxsize=None)
def trt_logger():
    """The one TensorRT logger of this process (builders, parsers and runtimes share it)."""
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


@contextlib.contextmanager
def quiet_tensorrt():
    """TensorRT's own messages silenced (`Logger.min_severity`, a read-write member of the
    bindings' Logger) around a call whose failure is expected and handled."""
    import tensorrt as trt

    logger = trt_logger()
    old, logger.min_severity = logger.min_severity, trt.Logger.INTERNAL_ERROR
    try:
        yield
    finally:
        logger.min_severity = old


# ------------------------------------------------------------------------------- the GPU
def device_info(index: int | None = None) -> dict:
    """What an engine is bound to, for CUDA device `index` (default: the current one)."""
    import tensorrt as trt

    index = torch.cuda.current_device() if index is None else index
    return {"gpu": torch.cuda.get_device_name(index), "tensorrt_version": trt.__version__,
            "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(index)))}


def check_compatible(meta: dict, plan, here: dict | None = None) -> None:
    """Refuse an engine built for another GPU, compute capability or TensorRT version (engines
    are not portable); `here`: `device_info()` of the device it would run on."""
    here = device_info() if here is None else here
    for key, what in (("gpu", "GPU"), ("compute_capability", "compute capability"),
                      ("tensorrt_version", "TensorRT version")):
        if meta.get(key) != here[key]:
            raise ExportError(
                f"{plan} was built for {what} {meta.get(key)!r} but this machine has "
                f"{here[key]!r}: TensorRT engines only run where they were built; rebuild it here "
                f"from the run or the ONNX file (python -m fastprompt.export --format tensorrt)")


def engine_io(trt, engine, meta: dict, plan) -> dict:
    """The engine's input and output: names, torch dtypes, batch profile and output dims, checked
    against the sidecar (images [B, 3, S, S] with S its image_size; fp32 or fp16 tensors)."""
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    modes = {n: engine.get_tensor_mode(n) for n in names}
    inputs = [n for n in names if modes[n] == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if modes[n] == trt.TensorIOMode.OUTPUT]
    if len(inputs) != 1 or len(outputs) != 1:
        raise ExportError(f"{plan} has {len(inputs)} inputs and {len(outputs)} outputs, expected one "
                          f"of each (images in, logits or features out): rebuild it")
    dtypes = {trt.float32: torch.float32, trt.float16: torch.float16}
    io = {"input": inputs[0], "output": outputs[0]}
    for key in ("input", "output"):
        dtype = engine.get_tensor_dtype(io[key])
        if dtype not in dtypes:
            raise ExportError(f"{plan}: engine {key} {io[key]!r} is {dtype}, but fastprompt runs "
                              f"engines with float32 or float16 inputs and outputs: rebuild it with "
                              f"python -m fastprompt.export --format tensorrt")
        io[f"{key}_dtype"] = dtypes[dtype]
    size = int(meta["image_size"])
    dims = tuple(engine.get_tensor_shape(io["input"]))
    if dims[1:] != (3, size, size):
        raise ExportError(f"{plan} takes images {list(dims)} but its sidecar says image_size {size}: "
                          f"the pair does not belong together; rebuild the engine")
    lo, _, hi = engine.get_tensor_profile_shape(io["input"], 0)
    io["min_batch"], io["max_batch"] = int(lo[0]), int(hi[0])
    io["output_dims"] = tuple(engine.get_tensor_shape(io["output"]))[1:]
    return io


# ------------------------------------------------------------------------------ engine files
def sidecar_path(plan) -> Path:
    return Path(f"{plan}.json")


def timing_cache_path(plan) -> Path:
    return Path(plan).with_suffix(".timing.cache")


def rejected_path(plan) -> Path:
    """Where an engine that failed the export's check is kept: `X.rejected.plan` (its sidecar
    marks it, so that `read_engine` and predict refuse it)."""
    plan = Path(plan)
    return plan.with_name(f"{plan.stem}.rejected{plan.suffix}")


def write_engine(plan, data: bytes, sidecar: dict) -> dict:
    """Write the plan, then its sidecar holding the plan's sha256, each atomically. A crash
    between the two leaves a pair that `read_engine` refuses (the hashes differ), never a silent
    mismatch."""
    sidecar = {**sidecar, "format": SIDECAR_FORMAT, "plan_sha256": hashlib.sha256(data).hexdigest()}
    plan = Path(plan)
    plan.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(plan, data)
    write_text(sidecar_path(plan), json.dumps(sidecar, indent=2))
    return sidecar


def keep_rejected(src, plan, reason: str) -> Path:
    """Move the pair at `src` (one that failed the export's check) to `rejected_path(plan)`: the
    plan, then its sidecar with `rejected: reason` added, so that `read_engine` refuses it."""
    src, dst = Path(src), rejected_path(plan)
    meta = json.loads(sidecar_path(src).read_text())
    move_into_place(src, dst)
    write_text(sidecar_path(dst), json.dumps({**meta, "rejected": reason}, indent=2))
    sidecar_path(src).unlink()
    return dst


def read_engine(plan) -> tuple[dict, bytes]:
    """(sidecar, plan bytes) after checking that they belong together."""
    path, plan = sidecar_path(plan), Path(plan)
    if not path.is_file():
        raise ExportError(f"{path} not found: an engine needs the sidecar written next to it by "
                          f"python -m fastprompt.export --format tensorrt")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else "unreadable JSON"
        raise ExportError(f"{path} has format {found!r}, expected {SIDECAR_FORMAT!r}: rebuild the "
                          f"engine with python -m fastprompt.export --format tensorrt")
    if meta.get("rejected"):
        raise ExportError(f"{plan} failed the export's check ({str(meta['rejected'])[:200]}); it is "
                          f"kept for inspection only: rebuild the engine (--fp32 for fp32)")
    data = plan.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta.get("plan_sha256"):
        raise ExportError(f"{plan} is not the engine its sidecar {path.name} describes (sha256 "
                          f"differs: written by another build or cut short); rebuild the engine")
    return meta, data
