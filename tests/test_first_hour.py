"""A newcomer's first hour (#15): what the commands say, show and accept.

Runs say what they do (opening line, warnings, progress lines in logs, closing block); curves.png
explains the run; --help answers every question without importing torch; the README's folder
example runs on 10 images per class; the benchmark run ends with the speed-up table.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import fastprompt as fp
from fastprompt import training
from fastprompt.catalog import METHOD_SUMMARIES, dataset_names, methods_help
from fastprompt.recipes import Recipe, recipe_for
from fastprompt.runlog import walls
from fastprompt.train import main, parser

ROOT = Path(__file__).resolve().parents[1]


def run_cli(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def image_folder(root: Path, per_class: int = 10, classes=("cat", "dog", "red_fox")) -> Path:
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (40 + i, 36), (70 * c, 20 * i % 255, 90)).save(root / name / f"{i}.jpg")
    return root


# ---------------------------------------------------------------- --help

def test_every_flag_has_help_and_methods_and_datasets_are_listed():
    p = parser()
    for action in p._actions:
        assert action.help, f"{action.option_strings} has no help"
    text = p.format_help()
    assert sorted(METHOD_SUMMARIES) == fp.list_methods()
    from fastprompt.data import list_datasets

    assert sorted(dataset_names()) == sorted(list_datasets())
    method_help = methods_help()
    for method in fp.list_methods():
        line = next(line for line in method_help.splitlines() if line.split()[0] == method)
        r = recipe_for(method)
        if r.epochs:
            assert f"batch {r.batch_size}, lr {r.lr:g}, {r.epochs} epochs" in line, line
    assert "cross: lr 0.0026, 2 epochs, depth=3" in method_help  # MaPLe's cross-dataset recipe
    flat = " ".join(text.split())
    for name in dataset_names():
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", flat), name
    assert "(default: 1)" in flat and "(default: 0)" in flat  # --seed, --backbone-seed


@pytest.mark.parametrize("module", ["fastprompt.train", "fastprompt", "fastprompt.predict",
                                    "fastprompt.export", "fastprompt.convert", "fastprompt.table",
                                    "bench.report"])
def test_help_answers_without_importing_torch(module):
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", module, "--help"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    assert "fastprompt" in imported or module == "bench.report"  # the measurement works
    heavy = imported & {"torch", "open_clip", "onnx", "onnxruntime", "matplotlib", "numpy"}
    assert not heavy, heavy


def _parser_of(main, monkeypatch):
    """The argparse parser a command's `main(["--help"])` prints."""
    import argparse

    seen = []

    def record(self, file=None):
        seen.append(self)
        raise SystemExit(0)
    monkeypatch.setattr(argparse.ArgumentParser, "print_help", record)
    with pytest.raises(SystemExit):
        main(["--help"])
    return seen[0]


def test_every_command_has_help_for_every_flag(monkeypatch):
    from bench import report
    from fastprompt import convert, predict, table
    from fastprompt.export import __main__ as export

    for cli in (main, predict.main, export.main, convert.main, table.main, report.main):
        p = _parser_of(cli, monkeypatch)
        bare = [a.option_strings or a.dest for a in p._actions if not a.help]
        assert not bare, (p.prog, bare)


def test_torch_free_dataset_lists_match_the_registry():
    from fastprompt.catalog import GENERATED_DATASETS
    from fastprompt.data.generated import GENERATED
    from fastprompt.runlog import GENERATED as ON_GENERATED

    assert GENERATED_DATASETS == GENERATED
    assert set(ON_GENERATED) == {*GENERATED, "builtin"}


def test_export_help_defaults_are_the_exporters():
    from fastprompt.export import __main__ as cli, onnx, tensorrt

    assert (cli.EXPORTERS, cli.MIN_OPSET) == (onnx.EXPORTERS, onnx.MIN_OPSET)
    assert cli.DEFAULT_BATCH == tensorrt.DEFAULT_BATCH


def test_bench_report_help_and_a_missing_file(tmp_path, capsys):
    from bench import report

    with pytest.raises(SystemExit) as exit_:
        report.main(["--help"])
    assert exit_.value.code == 0 and "--benchmark-json" in capsys.readouterr().out
    assert report.main([str(tmp_path / "none.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--benchmark-json" in err


# ---------------------------------------------------------------- warnings

def test_walls():
    shapes = dict(method="maple", dataset="shapes_colour", subsample="base", base=["a"], novel=["b"])
    warm_only = Recipe(epochs=1, warmup_epochs=1, lr=0.0035)
    assert any("--epochs 1 ends inside the warm-up" in w for w in walls(model="tiny", recipe=warm_only, **shapes))
    assert walls(model="tiny", recipe=Recipe(epochs=2, warmup_epochs=1), **shapes) == []
    assert walls(model="tiny", recipe=Recipe(epochs=1, warmup_epochs=0), **shapes) == []  # MMA: no warm-up
    folder = dict(shapes, dataset="folder", base=["cat", "dog"], novel=["red fox"])
    found = walls(model="tiny", recipe=Recipe(epochs=5), **folder)
    assert len(found) == 2 and "--model ViT-B-16 --pretrained openai" in found[0]
    assert "red fox" in found[1] and "--subsample all" in found[1]
    assert walls(model="ViT-B-16", recipe=Recipe(epochs=5), **dict(folder, subsample="all")) == []


# ---------------------------------------------------------------- a run's output

def test_a_run_says_what_it_does(tmp_path, capsys, monkeypatch):
    """Opening line, the three walls as warnings on stderr, progress lines (stderr no terminal),
    the closing block on the test split with the zero-shot reference, the run's files."""
    monkeypatch.setattr(training, "PROGRESS_EVERY_S", 0.0)
    images = image_folder(tmp_path / "my_images")
    out = tmp_path / "run"
    code, stdout, err = run_cli(["--method", "coop", "--dataset", "folder", "--data-root", str(images),
                                 "--shots", "2", "--batch-size", "2", "--epochs", "1", "--out", str(out)],
                                capsys)
    assert code == 0, err
    opening = stdout.splitlines()[0]
    for needle in ("coop on folder", "base2novel recipe", "2 base classes", "1 ", "novel",
                   "2 shots, 4 training images", "backbone tiny, weights shapes, GELU",
                   "1 epoch (1 warm-up at lr 1e-5), batch 2, lr 0.002", "cpu fp32", str(out)):
        assert needle in opening, (needle, opening)
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 3, err
    assert "epoch 1/1  step 1/2  loss" in stdout  # a progress line within the epoch
    assert "accuracy (%) on the test split" in stdout and "zero-shot" in stdout
    block = stdout[stdout.index("accuracy (%)"):]
    metrics = json.loads((out / "metrics.json").read_text())
    assert f"{metrics['base_acc']:.2f}" in block and f"{metrics['zeroshot_ref']['hm']:.2f}" in block
    assert metrics["eval_sets"] == {"base": {"classes": 2, "images": 6}, "novel": {"classes": 1, "images": 3}}
    assert "wall time" in block and f"files in {out}: metrics.json, curves.png" in block
    assert stdout.rstrip().splitlines()[-1].startswith("base_acc ")


def test_eval_only_labels_its_split_and_zero_shot_can_be_skipped(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(["--method", "coop", "--shots", "2", "--batch-size", "8", "--epochs", "2",
                    "--no-progress", "--zero-shot-ref", "never", "--out", str(out)], capsys)[0] == 0
    assert "zeroshot_ref" not in json.loads((out / "metrics.json").read_text())
    code, stdout, _ = run_cli(["--eval-only", "--run", str(out), "--eval-split", "val",
                               "--zero-shot-ref", "never"], capsys)
    assert code == 0 and stdout.startswith(f"evaluating {out} (coop) on shapes_colour")
    assert "accuracy (%) on the val split" in stdout
    assert "zero-shot reference skipped: --zero-shot-ref never" in stdout


def test_no_progress_lines_with_no_progress(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(training, "PROGRESS_EVERY_S", 0.0)
    code, stdout, err = run_cli(["--method", "coop", "--shots", "2", "--batch-size", "4", "--epochs",
                                 "2", "--no-progress", "--out", str(tmp_path / "r")], capsys)
    assert code == 0 and "step " not in stdout + err and "warning" not in err


# ---------------------------------------------------------------- curves.png

def test_curves_explain_the_run(tmp_path, capsys):
    from fastprompt.plot import make_figure

    out = tmp_path / "run"
    assert run_cli(["--method", "coop", "--shots", "2", "--batch-size", "8", "--epochs", "3",
                    "--seed", "2", "--no-progress", "--out", str(out)], capsys)[0] == 0
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    metrics = json.loads((out / "metrics.json").read_text())
    fig = make_figure(out)
    title = fig._suptitle.get_text()
    assert "coop on shapes_colour, seed 2" in title and "tiny" in title
    loss_ax, lr_ax, acc_ax = fig.axes
    assert lr_ax.get_yscale() == "log"
    assert list(lr_ax.lines[0].get_ydata()) == [e["lr"] for e in log]
    fig.canvas.draw()
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    levels = [(round(line.get_ydata()[0], 6), line.get_linestyle()) for line in acc_ax.lines[1:]]
    assert len(levels) == 6
    for key in ("base_acc", "novel_acc", "hm"):
        assert (round(metrics[key], 6), "-") in levels
        assert (round(metrics["zeroshot_ref"][key], 6), "--") in levels
    import matplotlib.pyplot as plt

    plt.close(fig)


# ---------------------------------------------------------------- README

def readme_command(prefix: str) -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    line = next(line for line in text.splitlines() if line.startswith(prefix))
    return line.split("#")[0].split()


def test_readme_folder_example_runs_on_ten_images_per_class(tmp_path, capsys, monkeypatch):
    """The README's folder command, as written, on a folder of 3 classes x 10 images."""
    argv = readme_command("python -m fastprompt.train --dataset folder")
    image_folder(tmp_path / "my_images")
    monkeypatch.chdir(tmp_path)
    code, stdout, err = run_cli(argv[3:] + ["--no-progress"], capsys)
    assert code == 0, err
    assert "all 3 classes" in stdout and "accuracy (%) on the test split" in stdout
    assert (tmp_path / "runs" / "folder").is_dir()


# ---------------------------------------------------------------- benchmarks

def _bench(group, variant, median, **info):
    return {"group": group, "name": f"{group}[{variant}]", "params": {"variant": variant},
            "stats": {"median": median}, "extra_info": {"variant": variant, "device": "cpu",
                                                        "dtype": "float32", **info}}


BENCHES = [_bench("train-maple", "baseline", 0.03, method="maple", classes=20, images=4),
           _bench("train-maple", "fastprompt", 0.01, method="maple", classes=20, images=4),
           _bench("inference-coop-C200", "baseline", 0.08, method="coop", classes=200, images=16),
           _bench("inference-coop-C200", "fastprompt", 0.002, method="coop", classes=200, images=16),
           _bench("inference-coop-C200", "clip-image-only", 0.004, method="coop", classes=200, images=16),
           _bench("kernel-adapter-fwd", "baseline", 0.002), _bench("kernel-adapter-fwd", "compile", 0.001)]


def test_speedup_summary():
    from bench.report import speedups

    text = speedups({"benchmarks": BENCHES})
    train = next(line for line in text.splitlines() if line.startswith("maple "))
    assert train.split() == ["maple", "20", "4", "30.00", "10.00", "3.00x", "400"]
    infer = next(line for line in text.splitlines() if line.startswith("coop "))
    assert infer.split()[-2:] == ["40.00x", "2.00x"]  # vs baseline, vs open_clip's encode_image
    assert "kernel-adapter-fwd" in text and "compile 2.00x" in text
    assert speedups({"benchmarks": []}) == ""


class _Reporter:
    def __init__(self):
        self.lines = []

    def write_sep(self, sep, title):
        self.lines.append(title)

    def write_line(self, text):
        self.lines.append(text)


class _Meta:
    has_error = False

    def __init__(self, data):
        self.data = data

    def as_dict(self, include_data=True):
        return self.data


def test_benchmark_run_ends_with_the_speedup_table(monkeypatch):
    """bench/conftest.py's pytest_terminal_summary: the summary after pytest-benchmark's tables;
    nothing with --benchmark-disable (.ci/run's smoke run)."""
    import importlib.util
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location("bench_conftest", ROOT / "bench" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, conftest)  # its dataclasses look themselves up
    spec.loader.exec_module(conftest)
    session = SimpleNamespace(disabled=False, benchmarks=[_Meta(b) for b in BENCHES])
    reporter = _Reporter()
    conftest.pytest_terminal_summary(reporter, 0, SimpleNamespace(_benchmarksession=session))
    assert "speed-ups" in reporter.lines[0] and "3.00x" in reporter.lines[1]
    reporter = _Reporter()
    session.disabled = True
    conftest.pytest_terminal_summary(reporter, 0, SimpleNamespace(_benchmarksession=session))
    assert reporter.lines == []
