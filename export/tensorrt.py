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
  - a timing cache next to the engine (`X.timing.cache`), read before and written after the build;
    one written on another GPU or TensorRT version is replaced, with one line of ours instead of
    TensorRT's error message.
The plan and its sidecar `X.plan.json` (what a runner needs, what the engine is bound to, the
plan's sha256) are written and checked by `engine.py`, whose names are importable from here too.

`export_tensorrt(run, out)` builds the pair under a temporary name next to `out`, checks it on the
GPU against the torch classifier (`check_engine`), and only then moves it into place: an engine
that fails the check is kept as `X.rejected.plan` (marked so in its sidecar, refused by predict)
and the engine deployed before stays as it was.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from fastprompt.errors import ExportCheckError, ExportError, first_line
from fastprompt.files import atomic_write, move_into_place, write_bytes

from .engine import (SIDECAR_FORMAT, SUPPORTED_MAJORS, TensorRTUnavailable,  # noqa: F401
                     check_compatible, construct, device_info, keep_rejected, quiet_tensorrt,
                     read_engine, rejected_path, require_tensorrt, sidecar_path, tensorrt_major,
                     tensorrt_missing, timing_cache_path, trt_logger, write_engine)
from .model import read_metadata
from .onnx import compare, export_onnx
from .runners import RunnerError, TensorRTRunner, check_out_suffix

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
    builder = construct(trt, "Builder", trt_logger())
    network = builder.create_network(_enum_flags(trt.NetworkDefinitionCreationFlag, flags.network))
    parser = construct(trt, "OnnxParser", network, trt_logger())
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
    attach_timing_cache(config, cache_file, log)
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
    log(f"built the engine ({Path(plan).stat().st_size / 1e6:.1f} MB); timing cache {cache_file}")
    return sidecar


def attach_timing_cache(config, cache_file: Path, log=print) -> bool:
    """Give the builder config the timing cache read from `cache_file`, or an empty one when there
    is none or TensorRT refuses it. set_timing_cache(ignore_mismatch=False) refuses a cache whose
    header records other CUDA device properties (NvInfer.h, IBuilderConfig::setTimingCache) and
    logs an error doing so; a cache from another GPU or TensorRT version is an expected case here,
    so TensorRT is silenced for that try and one line says what happened. True if it was reused."""
    blob = cache_file.read_bytes() if cache_file.is_file() else b""
    reused = False
    if blob:
        with quiet_tensorrt():
            try:
                cache = config.create_timing_cache(blob)
                reused = cache is not None and bool(config.set_timing_cache(cache, False))
            except (RuntimeError, TypeError):  # a damaged file
                reused = False
        if not reused:
            log(f"timing cache {cache_file} was written on another GPU or TensorRT version (or is "
                f"damaged): starting a new one")
    if not reused:
        cache = config.create_timing_cache(b"")
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            raise ExportError("TensorRT refused an empty timing cache")
    return reused


@contextlib.contextmanager
def fp32_reference():
    """Plain fp32 for cuBLAS matmuls and cuDNN convolutions (no TF32) inside, every setting of the
    caller's restored after. cuDNN convolutions run in TF32 by default in torch. torch >= 2.9
    keeps per-backend `fp32_precision` settings beside the legacy ones (`allow_tf32`,
    `set_float32_matmul_precision`) and refuses to read a legacy one that disagrees with them
    (aten Context.cpp), so both are set, consistently, and put back as they were."""
    bk, matmul, cudnn = torch.backends, torch.backends.cuda.matmul, torch.backends.cudnn
    if not hasattr(getattr(cudnn, "conv", None), "fp32_precision"):  # torch < 2.9: legacy only
        saved = matmul.allow_tf32, cudnn.allow_tf32
        matmul.allow_tf32 = cudnn.allow_tf32 = False
        try:
            yield
        finally:
            matmul.allow_tf32, cudnn.allow_tf32 = saved
        return
    new = (matmul, cudnn.conv, cudnn.rnn, bk.mkldnn.matmul)
    saved_new = [s.fp32_precision for s in new]
    legacy = []
    for get, set_, off in ((torch.get_float32_matmul_precision, torch.set_float32_matmul_precision,
                            "highest"), (lambda: cudnn.allow_tf32,
                                         lambda v: setattr(cudnn, "allow_tf32", v), False)):
        try:  # unreadable when the caller mixed the two kinds: then left alone
            legacy.append((set_, get()))
            set_(off)
        except RuntimeError:
            pass
    matmul.fp32_precision = cudnn.conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        for set_, value in legacy:
            set_(value)
        for setting, value in zip(new, saved_new):
            setting.fp32_precision = value


def check_batches(mn: int, opt: int, mx: int) -> list[int]:
    """The batch sizes `check_engine` runs: the deployment batch, and one past the profile's max
    (a full chunk plus a last one of 1 image, padded to the min when min > 1)."""
    return sorted({opt, mx + 1})


@torch.no_grad()
def check_engine(plan, module, image_size: int, batch, fp16: bool, log=print):
    """TensorRT runner vs the torch module in fp32 (TF32 off) on the runner's GPU, on random
    images at each of `check_batches(*batch)` (the chunked and padded paths included). The
    module is copied to the GPU; the caller's stays where it is. Returns (max abs err, max rel
    err, top-1 agreement) over all images."""
    mn, opt, mx = parse_batch(batch)
    runner = TensorRTRunner(plan)
    device = runner.torch_device
    ref_module = copy.deepcopy(module).to(device).eval()
    gen = torch.Generator().manual_seed(0)
    refs, gots = [], []
    for n in check_batches(mn, opt, mx):
        x = torch.randn(n, 3, image_size, image_size, generator=gen).to(device)
        with fp32_reference():  # at most opt images per pass: the reference's memory stays bounded
            refs.append(torch.cat([ref_module(x[i:i + opt]) for i in range(0, n, opt)]).float().cpu())
        gots.append(runner.run(x).float().cpu())
    ref, got = torch.cat(refs).numpy(), torch.cat(gots).numpy()
    abs_err, rel_err, _ = compare(ref, got, top1=False)
    agree = float((ref.argmax(1) == got.argmax(1)).mean())
    tol = FP16_MAX_REL_ERR if fp16 else FP32_MAX_REL_ERR
    line = (f"TensorRT vs torch (batches {', '.join(map(str, check_batches(mn, opt, mx)))}): max "
            f"abs err {abs_err:.2e}, max rel err {rel_err:.2e}, top-1 agreement {agree:.1%}")
    log(line)
    if not rel_err <= tol:  # NaN fails too
        raise ExportCheckError(f"the engine does not reproduce the torch classifier: {line} "
                               f"(tolerance rel err <= {tol:g})")
    return abs_err, rel_err, agree


def export_tensorrt(run_dir, out, *, batch=DEFAULT_BATCH, fp16: bool = True, features: bool = False,
                    opset: int = 17, exporter: str = "torchscript", log=print) -> dict:
    """Run -> ONNX (next to the engine, checked) -> engine + sidecar, built under a temporary name,
    checked on the GPU and only then moved to `out` (plan, then sidecar). An engine that fails
    the check, or fails while being checked, is kept as `X.rejected.plan` with a sidecar marking
    it rejected, and whatever `out` held before is left as it was (ExportCheckError)."""
    check_out_suffix("tensorrt", out)
    require_tensorrt()
    batch = parse_batch(batch)
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"--out {out} is a directory: give a file name such as model.plan")
    exported = export_onnx(run_dir, out.with_suffix(".onnx"), features=features, opset=opset,
                           exporter=exporter, log=log)
    built = {}

    def build_and_check(tmp: Path) -> None:  # atomic_write then moves tmp (the plan) to out
        built["tmp"] = tmp
        built["sidecar"] = build_engine(exported.path, tmp, batch, fp16=fp16,
                                        timing_cache=timing_cache_path(out), log=log)
        try:
            check_engine(tmp, exported.module, exported.image_size, batch,
                         built["sidecar"]["precision"] == "fp16", log=log)
        except (ExportCheckError, RunnerError) as err:
            rejected = keep_rejected(tmp, out, first_line(err))
            raise ExportCheckError(f"{first_line(err)}; {out} left as it was, the engine kept as "
                                   f"{rejected} (refused by predict)") from None

    try:
        atomic_write(out, build_and_check)
        # the sidecar follows the plan: in between, a reader finds hashes that differ and is refused
        move_into_place(sidecar_path(built["tmp"]), sidecar_path(out))
    finally:
        if "tmp" in built:
            sidecar_path(built["tmp"]).unlink(missing_ok=True)
    log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) and {sidecar_path(out).name}, checked "
        f"against torch")
    return built["sidecar"]
