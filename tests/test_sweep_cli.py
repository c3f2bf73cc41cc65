"""Several runs from one command (`--seeds`, `--datasets`: `fastprompt.fit_many`, packed) and a
command run twice (a finished run is reported, not trained again)."""
import json

import pytest
from safetensors.torch import load_file

import fastprompt as fp
from fastprompt.train import main

FAST = ["--method", "maple", "--shots", "2", "--epochs", "2", "--batch-size", "4", "--no-progress",
        "--zero-shot-ref", "never"]
#: a packed run's tensors against its solo run's (tests/test_sweep_pack.py states the bound)
PACK_RTOL = 2e-4


def tensors(run):
    return {**{f"a/{k}": v for k, v in load_file(str(run / "adapter.safetensors")).items()},
            **{f"c/{k}": v for k, v in load_file(str(run / "checkpoint.safetensors")).items()}}


def test_seeds_pack_equals_three_solo_runs(tmp_path, capsys):
    """`--seeds 1,2,3` (one pack) against `--seed N` three times: the same few-shot images, every
    tensor within PACK_RTOL, the same accuracies to one test image."""
    assert main([*FAST, "--seeds", "1,2,3", "--out", str(tmp_path / "pack")]) == 0
    out = capsys.readouterr().out
    assert "pack of up to 8 runs: peak" in out and "[shapes_colour seed 2] epoch 2/2" in out
    for seed in (1, 2, 3):
        solo = tmp_path / f"solo{seed}"
        assert main([*FAST, "--seed", str(seed), "--out", str(solo)]) == 0
        packed = tmp_path / "pack" / "shapes_colour" / "maple" / f"seed{seed}"
        assert (packed / "split.json").read_bytes() == (solo / "split.json").read_bytes()
        a, b = tensors(solo), tensors(packed)
        assert a.keys() == b.keys()
        gap = max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)) for k in a)
        assert gap <= PACK_RTOL, (seed, gap)
        m, n = (json.loads((d / "metrics.json").read_text()) for d in (solo, packed))
        images = m["eval_sets"]["base"]["images"]
        assert abs(m["base_acc"] - n["base_acc"]) <= 100 / images + 1e-9
        assert abs(m["novel_acc"] - n["novel_acc"]) <= 100 / images + 1e-9


def test_a_finished_run_is_reported_not_trained_again(tmp_path, capsys):
    out = tmp_path / "r"
    args = [*FAST, "--out", str(out)]
    assert main(args) == 0
    first = capsys.readouterr().out
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main(args) == 0
    again = capsys.readouterr().out
    assert "holds this run, finished" in again and "epoch 1/2" not in again
    assert first.splitlines()[-1] == again.splitlines()[-1]  # the same metrics line
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == files
    # another config there is refused as before; an unfinished one points to --resume
    assert main([*args, "--lr", "0.01"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    (out / "metrics.json").unlink()
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err


def test_fit_many_packs_by_method_and_reports_each_run(tmp_path):
    base = fp.TrainConfig(method="coop", shots=2, epochs=1, batch_size=8, progress=False,
                          zero_shot_ref="never")
    configs = [fp.TrainConfig(**{**base.__dict__, "seed": s, "out": str(tmp_path / f"c{s}")})
               for s in (1, 2)]
    configs.append(fp.TrainConfig(**{**base.__dict__, "method": "zeroshot", "epochs": None,
                                     "out": str(tmp_path / "z")}))
    configs.append(fp.TrainConfig(**{**base.__dict__, "seed": 3, "lr": float("nan"),
                                     "out": str(tmp_path / "bad")}))
    results = fp.fit_many(configs, pack=4)
    assert [r["run_dir"] for r in results[:3]] == [str(tmp_path / n) for n in ("c1", "c2", "z")]
    assert all("hm" in r for r in results[:3])
    assert isinstance(results[3], ValueError) and not (tmp_path / "bad").exists()


def test_seeds_flags_are_checked(tmp_path, capsys):
    for argv, needle in [(["--seeds", "1,x"], "--seeds must be a comma-separated list"),
                         (["--seeds", "1,1"], "distinct"),
                         (["--seeds", "1,2", "--seed", "3"], "--seed and --seeds both given"),
                         (["--seeds", "1,2", "--pack", "0"], "--pack must be an integer >= 1"),
                         (["--seeds", "1,2", "--eval-only"], "drop --seeds")]:
        assert main([*FAST, *argv, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()


#: packed and solo runs compared within PACK_RTOL: the same intra-op threading for both
pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_finished_tip_adapter_is_reported_though_training_fitted_its_options(tmp_path, capsys):
    """Tip-Adapter's searched alpha and beta (and its cache size) are options its config.json
    holds after training, not those asked for: run twice, it is still this very run."""
    args = ["--method", "tip_adapter", "--shots", "2", "--no-progress", "--zero-shot-ref", "never",
            "--out", str(tmp_path / "tip")]
    assert main(args) == 0
    saved = json.loads((tmp_path / "tip" / "config.json").read_text())["options"]
    assert saved["cache_size"] > 0
    capsys.readouterr()
    assert main(args) == 0
    assert "holds this run, finished" in capsys.readouterr().out
