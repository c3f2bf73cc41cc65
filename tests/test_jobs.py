"""The library's entry points `fastprompt.fit(TrainConfig)` and `fastprompt.evaluate(run)`: usable
from Python without argv, and the very same job as `python -m fastprompt.train`."""
from __future__ import annotations

import dataclasses
import json
import re
import sys

import pytest
import torch
from safetensors.torch import load_file

import fastprompt as fp
from fastprompt.errors import InputError
from fastprompt.train import config_from_args, main, parse_args

#: a short CoOp run on the default generated dataset (seconds on two cores)
SMALL = dict(method="coop", shots=2, epochs=2, batch_size=4, device="cpu", progress=False,
             zero_shot_ref="never")


def test_fit_from_python_equals_the_cli_run(tmp_path, monkeypatch, capsys):
    """fit() takes no argv (sys.argv holds garbage here) and trains exactly what the CLI trains
    with the same settings: the same tensors, the same accuracies."""
    monkeypatch.setattr(sys, "argv", ["python", "--bogus", "--lr", "nan"])
    metrics = fp.fit(fp.TrainConfig(out=str(tmp_path / "lib"), **SMALL))
    assert capsys.readouterr().out == ""  # the library prints nothing without callbacks
    assert {"base_acc", "novel_acc", "hm", "train_images_per_s", "wall_s"} <= metrics.keys()
    assert metrics["run_dir"] == str(tmp_path / "lib")

    argv = ["--method", "coop", "--shots", "2", "--epochs", "2", "--batch-size", "4", "--device",
            "cpu", "--no-progress", "--zero-shot-ref", "never", "--out", str(tmp_path / "cli")]
    assert main(argv) == 0
    lib, cli = (load_file(str(tmp_path / d / "adapter.safetensors")) for d in ("lib", "cli"))
    assert lib.keys() == cli.keys() and all(torch.equal(lib[k], cli[k]) for k in lib)
    saved = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert (saved["base_acc"], saved["novel_acc"]) == (metrics["base_acc"], metrics["novel_acc"])


def test_the_cli_builds_the_config_its_flags_say():
    config = config_from_args(parse_args(
        ["--method", "mma", "--lr", "0.01", "--opt", "width=8", "--eval-datasets", "dtd, eurosat",
         "--plain", "--no-progress", "--pretrained", "none", "--recipe", "cross"]))
    assert (config.method, config.lr, config.options, config.eval_datasets) == (
        "mma", 0.01, {"width": "8"}, ("dtd", "eurosat"))
    assert (config.plain, config.progress, config.recipe, config.weights) == (True, False, "cross", None)
    default = config_from_args(parse_args([]))
    assert default == fp.TrainConfig()  # the CLI's defaults are the library's, to the field
    assert default.weights == "shapes" and fp.TrainConfig(model="ViT-B-16").weights is None


@pytest.mark.parametrize("change, needle", [
    (dict(lr=float("nan")), "--lr (lr=) must be a finite number > 0"),
    (dict(seed=-1), "--seed (seed=) must be an integer from 0"),
    (dict(epochs=-1), "--epochs (epochs=) must be an integer >= 0"),
    (dict(subsample="half"), "--subsample (subsample=) must be one of base, all"),
    (dict(recipe="paper"), "--recipe (recipe=) must be one of base2novel, cross, fewshot"),
    (dict(resume=True, overwrite=True), "give one"),
    (dict(recipe_overrides={"momentum": 1.0}), "recipe field 'momentum' must be below 1"),
])
def test_fit_refuses_nonsense_before_it_loads_anything(tmp_path, change, needle):
    config = fp.TrainConfig(out=str(tmp_path / "run"), **change)
    with pytest.raises(InputError, match=re.escape(needle)):
        fp.fit(config)
    assert not (tmp_path / "run").exists()


def test_evaluate_scores_a_saved_run_as_fit_did(tmp_path):
    out = tmp_path / "run"
    metrics = fp.fit(fp.TrainConfig(out=str(out), **SMALL))
    again = fp.evaluate(out, device="cpu", zero_shot_ref="never")
    assert (again["base_acc"], again["novel_acc"], again["hm"]) == (
        metrics["base_acc"], metrics["novel_acc"], metrics["hm"])
    config = json.loads((out / "config.json").read_text())
    # the saved config defines the model; how the run executed is in metrics.json
    assert "plain" not in config["run"] and "precision" not in config["run"]
    assert json.loads((out / "metrics.json").read_text())["runtime"]["precision"] == "fp32"


def test_fit_does_not_change_the_callers_config(tmp_path):
    config = fp.TrainConfig(out=str(tmp_path / "run"), options={"n_ctx": 2}, **SMALL)
    before = dataclasses.replace(config, options=dict(config.options))
    fp.fit(config)
    assert config == before
