"""TensorRT export without TensorRT: everything that does not need an engine is a plain function,
tested here (flag choice per TensorRT version against recorded enum names, the extras, the fp16 /
fp32 graph the engine is built from, chunking / padding / alignment, the plan + sidecar pair).
What fastprompt does around TensorRT's calls (errors, engine files, devices, the check) is tested
with a fake `tensorrt` module in tests/test_tensorrt_fake.py. The engine tests at the end need
TensorRT and a GPU and skip otherwise: they are what only a GPU with TensorRT can confirm.
"""
from __future__ import annotations

import copy
import enum
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import fastprompt as fp  # noqa: E402
from common import CLASSNAMES, perturb, tiny_clip  # noqa: E402
from fastprompt import predict as predict_cli  # noqa: E402
from fastprompt.export import ExportError, export_onnx  # noqa: E402
from fastprompt.export import __main__ as export_cli  # noqa: E402
from fastprompt.export import engine as fp_engine  # noqa: E402
from fastprompt.export import fp16 as fp_fp16  # noqa: E402
from fastprompt.export import runners  # noqa: E402
from fastprompt.export import tensorrt as fp_trt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# Enum members of the TensorRT Python bindings (python/src/infer/pyCore.cpp of NVIDIA/TensorRT,
# branches release/10.12, release/10.16, release/11.1; NetworkDefinitionCreationFlag values from
# include/NvInfer.h; 10.12 and 10.16 have the same members). The tensorrt_cu13_bindings 11.4.0.106
# wheel (what `pip install "fastprompt[tensorrt]"` resolves to today) was checked too: its module
# holds TF32 and STRONGLY_TYPED, and no FP16, OBEY_PRECISION_CONSTRAINTS or EXPLICIT_BATCH.
_BUILDER_10 = ("FP16 BF16 INT8 DEBUG GPU_FALLBACK REFIT DISABLE_TIMING_CACHE EDITABLE_TIMING_CACHE "
               "TF32 SPARSE_WEIGHTS SAFETY_SCOPE OBEY_PRECISION_CONSTRAINTS "
               "PREFER_PRECISION_CONSTRAINTS DIRECT_IO VERSION_COMPATIBLE EXCLUDE_LEAN_RUNTIME FP8 "
               "ERROR_ON_TIMING_CACHE_MISS DISABLE_COMPILATION_CACHE WEIGHTLESS STRIP_PLAN "
               "REFIT_IDENTICAL WEIGHT_STREAMING INT4 REFIT_INDIVIDUAL STRICT_NANS MONITOR_MEMORY "
               "FP4 DISTRIBUTIVE_INDEPENDENCE").split()
_NETWORK_10 = {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1, "PREFER_JIT_PYTHON_PLUGINS": 2,
               "PREFER_AOT_PYTHON_PLUGINS": 3}
RECORDED = {
    "10.12.0.36": {"BuilderFlag": _BUILDER_10, "NetworkDefinitionCreationFlag": _NETWORK_10},
    "10.16.1.11": {"BuilderFlag": _BUILDER_10, "NetworkDefinitionCreationFlag": _NETWORK_10},
    "11.1.0.106": {
        "BuilderFlag": ("DEBUG GPU_FALLBACK REFIT DISABLE_TIMING_CACHE EDITABLE_TIMING_CACHE TF32 "
                        "SPARSE_WEIGHTS SAFETY_SCOPE DIRECT_IO VERSION_COMPATIBLE "
                        "EXCLUDE_LEAN_RUNTIME ERROR_ON_TIMING_CACHE_MISS DISABLE_COMPILATION_CACHE "
                        "STRIP_PLAN REFIT_IDENTICAL WEIGHT_STREAMING REFIT_INDIVIDUAL STRICT_NANS "
                        "MONITOR_MEMORY DISTRIBUTIVE_INDEPENDENCE").split(),
        "NetworkDefinitionCreationFlag": {"STRONGLY_TYPED": 0, "PREFER_JIT_PYTHON_PLUGINS": 1,
                                          "PREFER_AOT_PYTHON_PLUGINS": 2},
    },
}


# ------------------------------------------------------------------- flag choice per version
@pytest.mark.parametrize("version", sorted(RECORDED))
def test_build_flags_exist_in_that_version(version):
    rec, flags = RECORDED[version], fp_trt.build_flags(version)
    assert set(flags.network) <= set(rec["NetworkDefinitionCreationFlag"])
    assert set(flags.clear) <= set(rec["BuilderFlag"])
    assert "TF32" in flags.clear  # on by default in 10 and 11: fp32 must mean fp32
    # the create_network mask from the version's own enum values: strongly typed on 10.x (bit 1),
    # nothing on 11.x (always strongly typed; its STRONGLY_TYPED is a deprecated no-op at bit 0)
    members = enum.IntEnum("NetworkDefinitionCreationFlag", rec["NetworkDefinitionCreationFlag"])
    mask = fp_trt._enum_flags(members, flags.network)
    assert mask == (1 << 1 if version.startswith("10.") else 0)


@pytest.mark.parametrize("version", ["9.3.0", "10.0.1", "10.11.0.33", "10", "12.0.0.1", "", "trt"])
def test_unsupported_tensorrt_versions_are_refused(version):
    with pytest.raises(fp_trt.TensorRTUnavailable, match=r"10\.12 or later 10\.x, or 11\.x"):
        fp_trt.build_flags(version)


# TensorRT versions, and whether fastprompt supports them (10.12+: NVIDIA's strong typing)
VERSIONS = {"9.3.0": False, "10.0.1": False, "10.11.0.33": False, "10.12.0.36": True,
            "10.13.0.35": True, "10.16.1.11": True, "11.1.0.106": True, "11.4.0.106": True,
            "12.0.0": False}


def test_tensorrt_extras_install_supported_versions_per_cuda():
    """One extra per CUDA major (NVIDIA's wheels tensorrt-cu11/12/13, names checked on PyPI) plus
    NVIDIA's metapackage; each allows exactly the versions `tensorrt_major` accepts."""
    from packaging.requirements import Requirement

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    wanted = {"tensorrt": "tensorrt", **{f"tensorrt-cu{m}": f"tensorrt-cu{m}"
                                         for m in fp_engine.CUDA_EXTRAS}}
    assert {k for k in extras if k.startswith("tensorrt")} == set(wanted)
    for extra, package in wanted.items():
        reqs = list(map(Requirement, extras[extra]))
        assert "fastprompt[export]" in extras[extra]
        (req,) = [r for r in reqs if r.name.startswith("tensorrt")]
        assert req.name == package, extra
        for version, ok in VERSIONS.items():
            assert req.specifier.contains(version) == ok, (extra, version)
    for version, ok in VERSIONS.items():
        try:
            fp_engine.tensorrt_major(version)
            assert ok, version
        except fp_engine.TensorRTUnavailable:
            assert not ok, version


# --------------------------------------------------------------------- the graph's precision
@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """Exported fp32 graphs of the tiny backbone: MaPLe logits, MMA features."""
    base = tmp_path_factory.mktemp("trt_onnx")
    out = {}
    for i, (method, features) in enumerate((("maple", False), ("mma", True))):
        torch.manual_seed(i)
        model = perturb(fp.create(method, tiny_clip(), CLASSNAMES), seed=i)
        res = export_onnx(model, base / f"{method}.onnx", features=features, check=False,
                          log=lambda *_: None)
        out[method] = onnx.load(str(res.path))
    return out


def _types(proto):
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    types = {t.name: t.data_type for t in inferred.graph.initializer}
    g = inferred.graph
    for v in list(g.input) + list(g.value_info) + list(g.output):
        types[v.name] = v.type.tensor_type.elem_type
    return types


def _run(proto, x):
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"images": x})[0]


@pytest.mark.parametrize("method", ["maple", "mma"])
def test_mixed_graph_keeps_norms_and_head_fp32(method, graphs):
    fp32 = graphs[method]
    mixed = fp_fp16.to_mixed_fp16(fp32)
    types, F, H = _types(mixed), onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    nodes = list(mixed.graph.node)
    norms = [n for n in nodes if n.op_type == "LayerNormalization"]
    assert len(norms) == 26  # ln_pre, 2 per block x 12, ln_post
    for n in norms:
        assert all(types[t] == F for t in list(n.input) + list(n.output)), n.name
    head = [nodes[i] for i in fp_fp16._forward(nodes, set(norms[-1].output))]
    assert {"MatMul", "ReduceL2"} <= {n.op_type for n in head}
    for n in head:  # float tensors of the head: all fp32 (Shape etc. give int64)
        assert all(types[t] != H for t in list(n.input) + list(n.output) if t), n.name
    body = [n for n in nodes if n.op_type in ("MatMul", "Conv") and n not in head]
    assert body and all(types[n.input[0]] == H and types[n.input[1]] == H for n in body)
    assert types["images"] == F and types[mixed.graph.output[0].name] == F
    counts = fp_fp16.check_precision(mixed, fp16=True)
    assert counts["fp16_matmuls"] == len(body) and counts["fp32_norms"] == 26
    fp_fp16.check_precision(fp32, fp16=False)
    assert all(types.get(t.name) != H for t in fp32.graph.initializer)  # input graph untouched


@pytest.mark.parametrize("method", ["maple", "mma"])
def test_mixed_graph_computes_in_fp16_close_to_fp32(method, graphs):
    """onnxruntime runs the graph TensorRT gets: fp16 error (not fp32's ~1e-7), well within the
    engine check's tolerance."""
    x = np.random.default_rng(0).standard_normal((5, 3, 32, 32)).astype(np.float32)
    ref, got = _run(graphs[method], x), _run(fp_fp16.to_mixed_fp16(graphs[method]), x)
    assert got.dtype == np.float32 and got.shape == ref.shape
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert 1e-5 < rel < fp_trt.FP16_MAX_REL_ERR / 3, rel


def test_precision_check_refuses_wrong_graphs(graphs):
    fp32, mixed = graphs["maple"], fp_fp16.to_mixed_fp16(graphs["maple"])
    with pytest.raises(ExportError, match="0 of 73 are fp16"):  # fp16 build would run in fp32
        fp_fp16.check_precision(fp32, fp16=True)
    with pytest.raises(ExportError, match="fp32 build got a graph with .* fp16 tensors"):
        fp_fp16.check_precision(mixed, fp16=False)
    # a LayerNorm left in fp16: read its input before the up-cast, its scale / bias as fp16
    bad = onnx.ModelProto.FromString(mixed.SerializeToString())
    casts = {n.output[0]: n.input[0] for n in bad.graph.node if n.op_type == "Cast"}
    ln = next(n for n in bad.graph.node if n.op_type == "LayerNormalization")
    ln.input[0] = casts[ln.input[0]]
    ln.input[1:] = [f"{t}__fp16" for t in ln.input[1:]]
    _add_fp16_copies(bad, ln.input[1:])
    with pytest.raises(ExportError, match="LayerNormalization node .* fp16 tensor"):
        fp_fp16.check_precision(bad, fp16=True)
    # the head's last matmul fed fp16
    bad = onnx.ModelProto.FromString(mixed.SerializeToString())
    last = bad.graph.node[-1]
    assert last.op_type == "MatMul" and last.output[0] == "logits"
    new = [onnx.helper.make_node("Cast", [t], [f"{t}__h"], to=10) for t in last.input]
    last.input[:] = [f"{t}__h" for t in last.input]
    last.output[0] = "logits__h"
    new.append(onnx.helper.make_node("Cast", ["logits__h"], ["logits"], to=1))
    bad.graph.node.insert(len(bad.graph.node) - 1, new[0])
    bad.graph.node.insert(len(bad.graph.node) - 1, new[1])
    bad.graph.node.append(new[2])
    with pytest.raises(ExportError, match="head node .* fp16 tensor"):
        fp_fp16.check_precision(bad, fp16=True)


def _add_fp16_copies(proto, names):
    inits = {t.name: t for t in proto.graph.initializer}
    for name in names:
        if name not in inits and name.endswith("__fp16"):
            arr = onnx.numpy_helper.to_array(inits[name[: -len("__fp16")]]).astype(np.float16)
            proto.graph.initializer.append(onnx.numpy_helper.from_array(arr, name))


def _small_graph(with_norm=True):
    """x -> [LN ->] MatMul(W) -> y (head); x -> MatMul(W) -> Relu -> z: z is an fp16 output and W
    is shared by an fp16 node and a head node."""
    h = onnx.helper
    w = onnx.numpy_helper.from_array(np.eye(4, dtype=np.float32) * 2, "W")
    g1 = onnx.numpy_helper.from_array(np.ones(4, np.float32), "g")
    b1 = onnx.numpy_helper.from_array(np.zeros(4, np.float32), "b")
    nodes = [h.make_node("MatMul", ["images", "W"], ["m"]), h.make_node("Relu", ["m"], ["z"])]
    if with_norm:
        nodes += [h.make_node("LayerNormalization", ["images", "g", "b"], ["n"], axis=-1),
                  h.make_node("MatMul", ["n", "W"], ["y"])]
    else:
        nodes += [h.make_node("MatMul", ["z", "W"], ["y"])]
    io = lambda n: h.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [2, 4])  # noqa: E731
    graph = h.make_graph(nodes, "g", [io("images")], [io("y"), io("z")], [w, g1, b1])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


def test_mixed_graph_edges():
    proto = _small_graph()
    mixed = fp_fp16.to_mixed_fp16(proto)
    types = _types(mixed)
    assert types["z"] == types["y"] == onnx.TensorProto.FLOAT  # fp16 output cast back
    assert types["W"] == onnx.TensorProto.FLOAT and types["W__fp16"] == onnx.TensorProto.FLOAT16
    x = np.arange(8, dtype=np.float32).reshape(2, 4) / 8
    sess = ort.InferenceSession(mixed.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for a, b in zip(sess.run(None, {"images": x}), ref.run(None, {"images": x})):
        np.testing.assert_allclose(a, b, atol=2e-3)
    with pytest.raises(ExportError, match="no LayerNormalization.*--fp32"):
        fp_fp16.to_mixed_fp16(_small_graph(with_norm=False))


# ------------------------------------------------------------- chunking, padding, alignment
@pytest.mark.parametrize("n, mn, mx, want", [
    (70, 8, 64, [(0, 64, 64), (64, 70, 8)]),       # the case: last chunk of 6 padded to 8
    (6, 8, 64, [(0, 6, 8)]),                       # a batch under the minimum
    (128, 1, 64, [(0, 64, 64), (64, 128, 64)]),
    (11, 1, 8, [(0, 8, 8), (8, 11, 3)]),
    (0, 4, 8, []),
])
def test_chunks(n, mn, mx, want):
    assert runners.chunks(n, mn, mx) == want


def test_chunks_cover_every_row_once_within_the_profile():
    for n in range(0, 40):
        for mn, mx in ((1, 1), (1, 7), (3, 7), (7, 7), (2, 16)):
            got = runners.chunks(n, mn, mx)
            assert [i for a, b, _ in got for i in range(a, b)] == list(range(n))
            assert all(mn <= rows <= mx and rows >= b - a for a, b, rows in got)
    for bad in ((-1, 1, 2), (3, 0, 2), (3, 4, 2)):
        with pytest.raises(ValueError):
            runners.chunks(*bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_aligned_empty(dtype):
    for shape in ((1,), (3, 5), (7, 3, 2, 2), (0, 4)):
        t = runners.aligned_empty(shape, dtype, "cpu")
        assert t.shape == shape and t.dtype == dtype and t.is_contiguous()
        assert t.data_ptr() % runners.ALIGNMENT == 0


def test_engine_input_copies_only_when_needed():
    x = runners.aligned_empty((10, 3, 4, 4), torch.float32, "cpu")  # 192 bytes a row
    x.copy_(torch.randn(10, 3, 4, 4, generator=torch.Generator().manual_seed(0)))
    same = runners.engine_input(x, 4, 8, 4)  # offset 768 bytes: aligned, used as is
    assert same.data_ptr() == x[4].data_ptr()
    for start, stop, rows in ((1, 5, 4), (8, 10, 5)):  # offset 192 bytes; short chunk
        got = runners.engine_input(x, start, stop, rows)
        assert got.data_ptr() % runners.ALIGNMENT == 0 and got.is_contiguous()
        assert got.shape == (rows, 3, 4, 4) and torch.equal(got[: stop - start], x[start:stop])
        assert not got[stop - start:].any()
    strided = x.transpose(2, 3)
    got = runners.engine_input(strided, 0, 4, 4)
    assert got.is_contiguous() and torch.equal(got, strided[:4])


def test_run_in_chunks_pads_and_slices():
    """A row-wise function through the chunks gives the whole batch's rows, padding dropped."""
    x = torch.randn(70, 3, 2, 2, generator=torch.Generator().manual_seed(1))[1:]  # a view
    seen = []

    def run_chunk(inp):
        assert 8 <= inp.shape[0] <= 16 and inp.data_ptr() % runners.ALIGNMENT == 0
        seen.append(inp.shape[0])
        return inp.flatten(1).sum(1, keepdim=True) * 2

    out = runners.run_in_chunks(x, 8, 16, run_chunk, torch.empty(0, 1))
    assert seen == [16, 16, 16, 16, 8]  # 69 = 4 x 16 + 5, the last padded to 8
    torch.testing.assert_close(out, x.flatten(1).sum(1, keepdim=True) * 2)
    assert runners.run_in_chunks(x[:0], 8, 16, run_chunk, torch.empty(0, 1)).shape == (0, 1)


# ---------------------------------------------------------------- plan + sidecar, CLI errors
def test_engine_pair_is_written_and_checked_together(tmp_path, monkeypatch):
    plan = tmp_path / "m.plan"
    side = fp_trt.write_engine(plan, b"engine one", {"classnames": CLASSNAMES})
    meta, data = fp_trt.read_engine(plan)
    assert data == b"engine one"
    assert meta == side == json.loads(fp_trt.sidecar_path(plan).read_text())
    assert meta["format"] == fp_trt.SIDECAR_FORMAT and len(meta["plan_sha256"]) == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.plan", "m.plan.json"]  # no temp files

    # a rebuild that dies after the plan and before the sidecar: the old sidecar is refused
    def die(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fp_engine.json, "dumps", die)
    with pytest.raises(KeyboardInterrupt):
        fp_trt.write_engine(plan, b"engine two", {"classnames": CLASSNAMES})
    monkeypatch.undo()
    assert plan.read_bytes() == b"engine two"
    with pytest.raises(ExportError, match="not the engine its sidecar m.plan.json describes"):
        fp_trt.read_engine(plan)
    fp_trt.write_engine(plan, b"engine two", {})
    assert fp_trt.read_engine(plan)[1] == b"engine two"
    old = {**json.loads(fp_trt.sidecar_path(plan).read_text()), "format": "fastprompt-engine/1"}
    fp_trt.sidecar_path(plan).write_text(json.dumps(old))
    with pytest.raises(ExportError, match="fastprompt-engine/1.*rebuild"):
        fp_trt.read_engine(plan)
    fp_trt.sidecar_path(plan).unlink()
    with pytest.raises(ExportError, match="m.plan.json not found"):
        fp_trt.read_engine(plan)


@pytest.mark.parametrize("fmt, out, ok", [
    ("onnx", "m.onnx", True), ("onnx", "m.plan", False), ("onnx", "m", False),
    ("tensorrt", "m.plan", True), ("tensorrt", "m.engine", True), ("tensorrt", "m.trt", True),
    ("tensorrt", "m.onnx", False), ("tensorrt", "m.xml", False),
])
def test_out_suffix(fmt, out, ok):
    if ok:
        runners.check_out_suffix(fmt, out)
    else:
        with pytest.raises(ExportError, match="opened by its suffix"):
            runners.check_out_suffix(fmt, out)


@pytest.mark.parametrize("fmt, name", [("onnx", "m.xml"), ("tensorrt", "m.onnx")])
def test_export_cli_refuses_unopenable_out(fmt, name, tmp_path, capsys):
    rc = export_cli.main(["--run", str(tmp_path), "--format", fmt, "--out", str(tmp_path / name)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "opened by its suffix" in err, err
    assert not (tmp_path / name).exists()


def test_predict_runner_failure_is_one_line(graphs, tmp_path, capsys):
    """An ONNX file whose metadata promises 16 px images to a 32 px graph: refused on opening,
    as a bad file (exit 2; it failed inside onnxruntime, exit 1, before the graph was checked)."""
    from PIL import Image

    bad = onnx.ModelProto.FromString(graphs["maple"].SerializeToString())
    next(p for p in bad.metadata_props if p.key == "image_size").value = "16"
    onnx.save(bad, str(tmp_path / "bad.onnx"))
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "a.png")
    rc = predict_cli.main(["--model", str(tmp_path / "bad.onnx"), str(tmp_path / "a.png")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "[B, 3, 16, 16] as its metadata" in err, err
    assert "Traceback" not in err


# ------------------------------------------------------------------- engines (TensorRT + GPU)
needs_tensorrt = pytest.mark.skipif(fp_engine.tensorrt_missing() is not None,
                                    reason=f"TensorRT engine tests: {fp_engine.tensorrt_missing()}")


@pytest.fixture
def copies(monkeypatch):
    """Whether each chunk `run_in_chunks` handed the engine was a copy (True) or x itself."""
    seen, real = [], runners.engine_input

    def spy(x, start, stop, rows):
        out = real(x, start, stop, rows)
        seen.append(out.data_ptr() != x[start:stop].data_ptr())
        return out

    monkeypatch.setattr(runners, "engine_input", spy)
    return seen


@pytest.fixture(scope="module")
def maple_onnx(tmp_path_factory):
    torch.manual_seed(0)
    model = perturb(fp.create("maple", tiny_clip(), CLASSNAMES), seed=0)
    return export_onnx(model, tmp_path_factory.mktemp("gpu") / "m.onnx", log=lambda *_: None)


def _reference(res, x):
    with torch.no_grad(), fp_trt.fp32_reference():
        return copy.deepcopy(res.module).to(x.device)(x)


@pytest.mark.gpu
@needs_tensorrt
@pytest.mark.parametrize("fp16", [True, False])
def test_engine_pads_chunks_and_matches_torch(fp16, maple_onnx, tmp_path, copies):
    plan = tmp_path / "m.plan"
    meta = fp_trt.build_engine(maple_onnx.path, plan, (2, 4, 8), fp16=fp16, log=lambda *_: None)
    assert meta["precision"] == ("fp16" if fp16 else "fp32") and meta["tf32"] is False
    runner = runners.open_runner(plan)
    # 9 images from a view 4 bytes into its storage: not 256-byte aligned, so each chunk is copied;
    # 8 + 1 -> the last chunk padded to 2
    x = torch.randn(9 * 3 * 32 * 32 + 1, device="cuda")[1:].view(9, 3, 32, 32)
    assert x.data_ptr() % runners.ALIGNMENT != 0
    ref, got = _reference(maple_onnx, x), runner.run(x)
    assert copies == [True, True]  # the misaligned path was taken (and the padded one)
    tol = fp_trt.FP16_MAX_REL_ERR if fp16 else fp_trt.FP32_MAX_REL_ERR
    assert got.shape == ref.shape and ((got - ref).abs().max() / ref.abs().max()).item() < tol
    copies.clear()
    aligned = runners.aligned_empty((8, 3, 32, 32), torch.float32, "cuda").copy_(x[:8])
    runner.run(aligned)
    assert copies == [False]  # an aligned full chunk goes to the engine as is
    plan.write_bytes(plan.read_bytes() + b"\0")
    with pytest.raises(ExportError, match="not the engine its sidecar"):
        runners.open_runner(plan)


@pytest.mark.gpu
@needs_tensorrt
def test_engine_follows_a_non_default_caller_stream(maple_onnx, tmp_path):
    """Images written on the caller's own stream after a delay: the engine must wait for them,
    and the caller's next work on that stream must see the engine's output."""
    plan = tmp_path / "m.plan"
    fp_trt.build_engine(maple_onnx.path, plan, (1, 4, 8), fp16=False, log=lambda *_: None)
    runner = runners.open_runner(plan)
    images = torch.randn(6, 3, 32, 32, device="cuda")
    ref = _reference(maple_onnx, images)
    x = torch.zeros_like(images)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(100_000_000)  # ~50 ms of GPU time queued before the images exist
        x.copy_(images)
        out = runner.run(x) * 1.0       # queued on the caller's stream after the engine
    stream.synchronize()
    assert ((out - ref).abs().max() / ref.abs().max()).item() < fp_trt.FP32_MAX_REL_ERR


@pytest.mark.gpu
@needs_tensorrt
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_runner_runs_on_its_own_device(maple_onnx, tmp_path):
    plan = tmp_path / "m.plan"
    with torch.cuda.device(1):
        fp_trt.build_engine(maple_onnx.path, plan, (1, 4, 8), fp16=False, log=lambda *_: None)
    with torch.cuda.device(0):
        runner = runners.TensorRTRunner(plan, "cuda:1")
        x = torch.randn(3, 3, 32, 32, device="cuda:0")
        got = runner.run(x)  # device 0 current, images on device 0: the engine runs on device 1
    assert runner.device_index == 1 and got.device == x.device
    ref = _reference(maple_onnx, x)
    assert ((got - ref).abs().max() / ref.abs().max()).item() < fp_trt.FP32_MAX_REL_ERR


@pytest.mark.gpu
@needs_tensorrt
def test_fp32_check_passes_with_the_callers_tf32_on(maple_onnx, tmp_path):
    """The caller allows TF32: the engine (TF32 off) is still compared with an fp32 reference,
    and the caller's settings are as they were after the check."""
    plan = tmp_path / "m.plan"
    fp_trt.build_engine(maple_onnx.path, plan, (2, 4, 8), fp16=False, log=lambda *_: None)
    saved = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "tf32"
    try:
        _, rel, _ = fp_trt.check_engine(plan, maple_onnx.module, 32, (2, 4, 8), fp16=False,
                                        log=lambda *_: None)
        assert (torch.backends.cuda.matmul.fp32_precision,
                torch.backends.cudnn.conv.fp32_precision) == ("tf32", "tf32")
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved
    assert rel <= fp_trt.FP32_MAX_REL_ERR
    assert next(maple_onnx.module.parameters()).device.type == "cpu"  # not moved in place
