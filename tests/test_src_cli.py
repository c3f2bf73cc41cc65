"""PromptSRC and KgCoOp through the command lines on the tiny CLIP: `python -m fastprompt.train`
with their recipes (the per-epoch learning rate of Dassl's schedule, GPA's options per protocol,
KgCoOp's teacher prompt from the dataset, its batch of 128 on fewer images), then
`python -m fastprompt.export` to ONNX (PromptSRC's classifier is IVLP's single image pass)."""
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import fastprompt as fp
from fastprompt.checkpoint import read_config
from fastprompt.train import main
from test_train import write_oxford_pets

FAST = ["--no-progress", "--shots", "2"]


def log_of(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def promptsrc_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("promptsrc") / "run"
    assert main(["--method", "promptsrc", "--epochs", "3", "--out", str(out), *FAST]) == 0
    return out


def test_promptsrc_cli_base2novel(promptsrc_run):
    """Dassl's schedule with the base-to-novel recipe (lr 0.0025, one warm-up epoch at 1e-5, the
    cosine over --epochs counted after the warm-up); GPA 15 / 1 over those 3 epochs."""
    lrs = [e["lr"] for e in log_of(promptsrc_run)]
    want = [1e-5] + [0.0025 * 0.5 * (1 + math.cos(math.pi * (e - 1) / 3)) for e in (1, 2)]
    assert lrs == pytest.approx(want, rel=1e-12)
    config = read_config(promptsrc_run)
    opts = config["options"]
    assert (opts["n_ctx"], opts["depth"], opts["gpa_mean"], opts["gpa_std"]) == (4, 9, 15.0, 1.0)
    assert config["run"]["recipe"]["batch_size"] == 4
    state = load_file(str(promptsrc_run / "checkpoint.safetensors"))
    assert float(state["train_state/gpa/epochs"]) == 3
    metrics = json.loads((promptsrc_run / "metrics.json").read_text())
    assert {"base_acc", "novel_acc", "hm"} <= set(metrics)


def test_promptsrc_cli_fewshot_takes_its_gpa_group(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--method", "promptsrc", "--subsample", "all", "--epochs", "1", "--out", str(out), *FAST]) == 0
    config = read_config(out)
    assert config["run"]["recipe"]["epochs"] == 1 and config["run"]["recipe"]["options"] == \
        {"gpa_mean": 30.0, "gpa_std": 30.0}
    assert "fewshot recipe" in capsys.readouterr().out


def test_kgcoop_cli_teacher_follows_the_dataset_and_one_small_batch(tmp_path):
    """oxford_pets: KgCoOp's pet prompt; 3 base classes x 2 shots = 6 images under the batch of
    128 train as one batch of 6, as Dassl's loader does (drop_last only with a full batch)."""
    root = write_oxford_pets(tmp_path / "data")
    out = tmp_path / "run"
    assert main(["--method", "kgcoop", "--dataset", "oxford_pets", "--data-root", str(root), "--epochs", "2",
                 "--out", str(out), *FAST]) == 0
    config = read_config(out)
    assert config["options"]["teacher_template"] == "a photo of a {}, a type of pet."
    assert config["options"]["weight"] == 8.0 and config["run"]["recipe"]["batch_size"] == 128
    assert [e["images"] for e in log_of(out)] == [6, 6]
    assert main(["--method", "kgcoop", "--dataset", "oxford_pets", "--data-root", str(root), "--epochs", "1",
                 "--opt", "teacher_template=a {} pet.", "--out", str(tmp_path / "own"), *FAST]) == 0
    assert read_config(tmp_path / "own")["options"]["teacher_template"] == "a {} pet."


def test_promptsrc_run_exports_to_onnx(promptsrc_run, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from fastprompt.export import __main__ as export_cli

    out = tmp_path / "psrc.onnx"
    assert export_cli.main(["--run", str(promptsrc_run), "--format", "onnx", "--out", str(out)]) == 0
    clf = fp.load(promptsrc_run).classifier()
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = clf(x).numpy()
    got = sess.run(None, {"images": x.numpy()})[0]
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-3 and (got.argmax(1) == ref.argmax(1)).all()
