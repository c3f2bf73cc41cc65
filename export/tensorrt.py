"""TensorRT engines built from the exported ONNX file (TensorRT 10 Python API).

`build_engine(onnx, plan)`: builder -> network from `OnnxParser` -> builder config with
  - FP16 allowed by default, with every normalisation layer (opset-17 LayerNormalization, imported
    as INormalizationLayer) and the small head after the last one (ln_post, projection, L2
    normalisation, text matmul) pinned to FP32 under OBEY_PRECISION_CONSTRAINTS: CLIP's residual
    stream overflows FP16 in the variance of a LayerNorm otherwise. `fp16=False` builds FP32
    (TF32 off). TensorRT >= 11 has no weak typing: there the network is strongly typed and runs in
    the ONNX file's precision (FP32), which is said in the log and recorded in the sidecar.
  - one optimisation profile over the batch axis (min, opt, max); opt is the deployment batch;
  - a timing cache next to the engine (`X.timing.cache`), read before and written after the build.
The sidecar `X.plan.json` holds what a runner needs (class names, image size, mean/std, output)
plus what the engine is bound to (GPU name, TensorRT version, run fingerprint); a runner refuses an
engine built on another GPU or TensorRT version (`check_compatible`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .onnx import ExportCheckError, ExportError, compare, export_onnx, read_metadata

SIDECAR_FORMAT = "fastprompt-engine/1"
DEFAULT_BATCH = (1, 32, 128)
FP16_MAX_REL_ERR = 3e-2   # fp16 matmuls / attention vs the fp32 torch classifier
FP32_MAX_REL_ERR = 1e-3


class TensorRTUnavailable(ExportError):
    """TensorRT or CUDA is missing (one-line reason)."""


def require_tensorrt():
    """The `tensorrt` module (>= 10) and a CUDA device, or TensorRTUnavailable saying what is missing."""
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTUnavailable("TensorRT is not installed: pip install 'fastprompt[tensorrt]' "
                                  "(needs an NVIDIA GPU with CUDA)") from None
    if int(trt.__version__.split(".")[0]) < 10:
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} is too old: fastprompt needs >= 10")
    if not torch.cuda.is_available():
        raise TensorRTUnavailable("TensorRT engines need a CUDA device and torch sees none")
    return trt


def parse_batch(text) -> tuple[int, int, int]:
    """'MIN,OPT,MAX' -> (min, opt, max) with 1 <= min <= opt <= max."""
    try:
        vals = tuple(int(v) for v in (text.split(",") if isinstance(text, str) else text))
    except ValueError:
        vals = ()
    if len(vals) != 3 or not 1 <= vals[0] <= vals[1] <= vals[2]:
        raise ExportError(f"--batch must be MIN,OPT,MAX with 1 <= MIN <= OPT <= MAX, got {text!r}")
    return vals


def sidecar_path(plan) -> Path:
    return Path(f"{plan}.json")


def timing_cache_path(plan) -> Path:
    return Path(plan).with_suffix(".timing.cache")


def device_info() -> dict:
    import tensorrt as trt

    return {"gpu": torch.cuda.get_device_name(), "tensorrt_version": trt.__version__,
            "compute_capability": ".".join(map(str, torch.cuda.get_device_capability()))}


def read_sidecar(plan) -> dict:
    path = sidecar_path(plan)
    if not path.is_file():
        raise ExportError(f"{path} not found: an engine needs the sidecar written next to it by "
                          f"python -m fastprompt.export --format tensorrt")
    meta = json.loads(path.read_text())
    if meta.get("format") != SIDECAR_FORMAT:
        raise ExportError(f"{path} has format {meta.get('format')!r}, expected {SIDECAR_FORMAT!r}")
    return meta


def check_compatible(meta: dict, plan) -> None:
    """Refuse an engine built for another GPU or TensorRT version (engines are not portable)."""
    here = device_info()
    for key, what in (("gpu", "GPU"), ("tensorrt_version", "TensorRT version")):
        if meta.get(key) != here[key]:
            raise ExportError(
                f"{plan} was built for {what} {meta.get(key)!r} but this machine has {here[key]!r}: "
                f"TensorRT engines only run where they were built; rebuild it here from the run or "
                f"the ONNX file (python -m fastprompt.export --format tensorrt ...)")


def _write(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _keep_fp32(trt, network) -> int:
    """Pin normalisation layers and everything after the last one to FP32; return how many."""
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    norms = [i for i, l in enumerate(layers) if l.type == trt.LayerType.NORMALIZATION]
    last = norms[-1] if norms else len(layers)
    skip = {trt.LayerType.CONSTANT, trt.LayerType.SHAPE}
    floats = (trt.float32, trt.float16)
    pinned = 0
    for i, layer in enumerate(layers):
        if not (i in norms or i >= last) or layer.type in skip:
            continue
        outs = [layer.get_output(k) for k in range(layer.num_outputs)]
        if not all(o.dtype in floats for o in outs):
            continue  # shape / index arithmetic
        if layer.type == trt.LayerType.NORMALIZATION:
            layer.__class__ = trt.INormalizationLayer  # get_layer returns the ILayer base class
            layer.compute_precision = trt.float32
        layer.precision = trt.float32
        for k in range(layer.num_outputs):
            layer.set_output_type(k, trt.float32)
        pinned += 1
    return pinned


def build_engine(onnx_path, plan, batch=DEFAULT_BATCH, fp16: bool = True, timing_cache=None,
                 log=print) -> dict:
    """Build `plan` from `onnx_path`; write the timing cache (default: next to the engine) and the
    sidecar; return the sidecar."""
    import onnx

    trt = require_tensorrt()
    mn, opt, mx = parse_batch(batch)
    proto = onnx.load(str(onnx_path), load_external_data=False)
    meta = read_metadata({p.key: p.value for p in proto.metadata_props})
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    weak = hasattr(trt.BuilderFlag, "FP16")  # TensorRT 10; 11 is strongly typed only
    flags = 0 if weak else 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path}: {errors or 'unknown error'}")
    inp = network.get_input(0)
    size = meta["image_size"]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape(inp.name, (mn, 3, size, size), (opt, 3, size, size), (mx, 3, size, size))
    config.add_optimization_profile(profile)
    precision = "fp32"
    if fp16 and weak:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        precision = "fp16"
        pinned = _keep_fp32(trt, network)
        if not any(network.get_layer(i).type == trt.LayerType.NORMALIZATION
                   for i in range(network.num_layers)):
            log("warning: the parser produced no normalisation layers, so none could be kept in "
                "fp32; check the engine's accuracy or build with --fp32")
        log(f"fp16 build; {pinned} normalisation / head layers kept in fp32")
    elif fp16:
        log(f"TensorRT {trt.__version__} is strongly typed only: building in the ONNX file's fp32")
    elif weak:
        config.clear_flag(trt.BuilderFlag.TF32)
    cache_file = Path(timing_cache) if timing_cache else timing_cache_path(plan)
    blob = cache_file.read_bytes() if cache_file.is_file() else b""
    try:
        cache = config.create_timing_cache(blob)
        reused = cache is not None and config.set_timing_cache(cache, ignore_mismatch=False)
    except (RuntimeError, TypeError):  # unreadable cache file
        reused = False
    if not reused:  # none yet, or from another device / TensorRT version: start afresh
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    log(f"building TensorRT {trt.__version__} engine (batch {mn}/{opt}/{mx}) ...")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError("TensorRT failed to build the engine (see the TensorRT messages above)")
    plan = Path(plan)
    plan.parent.mkdir(parents=True, exist_ok=True)
    _write(plan, serialized)
    _write(cache_file, config.get_timing_cache().serialize())
    sidecar = {
        "format": SIDECAR_FORMAT, "onnx": Path(onnx_path).name, **{k: meta.get(k) for k in (
            "classnames", "image_size", "mean", "std", "output", "method", "backbone",
            "fastprompt_version", "run_fingerprint")},
        "precision": precision, "batch": {"min": mn, "opt": opt, "max": mx},
        "input": inp.name, **device_info(),
    }
    sidecar_path(plan).write_text(json.dumps(sidecar, indent=2))
    log(f"wrote {plan} ({plan.stat().st_size / 1e6:.1f} MB), {sidecar_path(plan).name}, "
        f"{cache_file.name}")
    return sidecar


@torch.no_grad()
def check_engine(plan, module, image_size: int, batch: int, fp16: bool, log=print):
    """TensorRT runner vs the torch module (fp32, same GPU) on random images."""
    from .runners import TensorRTRunner

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
    require_tensorrt()
    batch = parse_batch(batch)
    out = Path(out)
    if out.suffix == ".onnx":
        raise ExportError(f"--out {out}: give the engine file (e.g. model.plan); the ONNX file is "
                          f"written next to it")
    exported = export_onnx(run_dir, out.with_suffix(".onnx"), features=features, opset=opset,
                           exporter=exporter, log=log)
    sidecar = build_engine(exported.path, out, batch, fp16=fp16, log=log)
    check_engine(out, exported.module, exported.image_size, min(batch[1], batch[2]),
                 sidecar["precision"] == "fp16", log=log)
    return sidecar
