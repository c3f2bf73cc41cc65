"""What fastprompt does around TensorRT, on the CPU, with the fake `tensorrt` module and CUDA
devices of tests/fake_tensorrt.py (issue #26): a rejected engine never deployed; construction
failures and broken installs as one line naming the TensorRT build, torch's CUDA and the fix; the
fp32 check's reference without TF32, on a copy, over the padded and chunked batches; the runner
bound to its device index; compute capability, image size and dtypes checked on load; a timing
cache from another GPU replaced without TensorRT's error message.

`check_engine` gets its runner from `fastprompt.export.tensorrt.TensorRTRunner`; the export tests
put `CpuEngine` there: it stands for the engine by running the ONNX file the plan was built from
with onnxruntime (times `1 + CpuEngine.error`), so that the real build, check and file handling
run end to end. What only a GPU with TensorRT can confirm is in tests/test_tensorrt.py (`gpu`).
"""
from __future__ import annotations

import json
import sys

import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import fake_tensorrt  # noqa: E402
import fastprompt as fp  # noqa: E402
from common import CLASSNAMES, perturb, tiny_clip  # noqa: E402
from fake_tensorrt import Severity, State  # noqa: E402
from fastprompt.errors import ExportError  # noqa: E402
from fastprompt.export import __main__ as export_cli  # noqa: E402
from fastprompt.export import engine as fp_engine  # noqa: E402
from fastprompt.export import export_onnx, runners  # noqa: E402
from fastprompt.export import tensorrt as fp_trt  # noqa: E402
from fastprompt.export.runners import RunnerError  # noqa: E402


@pytest.fixture
def trt(monkeypatch):
    mod = fake_tensorrt.install(monkeypatch)
    yield mod
    fp_engine.trt_logger.cache_clear()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    torch.manual_seed(0)
    return fp.save(perturb(fp.create("coop", tiny_clip(), CLASSNAMES), seed=0),
                   tmp_path_factory.mktemp("runs") / "coop")


@pytest.fixture(scope="module")
def coop_onnx(run_dir, tmp_path_factory):
    """The run exported once, for the tests that build engines with build_engine directly."""
    out = tmp_path_factory.mktemp("onnx") / "coop.onnx"
    return export_onnx(run_dir, out, log=lambda *_: None).path


def build(onnx_path, plan, log=lambda *_: None):
    return fp_trt.build_engine(onnx_path, plan, (2, 3, 4), fp16=False, log=log)


class CpuEngine:
    """In place of TensorRTRunner inside check_engine: the plan's ONNX file under onnxruntime."""

    error = 0.0
    fail = None        # an exception to raise while running
    seen: list = []    # (plan, batch size) of every run

    def __init__(self, plan, device="cuda"):
        meta, _ = fp_engine.read_engine(plan)  # the pair is complete where check_engine looks
        self.plan, self.torch_device = plan, torch.device("cpu")
        self.sess = ort.InferenceSession(str(plan.parent / meta["onnx"]),
                                         providers=["CPUExecutionProvider"])

    def run(self, x):
        CpuEngine.seen.append((self.plan, x.shape[0]))
        if CpuEngine.fail is not None:
            raise CpuEngine.fail
        out = self.sess.run(None, {"images": x.numpy()})[0]
        return torch.from_numpy(out) * (1 + CpuEngine.error)


@pytest.fixture
def cpu_engine(monkeypatch, trt):
    CpuEngine.error, CpuEngine.fail, CpuEngine.seen = 0.0, None, []
    monkeypatch.setattr(fp_trt, "TensorRTRunner", CpuEngine)
    return CpuEngine


def export(run_dir, out, **kw):
    return fp_trt.export_tensorrt(run_dir, out, batch=(2, 3, 4), fp16=False, log=lambda *_: None,
                                  **kw)


def files(folder):
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------- 1. a rejected engine never deployed
def test_checked_engine_is_moved_into_place_after_its_check(run_dir, tmp_path, cpu_engine):
    out = tmp_path / "m.plan"
    sidecar = export(run_dir, out)
    checked = {plan for plan, _ in CpuEngine.seen}
    assert len(checked) == 1 and out not in checked  # checked under its temporary name
    assert files(tmp_path) == ["m.onnx", "m.plan", "m.plan.json", "m.timing.cache"]
    meta, data = fp_engine.read_engine(out)
    assert meta == sidecar and json.loads(data[len(b"FAKEPLAN"):])["build"] == 1
    assert meta["precision"] == "fp32" and meta["batch"] == {"min": 2, "opt": 3, "max": 4}


@pytest.mark.parametrize("failure", ["check", "runner"])
def test_rejected_engine_leaves_the_deployed_one(failure, run_dir, coop_onnx, tmp_path, cpu_engine,
                                                 capsys):
    out = tmp_path / "m.plan"
    build(coop_onnx, out)  # the engine deployed before
    before = out.read_bytes(), (tmp_path / "m.plan.json").read_bytes()
    if failure == "check":
        CpuEngine.error = 0.5
    else:
        CpuEngine.fail = RunnerError("TensorRT execution failed (see the TensorRT messages above)")
    rc = export_cli.main(["--run", str(run_dir), "--format", "tensorrt", "--out", str(out),
                          "--batch", "2,3,4", "--fp32"])
    err = capsys.readouterr().err
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "left as it was" in err, err
    assert (out.read_bytes(), (tmp_path / "m.plan.json").read_bytes()) == before
    assert fp_engine.read_engine(out)[1] == before[0]  # still a valid pair, the old one
    rejected = tmp_path / "m.rejected.plan"
    assert str(rejected) in err
    assert files(tmp_path) == ["m.onnx", "m.plan", "m.plan.json", "m.rejected.plan",
                               "m.rejected.plan.json", "m.timing.cache"]
    assert json.loads(rejected.read_bytes()[len(b"FAKEPLAN"):])["build"] == 2  # the new build
    with pytest.raises(ExportError, match="failed the export's check"):
        runners.open_runner(rejected)  # what predict opens: refused


def test_interrupted_export_leaves_no_files(run_dir, coop_onnx, tmp_path, cpu_engine):
    out = tmp_path / "m.plan"
    build(coop_onnx, out)  # the engine deployed before
    before = out.read_bytes()
    CpuEngine.fail = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        export(run_dir, out)
    assert out.read_bytes() == before and fp_engine.read_engine(out)
    assert files(tmp_path) == ["m.onnx", "m.plan", "m.plan.json", "m.timing.cache"]


# -------------------------------------------------------- 2. construction failures, broken installs
@pytest.mark.parametrize("builds, cuda, needles", [
    ([13], "12.8", ["is the CUDA 13 build but torch uses CUDA 12.8",
                    "pip uninstall -y tensorrt tensorrt-cu13 tensorrt-cu13-bindings",
                    "pip install 'fastprompt[tensorrt-cu12]'"]),
    ([13], "13.0", ["CUDA 13 build, as torch (CUDA 13.0)", "driver supports CUDA 13 (nvidia-smi)"]),
    ([12, 13], "12.6", ["wheels for CUDA 12 and 13 are all installed",
                        "uninstall -y tensorrt tensorrt-cu13 ", "fastprompt[tensorrt-cu12]"]),
    ([], "12.8", ["not installed from NVIDIA's pip wheels", "fastprompt[tensorrt-cu12]"]),
])
@pytest.mark.parametrize("what", ["Builder", "OnnxParser", "Runtime"])
def test_factory_returning_nullptr_is_one_line(what, builds, cuda, needles, trt, monkeypatch):
    monkeypatch.setattr(fp_engine, "tensorrt_cuda_builds", lambda: builds)
    monkeypatch.setattr(torch.version, "cuda", cuda)
    State.fail = what
    with pytest.raises(TypeError, match="returned nullptr"):  # what the bindings raise
        getattr(trt, what)(trt.Logger())
    with pytest.raises(fp_engine.TensorRTUnavailable) as info:
        fp_engine.construct(trt, what, trt.Logger())
    msg = str(info.value)
    assert "\n" not in msg and f"could not create its {what}" in msg and "11.4.0.106" in msg
    for needle in needles:
        assert needle in msg, msg
    monkeypatch.setattr(trt, what, lambda *a: None)  # a binding that returns None instead
    with pytest.raises(fp_engine.TensorRTUnavailable, match=f"create its {what}"):
        fp_engine.construct(trt, what, trt.Logger())

    def bad_call(*args):
        raise TypeError("incompatible function arguments")

    monkeypatch.setattr(trt, what, bad_call)
    with pytest.raises(TypeError, match="incompatible"):  # any other TypeError is a bug of ours
        fp_engine.construct(trt, what)


def test_build_and_load_report_nullptr_in_one_line(run_dir, tmp_path, trt, cpu_engine, capsys):
    State.fail = "Builder"
    rc = export_cli.main(["--run", str(run_dir), "--format", "tensorrt", "--out",
                          str(tmp_path / "m.plan"), "--batch", "2,3,4"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "create its Builder" in err, err
    assert not (tmp_path / "m.plan").exists() and not (tmp_path / "m.plan.json").exists()
    State.fail = None
    build(tmp_path / "m.onnx", tmp_path / "m.plan")
    State.fail = "Runtime"
    with pytest.raises(fp_engine.TensorRTUnavailable, match="create its Runtime"):
        runners.TensorRTRunner(tmp_path / "m.plan")


def test_cuda_builds_from_wheel_names():
    names = ["numpy", "tensorrt", "tensorrt_cu13", "tensorrt_cu13_bindings", "tensorrt-cu13-libs",
             "tensorrt_lean_cu12", "tensorrt-llm", "nvidia-cuda-runtime-cu12"]
    assert fp_engine.tensorrt_cuda_builds(names) == [13]
    assert fp_engine.tensorrt_cuda_builds(["tensorrt-cu12", "tensorrt_cu13_bindings"]) == [12, 13]
    assert fp_engine.tensorrt_cuda_builds(["tensorrt"]) == []  # a tar / deb install


@pytest.mark.parametrize("cuda, hint", [("12.8", "fastprompt[tensorrt-cu12]"),
                                        ("13.0", "fastprompt[tensorrt-cu13]"),
                                        ("11.8", "fastprompt[tensorrt-cu11]"),
                                        ("10.2", "no wheels"), ("", "CUDA build of torch")])
def test_install_hint_names_an_extra_that_exists(cuda, hint):
    import tomllib
    from pathlib import Path

    text = fp_engine.install_hint(cuda)
    assert hint in text
    toml = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    extras = tomllib.loads(toml)["project"]["optional-dependencies"]
    for name in (w.split("[")[1].split("]")[0] for w in text.split() if "fastprompt[" in w):
        assert name in extras or name == "tensorrt-cuNN", name


@pytest.mark.parametrize("body, needle", [
    ("raise OSError('libnvinfer.so.10: cannot open shared object file')", "libnvinfer.so.10"),
    ("import tensorrt_bindings_not_there", "tensorrt_bindings_not_there"),
])
def test_broken_tensorrt_install_is_one_line(body, needle, tmp_path, monkeypatch):
    (tmp_path / "tensorrt.py").write_text(body + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    monkeypatch.setattr(fp_engine, "tensorrt_cuda_builds", lambda: [13])
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    msg = fp_engine.tensorrt_missing()
    assert msg and "\n" not in msg and "installed but does not load" in msg and needle in msg, msg
    assert "fastprompt[tensorrt-cu12]" in msg


def test_missing_tensorrt_names_the_extra_for_torchs_cuda(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert "not installed: pip install 'fastprompt[tensorrt-cu12]'" in fp_engine.tensorrt_missing()


# ------------------------------------------------------ 3. the fp32 check: reference without TF32
def tf32_settings() -> dict:
    """Every TF32 setting a caller can read ("ERR": torch refuses the read, legacy and new settings
    disagree)."""
    b = torch.backends
    reads = {"matmul": lambda: b.cuda.matmul.fp32_precision,
             "conv": lambda: b.cudnn.conv.fp32_precision,
             "rnn": lambda: b.cudnn.rnn.fp32_precision,
             "mkldnn": lambda: b.mkldnn.matmul.fp32_precision,
             "matmul.allow_tf32": lambda: b.cuda.matmul.allow_tf32,
             "cudnn.allow_tf32": lambda: b.cudnn.allow_tf32,
             "matmul_precision": torch.get_float32_matmul_precision}
    out = {}
    for key, read in reads.items():
        try:
            out[key] = read()
        except RuntimeError:
            out[key] = "ERR"
    return out


class Probe(torch.nn.Module):
    """A classifier that records where it runs: the TF32 settings seen by each forward and every
    instance moved (`_apply`: .to / .cuda / .float)."""

    seen: list = []
    moved: list = []

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 5, 8, stride=8)

    def _apply(self, fn, *args, **kwargs):
        Probe.moved.append(id(self))
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x):
        Probe.seen.append(tf32_settings())
        return self.conv(x).flatten(1)


def _set_tf32(caller: str):
    if caller == "new API":
        torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "tf32"
    elif caller == "matmul precision high":
        torch.set_float32_matmul_precision("high")
    elif caller == "legacy flags":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


@pytest.mark.parametrize("caller", ["torch's defaults", "new API", "matmul precision high",
                                    "legacy flags"])
def test_check_reference_is_fp32_on_a_copy_over_padded_and_chunked_batches(caller, tmp_path,
                                                                           monkeypatch, trt):
    probe = Probe().eval()
    ref = probe.conv.weight.detach().clone()

    class Engine:
        def __init__(self, plan, device="cuda"):
            self.torch_device = torch.device("cpu")

        def run(self, x):
            Engine.batches.append(x.shape[0])
            return torch.nn.functional.conv2d(x, ref, probe.conv.bias, stride=8).flatten(1)

    Engine.batches, Probe.seen, Probe.moved = [], [], []
    monkeypatch.setattr(fp_trt, "TensorRTRunner", Engine)
    default = tf32_settings()
    torch.set_float32_matmul_precision(default["matmul_precision"])
    try:
        _set_tf32(caller)
        before = tf32_settings()
        _, rel, agree = fp_trt.check_engine(tmp_path / "m.plan", probe, 32, (2, 4, 8), fp16=False,
                                            log=lambda *_: None)
        after = tf32_settings()
    finally:  # torch's defaults back for the other tests
        torch.set_float32_matmul_precision(default["matmul_precision"])
        torch.backends.cudnn.allow_tf32 = default["cudnn.allow_tf32"]
        for key in ("matmul", "conv", "rnn", "mkldnn"):
            setting = {"matmul": torch.backends.cuda.matmul, "conv": torch.backends.cudnn.conv,
                       "rnn": torch.backends.cudnn.rnn, "mkldnn": torch.backends.mkldnn.matmul}[key]
            setting.fp32_precision = default[key]
    assert tf32_settings() == default
    assert rel < 1e-6 and agree == 1.0
    inside = {(s["matmul"], s["conv"], s["matmul.allow_tf32"], s["matmul_precision"])
              for s in Probe.seen}
    assert inside == {("ieee", "ieee", False, "highest")}  # TF32 off, legacy reads agree
    assert after == before  # every setting of the caller's restored
    assert id(probe) not in Probe.moved  # the caller's module stayed where it was
    assert Engine.batches == [4, 9] == fp_trt.check_batches(2, 4, 8)
    # 9 images through a 2..8 profile: one full chunk and a last one of 1 padded to 2
    assert runners.chunks(9, 2, 8) == [(0, 8, 8), (8, 9, 2)]
    assert len(Probe.seen) == 1 + 3  # the reference at most opt (4) images per pass


@pytest.mark.parametrize("profile", [(1, 32, 128), (2, 4, 8), (8, 8, 8), (1, 1, 1)])
def test_check_batches_take_the_padded_and_chunked_paths(profile):
    mn, opt, mx = profile
    got = fp_trt.check_batches(mn, opt, mx)
    assert opt in got
    plans = [runners.chunks(n, mn, mx) for n in got]
    assert any(len(p) > 1 for p in plans)  # chunked
    if mn > 1:
        assert any(rows > stop - start for p in plans for start, stop, rows in p)  # padded


def test_fp32_reference_restores_the_legacy_flags(monkeypatch):
    """torch before 2.9 has only the allow_tf32 flags: the context sets and restores those."""
    class Legacy:
        allow_tf32 = True

    matmul, cudnn = Legacy(), type("Cudnn", (), {"allow_tf32": True})()
    monkeypatch.setattr(torch.backends.cuda, "matmul", matmul)
    monkeypatch.setattr(torch.backends, "cudnn", cudnn)
    with fp_trt.fp32_reference():
        assert matmul.allow_tf32 is False and cudnn.allow_tf32 is False
    assert matmul.allow_tf32 is True and cudnn.allow_tf32 is True


# ----------------------------------------------------------- 4. the runner keeps its device index
def test_runner_is_bound_to_its_device_index(coop_onnx, tmp_path, trt):
    out = tmp_path / "m.plan"
    build(coop_onnx, out)
    meta = json.loads((tmp_path / "m.plan.json").read_text())
    meta["gpu"] = State.devices[1]  # built on device 1 (both fake devices share the capability)
    (tmp_path / "m.plan.json").write_text(json.dumps(meta))
    State.deserialized_on, State.entered = [], []
    runner = runners.TensorRTRunner(out, "cuda:1")  # while device 0 is current
    assert runner.device_index == 1 and runner.torch_device == torch.device("cuda", 1)
    assert State.deserialized_on == [1] and runner.stream.device == torch.device("cuda", 1)
    assert State.current == 0  # the caller's current device is left as it was
    with pytest.raises(ExportError, match="built for GPU 'NVIDIA Fake B'"):
        runners.TensorRTRunner(out)  # "cuda": the current device, 0, another GPU
    State.current = 1
    assert runners.TensorRTRunner(out).device_index == 1
    for bad, needle in (("cuda:5", "torch sees 2 CUDA"), ("cpu", "CUDA only")):
        with pytest.raises(ExportError, match=needle):
            runners.TensorRTRunner(out, bad)


# ------------------------------------------------------------------- 5. the small ones
def _engine_with(tmp_path, trt, **changes):
    """A plan + sidecar written as a build writes them, then changed: sidecar keys, or the plan's
    `input_dtype` (the sidecar's sha256 follows the plan)."""
    State.input_dtype = changes.pop("input_dtype", "FLOAT")
    shapes = [(1, 3, 32, 32), (2, 3, 32, 32), (4, 3, 32, 32)]
    data = b"FAKEPLAN" + json.dumps({"shapes": shapes, "classes": 5, "build": 1, "output_dtype":
                                     "FLOAT", "input_dtype": State.input_dtype}).encode()
    meta = {"classnames": CLASSNAMES, "image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3,
            "output": "logits", **fp_engine.device_info(), **changes}
    fp_engine.write_engine(tmp_path / "m.plan", data, meta)
    return tmp_path / "m.plan"


def test_engine_checks_on_load(tmp_path, trt):
    assert runners.TensorRTRunner(_engine_with(tmp_path, trt)).max_batch == 4
    with pytest.raises(ExportError, match="compute capability '8.0' but this machine has '9.0'"):
        runners.TensorRTRunner(_engine_with(tmp_path, trt, compute_capability="8.0"))
    with pytest.raises(ExportError, match=r"takes images \[-1, 3, 32, 32\] but its sidecar says "
                                          r"image_size 16"):
        runners.TensorRTRunner(_engine_with(tmp_path, trt, image_size=16))
    with pytest.raises(ExportError, match="input 'images' is DataType.BF16.*float32 or float16"):
        runners.TensorRTRunner(_engine_with(tmp_path, trt, input_dtype="BF16"))
    meta = json.loads((tmp_path / "m.plan.json").read_text())
    fp_engine.write_engine(tmp_path / "m.plan", b"not a plan", meta)
    with pytest.raises(ExportError, match="could not load"):
        runners.TensorRTRunner(tmp_path / "m.plan")


def test_timing_cache_from_another_gpu_is_replaced_quietly(coop_onnx, tmp_path, trt):
    out, cache = tmp_path / "m.plan", tmp_path / "m.timing.cache"
    lines = []
    build(coop_onnx, out, log=lines.append)
    mine = cache.read_bytes()
    assert mine == b"timings:" + State.device_key()
    assert not any("written on another GPU" in ln for ln in lines)  # there was none
    for blob in (b"timings:NVIDIA Other GPU/(8, 0)", b"damaged file"):
        cache.write_bytes(blob)
        lines.clear()
        fake_tensorrt.Logger.printed = []
        build(coop_onnx, out, log=lines.append)
        assert [m for s, m in fake_tensorrt.Logger.printed if s <= Severity.ERROR] == []
        assert any("written on another GPU or TensorRT version" in ln for ln in lines), lines
        assert cache.read_bytes() == mine  # this GPU's timings now
    fake_tensorrt.Logger.printed = []
    assert fp_trt.attach_timing_cache(fake_tensorrt._Config(fp_engine.trt_logger()), cache,
                                      log=lines.append) is True  # this GPU's: reused
    logger = fp_engine.trt_logger()
    assert logger.min_severity == Severity.WARNING  # restored after the quiet try
    assert fake_tensorrt.Logger.printed == []


def test_quiet_tensorrt_restores_the_logger_on_error(trt):
    logger = fp_engine.trt_logger()
    with pytest.raises(ValueError):
        with fp_engine.quiet_tensorrt():
            logger.log(Severity.ERROR, "hidden")
            raise ValueError
    logger.log(Severity.ERROR, "shown")
    assert [m for _, m in fake_tensorrt.Logger.printed] == ["shown"]
