"""ONNX export of a run's classifier: one image pass, the learned prompts/adapters baked in.

The graph is `images [B, 3, S, S] -> logits [B, C]` (or, with `features=True`, the normalised image
features [B, E]). It is traced from `model.classifier()` after `use_reference_kernels()`, so the
image-side prompts and adapter weights become constants and the cached text matrix becomes an
initializer; the text tower is never run by the graph and none of its weights are stored.

Exporter: `torch.onnx.export(dynamo=False)`, the TorchScript tracer. The classifier's forward is
straight-line tensor code (no data-dependent control flow), the case tracing captures exactly; it
exports `scaled_dot_product_attention` (non-causal in the image tower) and emits opset-17
`LayerNormalization`; it exists on every torch the package allows (the dynamo exporter needs
torch >= 2.5 and onnxscript) and takes ~1 s for the tiny backbone where the dynamo exporter takes
~10 s here. Both were checked against onnxruntime on torch 2.14 (max abs error ~1e-6 either way);
the dynamo exporter's graph is a little tidier but it implements opset >= 18 only (17 is
down-converted, which fails for this graph), so it runs at 18. The TorchScript exporter is
deprecated upstream (a DeprecationWarning since torch 2.9), so the dynamo exporter stays
selectable (`exporter="dynamo"`, `--exporter dynamo`) and has a test.
"""
from __future__ import annotations

import inspect
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fastprompt.errors import ExportCheckError, ExportError, first_line, require
from fastprompt.files import atomic_write, move_into_place

from .model import (_ImagesOnly, exportable_classifier, load_run, metadata,  # noqa: F401
                    read_metadata, run_fingerprint)

MIN_OPSET = 17
INPUT = "images"
EXPORTERS = ("torchscript", "dynamo")
MAX_REL_ERR = 1e-3


def _trace(module: nn.Module, example: torch.Tensor, opset: int, exporter: str, out_name: str):
    import onnx

    if exporter == "dynamo":  # implements opset >= 18; a request for 17 is down-converted, which fails
        opset = max(opset, 18)
        batch = torch.export.Dim("batch", min=1, max=65536)
        prog = torch.onnx.export(module, (example,), dynamo=True, input_names=[INPUT],
                                 output_names=[out_name], dynamic_shapes={"images": {0: batch}},
                                 opset_version=opset, optimize=True, verbose=False)
        return prog.model_proto
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # the tracer flags the shape checks of the reference kernels (constant for a trace) and
        # the exporter's own deprecation notice: both expected here
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
        torch.onnx.export(module, (example,), buf, **legacy, input_names=[INPUT],
                          output_names=[out_name], opset_version=opset, do_constant_folding=True,
                          dynamic_axes={INPUT: {0: "batch"}, out_name: {0: "batch"}})
    return onnx.load_from_string(buf.getvalue())


def _clean(proto):
    """Graph clean-up after the tracer's own constant folding: fold what is left (shape
    arithmetic), drop dead nodes, lift Constant nodes to initializers, deduplicate initializers
    and common subexpressions. Uses onnxscript / onnx_ir when installed (the dev extra); their
    pattern rewriter is left out: it saves ~10% of the nodes and costs seconds per export."""
    try:
        import onnx_ir as ir
        import onnx_ir.passes.common as passes
        from onnxscript.optimizer import fold_constants
    except ImportError:
        return proto
    model = ir.from_proto(proto)
    fold_constants(model)
    ir.passes.Sequential(
        passes.RemoveUnusedNodesPass(),
        passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        passes.DeduplicateInitializersPass(),
        passes.CommonSubexpressionEliminationPass(),
        passes.RemoveUnusedNodesPass(),
    )(model)
    return ir.to_proto(model)


def initializer_bytes(proto) -> int:
    import onnx

    return sum(int(np.prod(t.dims, dtype=np.int64)) * np.dtype(
        onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize for t in proto.graph.initializer)


@dataclass
class CheckResult:
    """onnxruntime vs torch on random images, per batch size."""

    max_abs: float = 0.0
    max_rel: float = 0.0          # max |ort - torch| / max |torch|
    top1_same: bool = True
    per_batch: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:  # NaN compares False, so a NaN error can never pass
        return bool(self.max_rel <= MAX_REL_ERR) and self.top1_same

    def line(self) -> str:
        top1 = "same top-1" if self.top1_same else "DIFFERENT top-1"
        return (f"onnxruntime vs torch (batches {', '.join(map(str, self.per_batch))}): max abs err "
                f"{self.max_abs:.2e}, max rel err {self.max_rel:.2e}, {top1}")


def compare(ref: np.ndarray, got: np.ndarray, top1: bool = True) -> tuple[float, float, bool]:
    """max abs error, max rel error (over max |ref|), and whether every row has the same argmax.
    NaN-aware: a NaN or inf on either side (or a shape mismatch) is an infinite error and a
    different top-1, never "0" (NumPy's max would propagate or skip it)."""
    ref, got = np.asarray(ref, dtype=np.float64), np.asarray(got, dtype=np.float64)
    if ref.shape != got.shape or not (np.isfinite(ref).all() and np.isfinite(got).all()):
        return float("inf"), float("inf"), False
    if ref.size == 0:
        return 0.0, 0.0, True
    err = float(np.abs(ref - got).max())
    same = bool((ref.argmax(1) == got.argmax(1)).all()) if top1 else True
    return err, err / max(float(np.abs(ref).max()), 1e-12), same


@torch.no_grad()
def check_onnx(path, module: nn.Module, image_size: int, batches=(1, 3), seed: int = 0,
               logits: bool = True) -> CheckResult:
    """Run the ONNX file with onnxruntime (CPU) and the torch module on the same random images
    (top-1 is compared for logits only)."""
    ort = require("onnxruntime", what="checking an ONNX export")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(seed)
    res = CheckResult()
    for b in batches:
        x = torch.randn(b, 3, image_size, image_size, generator=g)
        ref = module(x).float().numpy()
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        abs_err, rel_err, same = compare(ref, got, top1=logits)
        res.per_batch[b] = (abs_err, rel_err, same)
        res.max_abs, res.max_rel = max(res.max_abs, abs_err), max(res.max_rel, rel_err)
        res.top1_same &= same
    return res


@dataclass
class OnnxExport:
    path: Path
    method: str
    classnames: list
    image_size: int
    output: str
    check: CheckResult | None
    model: object = None       # the fastprompt model it came from (for further checks)
    module: object = None      # the traced torch module (reference path)


@torch.no_grad()
def export_onnx(source, out, *, features: bool = False, opset: int = MIN_OPSET,
                exporter: str = "torchscript", check: bool = True, log=print) -> OnnxExport:
    """Export a run directory (or an in-memory model) to `out`; check it with onnxruntime.

    Raises ExportError for bad input and ExportCheckError when onnxruntime disagrees with torch
    (rel err > 1e-3, a different top-1, or NaN/inf outputs). The file is written atomically and
    only once it passed the check, so an existing `out` is never lost: a file that fails the check
    is left next to it as `<name>.rejected.onnx` for inspection. Every optional package the export
    needs is checked before any work (MissingDependency naming the extra).
    """
    onnx = require("onnx", what="ONNX export")
    if check:
        require("onnxruntime", what="the check of an ONNX export")
    if exporter == "dynamo":
        require("onnxscript", what="the dynamo exporter")
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter '{exporter}': choose {' or '.join(EXPORTERS)}")
    if int(opset) < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old: LayerNormalization needs opset >= {MIN_OPSET}")
    if Path(out).is_dir():
        raise ExportError(f"--out {out} is a directory: give a file name such as model.onnx")
    if isinstance(source, (str, Path)):
        model, fingerprint = load_run(source), run_fingerprint(source)
    else:
        model, fingerprint = source, None
    clf = exportable_classifier(model)
    module = _ImagesOnly(clf, features).eval()
    size = int(clf.image_size)
    n_bytes = sum(p.numel() * 4 for p in clf.backbone.visual.parameters())
    if n_bytes > 1.9e9:
        raise ExportError(f"the image tower holds {n_bytes / 1e9:.1f} GB of weights, over the 2 GB "
                          f"protobuf limit of a single-file ONNX model (external data not supported)")
    example = torch.randn(2, 3, size, size)  # batch 2 traced; the check runs 1 and 3
    try:
        proto = _trace(module, example, int(opset), exporter, "features" if features else "logits")
    except Exception as err:  # exporter failures surface as many exception types
        raise ExportError(f"{exporter} export failed: {first_line(err)}") from err
    proto = _clean(proto) if exporter == "torchscript" else proto
    if len(proto.graph.input) != 1:
        raise ExportError(f"exported graph has {len(proto.graph.input)} inputs, expected 1 (images)")
    onnx.helper.set_model_props(proto, metadata(model, clf, features, fingerprint))
    onnx.checker.check_model(proto)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    output = "features" if features else "logits"
    result = OnnxExport(path, model.name, list(clf.classnames), size, output, None, model, module)

    def write_checked(tmp: Path) -> None:
        onnx.save(proto, str(tmp))
        if not check:
            return
        result.check = check_onnx(tmp, module, size, logits=not features)
        log(result.check.line())
        if not result.check.ok:
            rejected = path.with_name(f"{path.stem}.rejected{path.suffix or '.onnx'}")
            move_into_place(tmp, rejected)
            raise ExportCheckError(f"the export does not reproduce the torch classifier: "
                                   f"{result.check.line()} (tolerance: rel err <= {MAX_REL_ERR:g} "
                                   f"and the same top-1); {path} left as it was, the export kept "
                                   f"as {rejected}")

    atomic_write(path, write_checked)
    opset = max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    log(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, opset {opset}, {exporter} exporter; "
        f"{model.name}, {len(clf.classnames)} classes, {output} out)")
    return result
