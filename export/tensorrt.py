"""TensorRT engines built from the exported ONNX file, for TensorRT 10.x and 11.x.

`build_engine(onnx, plan)`:
  - precision lives in the graph: the network is strongly typed (TensorRT 11 knows nothing else;
    10.12 deprecated the weakly typed controls), so an fp16 build parses the graph rewritten by
    `fp16.to_mixed_fp16` (fp16 compute, every LayerNorm and the head fp32, fp32 in and out) and
    an fp32 build parses the exported graph as is; `fp16.check_precision` refuses a graph that
    does not say what the build asks for. TF32 is cleared in every build (TensorRT enables it by
    default in 10 and 11), so fp32 tensors are computed in fp32. `build_flags(version)` is that
    choice of flags, a pure function of the TensorRT version;
  - one optimisation profile over the batch axis (min, opt, max); opt is the deployment batch;
  - a timing cache next to the engine (`X.timing.cache`), read before and written after the build.
The plan and its sidecar `X.plan.json` (what a runner needs, what the engine is bound to, the
plan's sha256) are written and checked by `engine.py`, whose names are importable from here too.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fastprompt.errors import ExportCheckError, ExportError
from fastprompt.files import write_bytes

from .engine import (SIDECAR_FORMAT, SUPPORTED_MAJORS, TensorRTUnavailable,  # noqa: F401
                     check_compatible, device_info, read_engine, require_tensorrt, sidecar_path,
                     tensorrt_major, tensorrt_missing, timing_cache_path, trt_logger,
                     write_engine)
from .model import read_metadata
from .onnx import compare, export_onnx
from .runners import TensorRTRunner, check_out_suffix

DEFAULT_BATCH = (1, 32, 128)
FP16_MAX_REL_ERR = 3e-2   # fp16 matmuls / attention vs the fp32 torch classifier
FP32_MAX_REL_ERR = 1e-3


@dataclass(frozen=True)
class BuildFlags:
    """Enum member names: `network` of NetworkDefinitionCreationFlag to set at create_network,
    `clear` of BuilderFlag to clear on the builder config. Nothing else is set."""

    network: tuple[str, ...]
    clear: tuple[str, ...]


def build_flags(version: str) -> BuildFlags:
    """The flags for TensorRT `version` (read against NvInfer.h / the Python bindings):

    10.x: STRONGLY_TYPED opts in to strong typing (bit 1 there); the weakly typed FP16 +
          OBEY_PRECISION_CONSTRAINTS route is deprecated since 10.12 and not used.
    11.x: always strongly typed; STRONGLY_TYPED is a deprecated, ignored member (bit 0 there),
          FP16 / BF16 / INT8 / OBEY_PRECISION_CONSTRAINTS no longer exist.
    Both: TF32 is "enabled by default" (NvInfer.h, BuilderFlag::kTF32) and is cleared.
    """
    if tensorrt_major(version) == 10:
        return BuildFlags(network=("STRONGLY_TYPED",), clear=("TF32",))
    return BuildFlags(network=(), clear=("TF32",))


def parse_batch(text) -> tuple[int, int, int]:
    """'MIN,OPT,MAX' -> (min, opt, max) with 1 <= min <= opt <= max."""
    try:
        vals = tuple(int(v) for v in (text.split(",") if isinstance(text, str) else text))
    except (TypeError, ValueError):
        vals = ()
    if len(vals) != 3 or not 1 <= vals[0] <= vals[1] <= vals[2]:
        raise ExportError(f"--batch must be MIN,OPT,MAX with 1 <= MIN <= OPT <= MAX, got {text!r}")
    return vals


def _enum_flags(enum, names) -> int:
    """Bit mask of enum members by name (member values differ between 10.x and 11.x)."""
    return sum(1 << int(getattr(enum, n)) for n in names)


def build_engine(onnx_path, plan, batch=DEFAULT_BATCH, fp16: bool = True, timing_cache=None,
                 log=print) -> dict:
    """Build `plan` from `onnx_path`; write the timing cache (default: next to the engine) and the
    sidecar; return the sidecar."""
    import onnx

    from .fp16 import check_precision, to_mixed_fp16

    trt = require_tensorrt()
    flags = build_flags(trt.__version__)
    mn, opt, mx = parse_batch(batch)
    proto = onnx.load(str(onnx_path))
    meta = read_metadata({p.key: p.value for p in proto.metadata_props})
    graph = to_mixed_fp16(proto) if fp16 else proto
    counts = check_precision(graph, fp16)
    precision = "fp16" if fp16 else "fp32"
    log(f"{precision} graph: {counts['fp32_norms']} LayerNorms and {counts['fp32_head_nodes']} "
        f"head nodes fp32, {counts['fp16_matmuls']} matmuls / convolutions fp16")
    builder = trt.Builder(trt_logger())
    network = builder.create_network(_enum_flags(trt.NetworkDefinitionCreationFlag, flags.network))
    parser = trt.OnnxParser(network, trt_logger())
    if not parser.parse(graph.SerializeToString()):
        errors = "; ".join(f"{e.node_name() or e.node()}: {e.desc()}" for e in
                           (parser.get_error(i) for i in range(parser.num_errors)))
        raise ExportError(f"TensorRT could not parse {onnx_path}: {errors or 'unknown error'}")
    if network.num_inputs != 1:
        raise ExportError(f"{onnx_path} has {network.num_inputs} inputs, expected 1 (images)")
    inp = network.get_input(0)
    size = meta["image_size"]
    config = builder.create_builder_config()
    for name in flags.clear:
        config.clear_flag(getattr(trt.BuilderFlag, name))
        if config.get_flag(getattr(trt.BuilderFlag, name)):
            raise ExportError(f"TensorRT {trt.__version__} kept BuilderFlag.{name} set")
    profile = builder.create_optimization_profile()
    try:
        profile.set_shape(inp.name, (mn, 3, size, size), (opt, 3, size, size), (mx, 3, size, size))
    except RuntimeError as err:
        raise ExportError(f"TensorRT refused the batch profile {mn}/{opt}/{mx}: {err}") from None
    if config.add_optimization_profile(profile) < 0:
        raise ExportError(f"TensorRT refused the batch profile {mn}/{opt}/{mx}")
    cache_file = Path(timing_cache) if timing_cache else timing_cache_path(plan)
    blob = cache_file.read_bytes() if cache_file.is_file() else b""
    try:
        cache = config.create_timing_cache(blob)
        reused = cache is not None and config.set_timing_cache(cache, ignore_mismatch=False)
    except (RuntimeError, TypeError):  # unreadable cache file
        reused = False
    if not reused:  # none yet, or from another device / TensorRT version: start afresh
        if not config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False):
            raise ExportError("TensorRT refused an empty timing cache")
    log(f"building TensorRT {trt.__version__} engine (batch {mn}/{opt}/{mx}, strongly typed, "
        f"TF32 off) ...")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError("TensorRT failed to build the engine (see the TensorRT messages above)")
    sidecar = write_engine(plan, memoryview(serialized).tobytes(), {
        "onnx": Path(onnx_path).name, **{k: meta.get(k) for k in (
            "classnames", "image_size", "mean", "std", "output", "method", "backbone",
            "fastprompt_version", "run_fingerprint")},
        "precision": precision, "tf32": False, "batch": {"min": mn, "opt": opt, "max": mx},
        "input": inp.name, **device_info()})
    timings = memoryview(config.get_timing_cache().serialize()).tobytes()
    write_bytes(cache_file, timings)
    log(f"wrote {plan} ({Path(plan).stat().st_size / 1e6:.1f} MB), {sidecar_path(plan).name}, "
        f"{cache_file.name}")
    return sidecar


@torch.no_grad()
def check_engine(plan, module, image_size: int, batch: int, fp16: bool, log=print):
    """TensorRT runner vs the torch module (fp32, same GPU) on random images."""
    runner = TensorRTRunner(plan)
    module = module.cuda()
    x = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    x = x.cuda()
    ref, got = module(x).float().cpu().numpy(), runner.run(x).float().cpu().numpy()
    abs_err, rel_err, _ = compare(ref, got, top1=False)
    agree = float((ref.argmax(1) == got.argmax(1)).mean())
    tol = FP16_MAX_REL_ERR if fp16 else FP32_MAX_REL_ERR
    line = (f"TensorRT vs torch (batch {batch}): max abs err {abs_err:.2e}, max rel err "
            f"{rel_err:.2e}, top-1 agreement {agree:.1%}")
    log(line)
    if rel_err > tol:
        raise ExportCheckError(f"{plan} does not reproduce the torch classifier: {line} "
                               f"(tolerance rel err <= {tol:g})")
    return abs_err, rel_err, agree


def export_tensorrt(run_dir, out, *, batch=DEFAULT_BATCH, fp16: bool = True, features: bool = False,
                    opset: int = 17, exporter: str = "torchscript", log=print) -> dict:
    """Run -> ONNX (next to the engine, checked) -> engine + sidecar (checked on the GPU)."""
    check_out_suffix("tensorrt", out)
    require_tensorrt()
    batch = parse_batch(batch)
    out = Path(out)
    exported = export_onnx(run_dir, out.with_suffix(".onnx"), features=features, opset=opset,
                           exporter=exporter, log=log)
    sidecar = build_engine(exported.path, out, batch, fp16=fp16, log=log)
    check_engine(out, exported.module, exported.image_size, batch[1],
                 sidecar["precision"] == "fp16", log=log)
    return sidecar
