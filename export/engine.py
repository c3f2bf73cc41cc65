"""TensorRT engine files and the `tensorrt` module: what a build writes and a runner reads.

An engine is two files: the plan `X.plan` and its sidecar `X.plan.json`, which holds what a runner
needs (class names, image size, mean/std, output; `model.metadata`), what the engine is bound to
(GPU name, TensorRT version, run fingerprint) and the sha256 of the plan. `write_engine` writes
each file atomically, plan first; `read_engine` refuses a plan that is not the one its sidecar
describes, and `check_compatible` an engine built on another GPU or TensorRT version. The
builder is `tensorrt.py`, the runner `runners.TensorRTRunner`; both import this module, so
neither imports the other's module for it.
"""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import torch

from fastprompt.errors import ExportError
from fastprompt.files import write_bytes, write_text

SIDECAR_FORMAT = "fastprompt-engine/2"   # /2: plan_sha256 added; /1 sidecars are refused
SUPPORTED_MAJORS = (10, 11)


class TensorRTUnavailable(ExportError):
    """TensorRT or CUDA is missing (one-line reason)."""


def tensorrt_major(version: str) -> int:
    """10 for '10.16.1.11'; TensorRTUnavailable for a version fastprompt does not support."""
    try:
        major = int(str(version).split(".")[0])
    except ValueError:
        major = -1
    if major not in SUPPORTED_MAJORS:
        raise TensorRTUnavailable(
            f"TensorRT {version} is not supported: fastprompt builds and runs engines with "
            f"TensorRT 10.x or 11.x (pip install 'fastprompt[tensorrt]')")
    return major


def require_tensorrt():
    """The `tensorrt` module (10.x / 11.x) and a CUDA device, or TensorRTUnavailable saying what
    is missing."""
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTUnavailable("TensorRT is not installed: pip install 'fastprompt[tensorrt]' "
                                  "(needs an NVIDIA GPU with CUDA)") from None
    tensorrt_major(trt.__version__)
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


@functools.lru_cache(maxsize=None)
def trt_logger():
    """The one TensorRT logger of this process (builders, parsers and runtimes share it)."""
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


def sidecar_path(plan) -> Path:
    return Path(f"{plan}.json")


def timing_cache_path(plan) -> Path:
    return Path(plan).with_suffix(".timing.cache")


def device_info() -> dict:
    import tensorrt as trt

    return {"gpu": torch.cuda.get_device_name(), "tensorrt_version": trt.__version__,
            "compute_capability": ".".join(map(str, torch.cuda.get_device_capability()))}


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
    data = plan.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta.get("plan_sha256"):
        raise ExportError(f"{plan} is not the engine its sidecar {path.name} describes (sha256 "
                          f"differs: written by another build or cut short); rebuild the engine")
    return meta, data


def check_compatible(meta: dict, plan) -> None:
    """Refuse an engine built for another GPU or TensorRT version (engines are not portable)."""
    here = device_info()
    for key, what in (("gpu", "GPU"), ("tensorrt_version", "TensorRT version")):
        if meta.get(key) != here[key]:
            raise ExportError(
                f"{plan} was built for {what} {meta.get(key)!r} but this machine has "
                f"{here[key]!r}: TensorRT engines only run where they were built; rebuild it here "
                f"from the run or the ONNX file (python -m fastprompt.export --format tensorrt)")
