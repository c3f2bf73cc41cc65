"""ONNX export, runners, `python -m fastprompt.export` and `python -m fastprompt.predict`.

Runs with perturbed parameters (so baked-in prompts/adapters are not their init) on the tiny
backbone, CPU only. TensorRT tests skip with the reason where TensorRT or CUDA is missing.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import fastprompt as fp  # noqa: E402
from common import CLASSNAMES, perturb, tiny_clip  # noqa: E402
from fastprompt import predict as predict_cli  # noqa: E402
from fastprompt.export import (ExportError, OnnxRunner, TorchRunner, export_onnx,  # noqa: E402
                               open_runner, run_fingerprint)
from fastprompt.export import __main__ as export_cli  # noqa: E402
from fastprompt.export import engine as fp_engine  # noqa: E402
from fastprompt.export import onnx as fp_onnx  # noqa: E402
from fastprompt.export import tensorrt as fp_trt  # noqa: E402

EXPORTED = ["maple", "mma", "coop"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    out = {}
    for i, method in enumerate(EXPORTED + ["cocoop"]):
        torch.manual_seed(i)
        model = perturb(fp.create(method, tiny_clip(), CLASSNAMES), seed=i)
        out[method] = fp.save(model, base / method)
    return out


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    base = tmp_path_factory.mktemp("onnx")
    return {m: export_onnx(runs[m], base / f"{m}.onnx", log=lambda *_: None) for m in EXPORTED}


@pytest.fixture(scope="module")
def features_onnx(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("features") / "feat.onnx"
    return export_onnx(runs["maple"], out, features=True, log=lambda *_: None)


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    (root / "sub").mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "sub/b.jpg", "sub/c.png"):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(root / name)
    (root / "sub" / "broken.png").write_bytes(b"\x89PNG not really")
    return root


def exit_code(main, argv) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse errors
        return exc.code


def one_line(text: str) -> bool:
    return len(text.strip().splitlines()) == 1 and "Traceback" not in text


# ------------------------------------------------------------------------------------ ONNX graph
@pytest.mark.parametrize("method", EXPORTED)
def test_onnx_matches_torch(method, runs, exported):
    res = exported[method]
    proto = onnx.load(str(res.path))
    assert [i.name for i in proto.graph.input] == ["images"]
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # dynamic batch axis
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert "LayerNormalization" in {n.op_type for n in proto.graph.node}
    assert res.check.ok and res.check.max_rel < 1e-3
    clf = fp.load(runs[method], clip=tiny_clip()).classifier()  # the ordinary classifier, not the export's copy
    sess = ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"])
    for b in (1, 3):
        x = torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(b))
        with torch.no_grad():
            ref = clf(x).numpy()
        got = sess.run(None, {"images": x.numpy()})[0]
        assert got.shape == (b, len(CLASSNAMES))
        assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-3
        assert (got.argmax(1) == ref.argmax(1)).all()


def test_metadata(runs, exported):
    props = {p.key: p.value for p in onnx.load(str(exported["maple"].path)).metadata_props}
    assert json.loads(props["classnames"]) == CLASSNAMES
    assert props["image_size"] == "32" and props["method"] == "maple"
    assert json.loads(props["mean"]) == pytest.approx(list(tiny_clip().mean))
    assert json.loads(props["std"]) == pytest.approx(list(tiny_clip().std))
    assert props["fastprompt_version"] == fp.__version__ and props["output"] == "logits"
    assert props["run_fingerprint"] == run_fingerprint(runs["maple"])


@pytest.mark.parametrize("method", ["maple", "mma"])
def test_no_text_tower_in_file(method, runs, exported):
    """Initializers = image tower + [C, E] text matrix (+ prompts/adapters), nothing of the text
    tower (its token embedding alone is 49408 x 32 floats, 4x the tiny image tower)."""
    proto = onnx.load(str(exported[method].path))
    model = fp.load(runs[method], clip=tiny_clip())
    clf = model.classifier()
    text = clf.text_features.numpy()
    image_tower = sum(p.numel() for p in model.backbone.visual.parameters()) * 4
    learned = sum(p.numel() for p in model.trainable_state().values()) * 4
    total = fp_onnx.initializer_bytes(proto)
    assert total <= 1.1 * (image_tower + text.nbytes + learned) + 65536
    assert total >= 0.9 * image_tower
    vocab = model.backbone.text["token_embedding"].num_embeddings
    assert not any(vocab in t.dims for t in proto.graph.initializer)
    mats = [onnx.numpy_helper.to_array(t) for t in proto.graph.initializer if len(t.dims) == 2]
    assert any(np.allclose(m, t) for m in mats for t in (text, text.T) if m.shape == t.shape)


def test_features_output_is_normalised(runs, features_onnx):
    runner = OnnxRunner(features_onnx.path)
    assert runner.output == "features"
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    feats = runner.run(x)
    assert feats.shape == (3, tiny_clip().model.visual.output_dim)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    clf = fp.load(runs["maple"], clip=tiny_clip()).classifier()
    ref = clf.features(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(feats, ref, atol=1e-5)


@pytest.mark.slow
def test_dynamo_exporter(runs, tmp_path):
    res = export_onnx(runs["mma"], tmp_path / "d.onnx", exporter="dynamo", log=lambda *_: None)
    proto = onnx.load(str(res.path))
    assert [i.name for i in proto.graph.input] == ["images"] and res.check.ok
    assert {p.key: p.value for p in proto.metadata_props}["method"] == "mma"


def test_cocoop_is_refused(runs, tmp_path):
    with pytest.raises(ExportError, match="cocoop.*text features depend on each image"):
        export_onnx(runs["cocoop"], tmp_path / "c.onnx")
    assert not (tmp_path / "c.onnx").exists()


def test_check_failure_is_an_error(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fp_onnx, "MAX_REL_ERR", -1.0)  # any error now fails the check
    rc = export_cli.main(["--run", str(runs["coop"]), "--format", "onnx", "--out", str(tmp_path / "x.onnx")])
    err = capsys.readouterr().err
    assert rc == 1 and "check failed" in err and one_line(err)
    assert not fp_onnx.CheckResult(max_rel=5e-4, top1_same=False).ok


# ------------------------------------------------------------------------------------- runners
def test_runners_share_one_interface(runs, exported):
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    onnx_runner, torch_runner = open_runner(exported["mma"].path), open_runner(runs["mma"])
    assert isinstance(onnx_runner, OnnxRunner) and isinstance(torch_runner, TorchRunner)
    for r in (onnx_runner, torch_runner):
        assert r.classnames == CLASSNAMES and r.image_size == 32 and r.output == "logits"
    a, b = onnx_runner.run(x), torch_runner.run(torch.from_numpy(x))
    assert isinstance(a, np.ndarray) and isinstance(b, torch.Tensor)
    np.testing.assert_allclose(a, b.numpy(), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------- CLIs
def test_export_cli(runs, tmp_path, capsys):
    out = tmp_path / "cli.onnx"
    assert export_cli.main(["--run", str(runs["coop"]), "--format", "onnx", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and "max abs err" in printed and "max rel err" in printed


def test_export_module_entry_point(tmp_path):
    """`python -m fastprompt.export` runs (bad input: exit 2, one line, no traceback)."""
    proc = subprocess.run([sys.executable, "-m", "fastprompt.export", "--run", str(tmp_path / "no"),
                           "--format", "onnx", "--out", str(tmp_path / "m.onnx")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and one_line(proc.stderr) and "run directory not found" in proc.stderr


def test_predict_onnx_subprocess(exported, images_dir):
    proc = subprocess.run([sys.executable, "-m", "fastprompt.predict", "--model",
                           str(exported["maple"].path), str(images_dir / "a.png"), "--topk", "2"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert line.startswith(str(images_dir / "a.png")) and any(c in line for c in CLASSNAMES)


def test_predict_run_dir_skips_unreadable(runs, images_dir, capsys):
    rc = predict_cli.main(["--model", str(runs["mma"]), str(images_dir), "--json", "--topk", "3",
                           "--batch-size", "2"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert "broken.png" in err and one_line(err)
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert sorted(os.path.basename(r["image"]) for r in rows) == ["a.png", "b.jpg", "c.png"]
    for r in rows:
        assert len(r["top"]) == 3 and all(t["class"] in CLASSNAMES for t in r["top"])
        probs = [t["prob"] for t in r["top"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6


def test_predict_same_answer_from_run_and_onnx(runs, exported, images_dir, capsys):
    outs = []
    for model in (runs["maple"], exported["maple"].path):
        assert predict_cli.main(["--model", str(model), str(images_dir / "sub"), "--json"]) == 0
        outs.append([json.loads(line) for line in capsys.readouterr().out.strip().splitlines()])
    for a, b in zip(*outs):
        assert [t["class"] for t in a["top"]][:1] == [t["class"] for t in b["top"]][:1]
        assert a["top"][0]["prob"] == pytest.approx(b["top"][0]["prob"], abs=1e-4)


def test_predict_nothing_readable_exits_1(exported, images_dir, capsys):
    rc = predict_cli.main(["--model", str(exported["coop"].path), str(images_dir / "sub" / "broken.png")])
    assert rc == 1 and "broken.png" in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["--run", "{missing}", "--format", "onnx", "--out", "{tmp}/m.onnx"], "run directory not found"),
    (["--run", "{maple}", "--format", "openvino", "--out", "{tmp}/m.xml"], "invalid choice"),
    (["--run", "{cocoop}", "--format", "onnx", "--out", "{tmp}/m.onnx"], "cannot be exported"),
    (["--run", "{maple}", "--format", "onnx", "--out", "{tmp}/m.onnx", "--opset", "16"], "opset"),
    (["--run", "{maple}", "--format", "tensorrt", "--out", "{tmp}/m.plan", "--batch", "8,4,16"],
     "MIN,OPT,MAX"),
])
def test_export_cli_bad_input(argv, needle, runs, tmp_path, capsys):
    subs = {"missing": str(tmp_path / "nope"), "tmp": str(tmp_path), **{k: str(v) for k, v in runs.items()}}
    argv = [a.format(**subs) for a in argv]
    rc = exit_code(export_cli.main, argv)
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and one_line(err), err  # --batch is read before TensorRT


@pytest.mark.parametrize("case", ["missing-model", "unknown-format", "missing-image", "features"])
def test_predict_cli_bad_input(case, exported, features_onnx, images_dir, tmp_path, capsys):
    img = str(images_dir / "a.png")
    if case == "missing-model":
        argv, needle = ["--model", str(tmp_path / "none.onnx"), img], "model not found"
    elif case == "unknown-format":
        (tmp_path / "m.pt").write_bytes(b"x")
        argv, needle = ["--model", str(tmp_path / "m.pt"), img], "unknown model format"
    elif case == "missing-image":
        argv, needle = ["--model", str(exported["coop"].path), str(tmp_path / "x.png")], "no such file"
    else:
        argv, needle = ["--model", str(features_onnx.path), img], "features"
    rc = exit_code(predict_cli.main, argv)
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and one_line(err), err


# ------------------------------------------------------------------------------------- TensorRT
def test_parse_batch():
    assert fp_trt.parse_batch("1,32,128") == (1, 32, 128)
    for bad in ("1,2", "0,1,2", "4,2,8", "a,b,c"):
        with pytest.raises(ExportError, match="MIN,OPT,MAX"):
            fp_trt.parse_batch(bad)


def test_engine_from_another_gpu_is_refused(monkeypatch, tmp_path):
    here = {"gpu": "NVIDIA H100 80GB HBM3", "tensorrt_version": "10.16.1.11",
            "compute_capability": "9.0"}
    monkeypatch.setattr(fp_engine, "device_info", lambda index=None: dict(here))
    fp_trt.check_compatible(dict(here), "m.plan")
    for key, value, needle in (("gpu", "NVIDIA A100-SXM4-40GB", "built for GPU 'NVIDIA A100.*rebuild"),
                               ("tensorrt_version", "10.13.0.35", "TensorRT version '10.13.0.35'"),
                               ("compute_capability", "8.0", "compute capability '8.0'"),
                               ("compute_capability", None, "compute capability None")):
        with pytest.raises(ExportError, match=needle):
            fp_trt.check_compatible({**here, key: value}, "m.plan")


needs_tensorrt = pytest.mark.skipif(fp_engine.tensorrt_missing() is not None,
                                    reason=f"TensorRT engine tests: {fp_engine.tensorrt_missing()}")


@pytest.mark.gpu
@needs_tensorrt
def test_tensorrt_engine(runs, exported, tmp_path):
    plan = tmp_path / "maple.plan"
    sidecar = fp_trt.build_engine(exported["maple"].path, plan, (1, 4, 8), log=lambda *_: None)
    assert plan.is_file() and fp_trt.timing_cache_path(plan).is_file()
    meta = json.loads(fp_trt.sidecar_path(plan).read_text())
    assert meta == sidecar and meta["classnames"] == CLASSNAMES and meta["precision"] == "fp16"
    assert meta["run_fingerprint"] == run_fingerprint(runs["maple"]) and meta["gpu"]
    runner = open_runner(plan)
    clf = fp.load(runs["maple"]).classifier().use_reference_kernels().cuda()  # own backbone copy
    x = torch.randn(11, 3, 32, 32, device="cuda")  # over max batch 8: runs in two chunks
    with torch.no_grad():
        ref = clf(x)
    got = runner.run(x)
    assert got.is_cuda and got.shape == ref.shape
    assert ((got - ref).abs().max() / ref.abs().max()).item() < fp_trt.FP16_MAX_REL_ERR
    meta["gpu"] = "some other GPU"
    fp_trt.sidecar_path(plan).write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="some other GPU"):
        open_runner(plan)


@pytest.mark.gpu
@needs_tensorrt
def test_tensorrt_cli(runs, tmp_path):
    rc = export_cli.main(["--run", str(runs["mma"]), "--format", "tensorrt", "--out",
                          str(tmp_path / "mma.plan"), "--batch", "1,2,4", "--fp32"])
    assert rc == 0 and sorted(p.name for p in tmp_path.iterdir()) == [
        "mma.onnx", "mma.plan", "mma.plan.json", "mma.timing.cache"]  # no temporary or rejected file
    assert open_runner(tmp_path / "mma.plan").max_batch == 4


@pytest.mark.skipif(fp_engine.tensorrt_missing() is None, reason="TensorRT and CUDA are present")
def test_tensorrt_missing_is_a_clear_error(runs, tmp_path, capsys):
    rc = export_cli.main(["--run", str(runs["maple"]), "--format", "tensorrt", "--out", str(tmp_path / "m.plan")])
    err = capsys.readouterr().err
    assert rc == 2 and one_line(err) and ("TensorRT" in err or "CUDA" in err)
