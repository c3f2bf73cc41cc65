"""Silently wrong or a traceback before: each of these is now right, or one line and exit 2."""
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from common import CLASSNAMES, tiny_clip
from PIL import Image

import fastprompt as fp
from fastprompt.train import main as train

ROOT = Path(__file__).resolve().parent.parent


def folder_dataset(root, classes=("rose", "tulip", "daisy"), per_class=3):
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (32, 32), (80 * c, 30 * i, 50)).save(root / name / f"{i}.png")
    return root


def run(argv, capsys):
    code = train(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(code, err, needle):
    """Exit 2 and one error line (advice lines starting with "warning:" aside)."""
    lines = [line for line in err.splitlines() if not line.startswith("warning:")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0] and "Traceback" not in err, err


@pytest.fixture
def data(tmp_path):
    return ["--dataset", "folder", "--data-root", str(folder_dataset(tmp_path / "flowers")),
            "--subsample", "all", "--shots", "1", "--no-progress"]


@pytest.mark.parametrize("flags, needle", [
    (["--lr", "nan"], "--lr (lr=) must be a finite number > 0, got nan"),
    (["--lr", "inf"], "--lr (lr=) must be a finite number"),
    (["--lr", "0"], "--lr (lr=) must be a finite number > 0"),
    (["--epochs", "-1"], "--epochs (epochs=) must be an integer >= 0"),
    (["--shots", "0"], "--shots (shots=) must be an integer >= 1"),
    (["--batch-size", "0"], "--batch-size (batch_size=) must be an integer >= 1"),
    (["--seed", "-3"], "--seed (seed=) must be an integer from 0 to 4294967295"),
    (["--seed", str(2**40)], "--seed (seed=) must be an integer from 0"),
    (["--backbone-seed", "-1"], "--backbone-seed (backbone_seed=) must be an integer"),
    (["--resume", "--overwrite"], "give one"),
])
def test_numbers_that_train_nonsense_are_refused(flags, needle, tmp_path, capsys):
    out = tmp_path / "r"
    code, _, err = run(["--method", "coop", "--out", str(out), *flags], capsys)
    one_line_error(code, err, needle)
    assert not out.exists()


def test_option_values_are_coerced_by_the_field_type(tmp_path, data, capsys):
    out = tmp_path / "r"
    code, _, err = run(["--method", "coop", "--epochs", "0", "--opt", "csc=False", "--opt",
                        "n_ctx=3", "--opt", "ctx_init=a photo of", "--out", str(out), *data], capsys)
    assert code == 0, err
    options = json.loads((out / "config.json").read_text())["options"]
    assert options["csc"] is False and options["n_ctx"] == 3 and options["ctx_init"] == "a photo of"
    conf = tmp_path / "c.yaml"
    conf.write_text("method: coop\nepochs: '0'\noptions:\n  csc: 'False'\n  n_ctx: '3'\n")
    code, _, err = run(["--config", str(conf), "--out", str(tmp_path / "r2"), *data], capsys)
    assert code == 0, err
    options = json.loads((tmp_path / "r2" / "config.json").read_text())["options"]
    assert options["csc"] is False and options["n_ctx"] == 3


@pytest.mark.parametrize("flags, needle", [
    (["--opt", "csc=maybe"], "option 'csc' of method 'coop' must be a boolean (true/false), got 'maybe'"),
    (["--opt", "n_ctx=2.5"], "option 'n_ctx' of method 'coop' must be an integer, got '2.5'"),
    (["--opt", "nope"], "--opt needs KEY=VALUE"),
])
def test_bad_option_values_are_one_line(flags, needle, tmp_path, capsys):
    code, _, err = run(["--method", "coop", "--out", str(tmp_path / "r"), *flags], capsys)
    one_line_error(code, err, needle)


@pytest.mark.parametrize("text, needle", [
    ("lr: [1\nepochs: 2\n", "is not valid YAML (line 2, column 7)"),
    ("epochs: abc\n", "'epochs' in {path} must be an integer, got 'abc'"),
    ("no_progress: maybe\n", "'no_progress' in {path} must be a boolean"),
    ("options: {csc: 3}\nmethod: coop\n", "option 'csc' of method 'coop' must be a boolean"),
    ("options: [1, 2]\n", "'options' in {path} must be a mapping"),
    ("- just\n- a list\n", "must hold a mapping of flag names"),
    ("warmup_epochs: -2\n", "'warmup_epochs' in {path} must be an integer >= 0"),
    ("momentum: 1.5\n", "'momentum' in {path} must be below 1"),
    ("subsample: half\n", "'subsample' in {path} must be one of base, all"),
    ("opt: [csc=true]\n", "give method options under 'options:'"),
    ("\xff\xfe", "is not UTF-8 text"),
])
def test_bad_config_files_are_one_line(text, needle, tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(text.encode("latin-1"))
    code, _, err = run(["--config", str(path), "--out", str(tmp_path / "r")], capsys)
    one_line_error(code, err, needle.format(path=path))


def test_out_that_cannot_be_a_run_directory(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for out, needle in [(tmp_path / "file", "is a file, not a directory"),
                        (tmp_path / "file" / "sub", "a part of this path is a file"),
                        (tmp_path / "loop" / "x", "a symbolic link points back to itself")]:
        code, _, err = run(["--method", "zeroshot", "--out", str(out), "--no-progress"], capsys)
        one_line_error(code, err, needle)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_out_is_one_line(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    code, _, err = run(["--method", "zeroshot", "--out", str(ro / "r"), "--no-progress"], capsys)
    one_line_error(code, err, "Permission denied")


def test_disk_full_is_one_line_and_keeps_the_last_epoch(tmp_path, monkeypatch, data, capsys):
    """The disk fills while epoch 2 is saved: one line, and epoch 1's files still resume."""
    import safetensors.torch as st

    from fastprompt.training import CHECKPOINT

    out = tmp_path / "r"
    common = ["--method", "coop", "--batch-size", "1", "--out", str(out), *data]
    assert run([*common, "--epochs", "1"], capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = st.save_file

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(st, "save_file", full)
    code, _, err = run([*common, "--epochs", "2", "--resume"], capsys)
    one_line_error(code, err, "the disk is full")
    assert f"{out / CHECKPOINT} (" in err  # the file, not its temporary name
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    for name in (CHECKPOINT, "adapter.safetensors", "config.json"):
        assert (out / name).read_bytes() == before[name]
    monkeypatch.setattr(st, "save_file", real)
    code, stdout, err = run([*common, "--epochs", "2", "--resume"], capsys)
    assert code == 0 and "resuming" in stdout + err and "epoch 2/2" in stdout, err


def test_resume_with_other_settings_is_refused_on_generated_data(tmp_path, capsys):
    out = tmp_path / "r"
    model = fp.create("coop", tiny_clip(), CLASSNAMES)
    fp.save(model, out, extra={"run": {"dataset": "shapes_colour", "seed": 1, "subsample": "base",
                                       "recipe": {"shots": 16}}})
    for flags, needle in [(["--seed", "2"], "started with seed 1, not 2"),
                          (["--shots", "4"], "started with shots 16, not 4"),
                          (["--dataset", "shapes_count"], "started with dataset 'shapes_colour'"),
                          (["--method", "maple"], "started with method 'coop'")]:
        argv = ["--method", "coop", "--resume", "--out", str(out), "--no-progress", *flags]
        code, _, err = run(argv, capsys)
        one_line_error(code, err, needle)


def _broken_runs(tmp_path):
    """A good run directory, then copies with one thing wrong each."""
    good = fp.save(fp.create("coop", tiny_clip(), CLASSNAMES), tmp_path / "good")
    cases = {}

    def copy(name, edit):
        d = tmp_path / name
        d.mkdir()
        for f in good.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        edit(d)
        cases[name] = d

    config = json.loads((good / "config.json").read_text())
    weights = (good / "adapter.safetensors").read_bytes()
    copy("truncated", lambda d: (d / "adapter.safetensors").write_bytes(weights[: len(weights) // 2]))
    copy("garbage", lambda d: (d / "adapter.safetensors").write_bytes(b"\x00" * 64))
    copy("classnames-string", lambda d: (d / "config.json").write_text(
        json.dumps({**config, "classnames": "dog"})))
    copy("missing-key", lambda d: (d / "config.json").write_text(
        json.dumps({k: v for k, v in config.items() if k != "backbone"})))
    copy("bad-option", lambda d: (d / "config.json").write_text(
        json.dumps({**config, "options": {**config["options"], "csc": "perhaps"}})))
    copy("not-json", lambda d: (d / "config.json").write_text('{"format": '))
    return cases


NEEDLES = {"truncated": "truncated or corrupt", "garbage": "truncated or corrupt",
           "classnames-string": "'classnames' in", "missing-key": "lacks the key 'backbone'",
           "bad-option": "option 'csc' of method 'coop' must be a boolean",
           "not-json": "is not valid JSON"}


def test_broken_run_directories_are_one_line_everywhere(tmp_path, capsys):
    from fastprompt.export.__main__ import main as export
    from fastprompt.predict import main as predict

    Image.new("RGB", (40, 40), (200, 10, 10)).save(tmp_path / "img.png")
    for name, run_dir in _broken_runs(tmp_path).items():
        needle = NEEDLES[name]
        with pytest.raises(fp.checkpoint.CheckpointError, match=needle.replace("(", "\\(")):
            fp.load(run_dir, clip=tiny_clip())
        for cli, argv in [(train, ["--eval-only", "--run", str(run_dir), "--no-progress"]),
                          (predict, ["--model", str(run_dir), str(tmp_path / "img.png")]),
                          (export, ["--run", str(run_dir), "--format", "onnx", "--out",
                                    str(tmp_path / f"{name}.onnx")])]:
            code = cli(argv)
            err = capsys.readouterr().err
            one_line_error(code, err, needle)
        assert not (tmp_path / f"{name}.onnx").exists()


def test_wrong_onnx_metadata_is_one_line(tmp_path, capsys):
    import onnx

    from fastprompt.export import export_onnx
    from fastprompt.predict import main as predict

    run_dir = fp.save(fp.create("coop", tiny_clip(), CLASSNAMES), tmp_path / "run")
    path = export_onnx(run_dir, tmp_path / "m.onnx", log=lambda *_: None).path
    Image.new("RGB", (40, 40), (200, 10, 10)).save(tmp_path / "img.png")
    for key, value, needle in [("classnames", "[1, 2", "metadata 'classnames' of"),
                               ("image_size", "-4", "metadata 'image_size' of"),
                               ("std", "[0, 1, 1]", "metadata 'std' of"),
                               ("output", "probabilities", "metadata 'output' of")]:
        proto = onnx.load(str(path))
        next(p for p in proto.metadata_props if p.key == key).value = value
        bad = tmp_path / f"bad-{key}.onnx"
        onnx.save(proto, str(bad))
        code = predict(["--model", str(bad), str(tmp_path / "img.png")])
        one_line_error(code, capsys.readouterr().err, needle)


def test_nan_outputs_fail_the_check_and_are_never_printed(tmp_path, capsys):
    import torch

    from fastprompt.export.onnx import CheckResult, compare
    from fastprompt.predict import predict

    ref = np.ones((2, 3))
    nan = ref.copy()
    nan[1, 2] = np.nan
    assert compare(ref, nan) == (float("inf"), float("inf"), False)
    assert compare(nan, ref)[2] is False and not CheckResult(max_rel=float("nan")).ok

    class NanRunner:
        image_size, mean, std, device = 32, (0.5,) * 3, (0.5,) * 3, "cpu"
        classnames = ["a", "b"]

        def run(self, x):
            return torch.full((x.shape[0], 2), float("nan"))

    Image.new("RGB", (40, 40)).save(tmp_path / "img.png")
    with pytest.raises(fp.errors.FastpromptError, match="holds NaN/inf"):
        predict(NanRunner(), [str(tmp_path / "img.png")], as_json=True)
    assert "nan" not in capsys.readouterr().out.lower()


def test_closed_pipe_ends_predict_quietly(tmp_path):
    run_dir = fp.save(fp.create("coop", tiny_clip(), CLASSNAMES), tmp_path / "run")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(800):  # ~80 kB of output: more than a pipe buffers (64 kB)
        Image.new("RGB", (8, 8), (i % 256, 0, 0)).save(images / f"{i:04d}.png")
    cmd = (f"set -o pipefail; {sys.executable} -m fastprompt.predict --model {run_dir} {images} "
           f"--batch-size 400 | head -1")
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)
    assert proc.stdout.count("\n") == 1 and proc.stderr == "", proc.stderr
    assert proc.returncode == 141  # 128 + SIGPIPE, as `yes | head -1`


@pytest.mark.parametrize("method, options, needle", [
    ("cocoop", {"meta_ratio": "0"}, "'meta_ratio' of method 'cocoop' must be >= 1"),
    ("lamm", {"shots": 0}, "'shots' of method 'lamm' must be >= 1"),
    ("lamm", {"temperature": "0"}, "'temperature' of method 'lamm' must be > 0"),
    ("mma", {"width": 0}, "'width' of method 'mma' must be >= 1"),
    ("mma", {"text_scale": "nan"}, "'text_scale' of method 'mma' must be a finite number"),
    ("coop", {"text_chunk": -3}, "'text_chunk' of method 'coop' must be >= 0"),
])
def test_option_values_that_would_divide_by_zero_or_train_nan(method, options, needle):
    """Each was a ZeroDivisionError, a NaN loss or an empty adapter before."""
    with pytest.raises(fp.errors.InputError, match=needle):
        fp.create(method, tiny_clip(), CLASSNAMES, **options)
