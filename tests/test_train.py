"""`python -m fastprompt.train` end to end on the tiny backbone: protocol, files, resume, errors."""
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fastprompt.checkpoint import read_config
from fastprompt.train import main

from common import killed_in_epoch

FAST = ["--no-progress", "--shots", "2", "--epochs", "1"]
PET_CLASSES = ["abyssinian", "american_bulldog", "beagle", "bengal", "boxer"]  # 5: base = first 3


def write_oxford_pets(root, per_class=4):
    """A small dataset in CoOp's layout: oxford_pets/images/*.jpg + split_zhou_OxfordPets.json."""
    d = root / "oxford_pets"
    (d / "images").mkdir(parents=True)
    split = {"train": [], "val": [], "test": []}
    for label, name in enumerate(PET_CLASSES):
        for i in range(per_class * 3):
            fname = f"{name}_{i}.jpg"
            colour = (40 * label, 255 - 40 * label, (17 * i) % 255)
            Image.new("RGB", (40, 36), colour).save(d / "images" / fname)
            part = ["train", "val", "test"][i % 3]
            split[part].append([fname, label, name])
    (d / "split_zhou_OxfordPets.json").write_text(json.dumps(split))
    return root


def run_cli(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_coop_layout_trains_on_base_classes_and_reports_novel(tmp_path, capsys):
    root = write_oxford_pets(tmp_path / "data")
    out = tmp_path / "run"
    code, stdout, _ = run_cli(["--method", "coop", "--dataset", "oxford_pets", "--data-root",
                               str(root), "--out", str(out), "--batch-size", "2", *FAST], capsys)
    assert code == 0
    config = read_config(out)
    assert config["classnames"] == PET_CLASSES[:3]
    assert config["run"]["novel_classnames"] == PET_CLASSES[3:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"base_acc", "novel_acc", "hm", "train_images_per_s", "wall_s"} <= set(metrics)
    assert "novel_acc" in stdout and (out / "curves.png").is_file()
    split = json.loads((out / "split.json").read_text())
    assert len(split["train"]) == 3 * 2  # 2 shots x 3 base classes


def test_plain_folder_tree_trains(tmp_path, capsys):
    tree = tmp_path / "flowers"
    for c, name in enumerate(["rose", "tulip", "daisy_white"]):
        (tree / name).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (32, 32), (80 * c, 10 * i, 50)).save(tree / name / f"{i}.png")
    out = tmp_path / "run"
    code, stdout, _ = run_cli(["--method", "mma", "--dataset", "folder", "--data-root", str(tree),
                               "--subsample", "all", "--out", str(out), "--batch-size", "2", *FAST],
                              capsys)
    assert code == 0 and "acc" in json.loads((out / "metrics.json").read_text())
    assert read_config(out)["classnames"] == ["daisy white", "rose", "tulip"]


def test_missing_split_file_is_one_clear_line(tmp_path, capsys):
    (tmp_path / "oxford_pets" / "images").mkdir(parents=True)
    code, _, err = run_cli(["--dataset", "oxford_pets", "--data-root", str(tmp_path),
                            "--out", str(tmp_path / "r"), *FAST], capsys)
    assert code == 2
    assert err.count("\n") == 1 and "split_zhou_OxfordPets.json" in err and "Traceback" not in err


@pytest.mark.parametrize("args, needle", [
    (["--method", "nope"], "unknown method 'nope'"),
    (["--dataset", "nope"], "unknown dataset"),
    (["--opt", "nonsense=1"], "unknown option 'nonsense'"),
    (["--shots", "500"], "shots"),
])
def test_bad_input_exits_with_one_line(args, needle, tmp_path, capsys):
    code, _, err = run_cli([*FAST, *args, "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and needle in err and err.count("\n") == 1


def checkpoint_epoch(run_dir):
    """The finished epoch a run's checkpoint records, and whether all its tensors are finite."""
    from safetensors import safe_open

    with safe_open(str(run_dir / "checkpoint.safetensors"), "pt") as f:
        finite = all(bool(f.get_tensor(k).isfinite().all()) for k in f.keys())
        return int(f.metadata()["epoch"]), finite


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(tmp_path, capsys):
    """Epoch 1 (the 1e-5 warm-up) trains; epoch 2 at lr 1e32 diverges: one line naming epoch 2,
    and the run keeps epoch 1's checkpoint and adapter, finite, from which --resume continues."""
    cfg = tmp_path / "recipe.json"
    cfg.write_text(json.dumps({"warmup_epochs": 1, "lr": 1e32, "epochs": 2}))
    out = tmp_path / "r"
    args = ["--method", "coop", "--out", str(out), "--no-progress", "--shots", "2", "--batch-size", "8"]
    code, _, err = run_cli(["--config", str(cfg), *args], capsys)
    assert code == 2 and err.count("\n") == 1, err
    message = err.replace(str(out), "<run>")  # the run's path holds the test's name
    assert "loss" in message and "nan" in message.lower() and "epoch 2" in message and "--lr" in message, err
    assert checkpoint_epoch(out) == (1, True)
    assert len((out / "log.jsonl").read_text().splitlines()) == 1
    saved = load_file(str(out / "adapter.safetensors"))
    assert saved and all(bool(t.isfinite().all()) for t in saved.values())
    cfg.write_text(json.dumps({"warmup_epochs": 1, "lr": 0.002, "epochs": 2}))
    code, stdout, _ = run_cli(["--config", str(cfg), *args, "--resume"], capsys)
    assert code == 0 and checkpoint_epoch(out) == (2, True), stdout


def test_resume_continues_a_killed_run_exactly(tmp_path, capsys, monkeypatch):
    """A 3-epoch run interrupted (Ctrl-C) in epoch 3, after the post-warm-up epoch 2 at the full
    rate had moved the context and the SGD momentum, resumes to the very tensors of an
    uninterrupted run."""


    common = ["--method", "coop", "--no-progress", "--shots", "2", "--batch-size", "8", "--epochs", "3"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert run_cli([*common, "--out", str(whole)], capsys)[0] == 0
    with killed_in_epoch(monkeypatch, 2):  # 0-indexed
        code, _, err = run_cli([*common, "--out", str(part)], capsys)
    assert code == 130 and "--resume" in err
    assert checkpoint_epoch(part) == (2, True)
    log = [json.loads(line) for line in (part / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [1, 2] and log[1]["lr"] > 100 * log[0]["lr"]  # past warm-up
    code, _, err = run_cli([*common, "--out", str(part)], capsys)
    assert code == 2 and "--resume" in err  # an existing run is never overwritten silently
    assert run_cli([*common, "--out", str(part), "--resume"], capsys)[0] == 0
    a, b = load_file(str(whole / "checkpoint.safetensors")), load_file(str(part / "checkpoint.safetensors"))
    assert a.keys() == b.keys() and {"param/ctx", "momentum/ctx"} <= a.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len((part / "log.jsonl").read_text().splitlines()) == 3


def test_eval_only_reproduces_the_run(tmp_path, capsys):
    out = tmp_path / "r"
    assert run_cli(["--method", "ivlp", "--out", str(out), "--batch-size", "4", *FAST], capsys)[0] == 0
    metrics = json.loads((out / "metrics.json").read_text())
    code, stdout, _ = run_cli(["--eval-only", "--run", str(out), "--no-progress"], capsys)
    assert code == 0 and f"base_acc {metrics['base_acc']:.2f}" in stdout


def test_two_process_ddp_on_cpu(tmp_path):
    """torchrun with the gloo backend, two processes: rank 0 writes the run."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29533", "-m", "fastprompt.train", "--method", "coop", "--out", str(out),
           "--device", "cpu", "--batch-size", "2", *FAST]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "metrics.json").is_file() and "hm" in proc.stdout


def test_zeroshot_runs_through_the_cli(tmp_path, capsys):
    out = tmp_path / "zs"
    code, stdout, _ = run_cli(["--method", "zeroshot", "--out", str(out), "--no-progress"], capsys)
    assert code == 0 and "hm" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 0 and (out / "adapter.safetensors").is_file()


def test_seed_alone_decides_the_initial_prompts(tmp_path, capsys):
    """--seed fixes the learnable parameters' init, whatever the process drew before."""
    common = ["--method", "maple", "--epochs", "0", "--shots", "1", "--no-progress"]
    assert run_cli([*common, "--out", str(tmp_path / "a")], capsys)[0] == 0
    torch.rand(1000)  # any earlier use of the global RNG
    assert run_cli([*common, "--out", str(tmp_path / "b")], capsys)[0] == 0
    assert run_cli([*common, "--seed", "2", "--out", str(tmp_path / "c")], capsys)[0] == 0
    a, b, c = (load_file(str(tmp_path / r / "adapter.safetensors")) for r in "abc")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_corrupt_images_in_loader_workers_are_counted(tmp_path, capsys):
    """--workers 2: a corrupt training image is counted in the log and metrics.json, a corrupt
    test image in the evaluation warning, though only worker processes read them."""
    root = write_oxford_pets(tmp_path / "data")
    (root / "oxford_pets" / "images" / "abyssinian_0.jpg").write_bytes(b"not a jpeg")  # train
    (root / "oxford_pets" / "images" / "beagle_2.jpg").write_bytes(b"not a jpeg")  # test
    out = tmp_path / "run"
    code, stdout, stderr = run_cli(["--method", "coop", "--dataset", "oxford_pets", "--data-root",
                                    str(root), "--out", str(out), "--batch-size", "2", "--workers",
                                    "2", "--no-progress", "--shots", "4", "--epochs", "1"], capsys)
    assert code == 0
    assert "warning: 1 of 12 evaluation images were unreadable" in stderr  # the CLI's one line
    assert "skipped 1 unreadable training image" in stdout and "abyssinian_0.jpg" in stdout
    assert json.loads((out / "metrics.json").read_text())["skipped_images"] == 1


def test_table_runs_on_a_coop_layout_dataset(tmp_path, capsys):
    """`python -m fastprompt.table` with train flags (--data-root, --shots, ...) passed through."""
    from fastprompt.table import chance, main as table
    root = write_oxford_pets(tmp_path / "data")
    flags = ["--data-root", str(root), "--shots", "2", "--epochs", "1", "--batch-size", "2"]
    assert table(["--methods", "zeroshot,coop", "--datasets", "oxford_pets", "--seeds", "1,2",
                  "--json", str(tmp_path / "r.json"), *flags]) == 0
    stdout = capsys.readouterr().out
    assert "| oxford_pets | coop |" in stdout and "| oxford_pets | zeroshot |" in stdout
    assert chance("oxford_pets", root) == (100 / 3, 100 / 2)
    assert "Chance (base/novel, %): oxford_pets 33.3/50.0." in stdout
    saved = json.loads((tmp_path / "r.json").read_text())
    assert [r["seed"] for r in saved["oxford_pets/coop"]] == [1, 2]
    # zero-shot is the train CLI's zero-shot run on the same data (and the same for every seed)
    zs = saved["oxford_pets/zeroshot"]
    assert {**zs[0], "seed": 2} == zs[1]
    assert run_cli(["--method", "zeroshot", "--dataset", "oxford_pets", "--out", str(tmp_path / "zs"),
                    "--no-progress", *flags[:4]], capsys)[0] == 0
    metrics = json.loads((tmp_path / "zs" / "metrics.json").read_text())
    assert {k: metrics[k] for k in ("base_acc", "novel_acc", "hm")} == {
        k: zs[0][k] for k in ("base_acc", "novel_acc", "hm")}
    # rebuilding the table needs the data root for the chance line: one clear line without it
    assert table(["--from-json", str(tmp_path / "r.json"), "--data-root", str(root)]) == 0
    assert table(["--from-json", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--data-root" in err and "Traceback" not in err


@pytest.mark.parametrize("args, needle", [
    (["--dataset", "oxford_pets"], "--dataset is set by the table for each run: use --datasets"),
    (["--subsample", "all"], "--subsample is set by the table"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_table_refuses_flags_it_sets_itself(args, needle, capsys):
    from fastprompt.table import main as table
    with pytest.raises(SystemExit) as exc:
        table(args)
    assert exc.value.code == 2 and needle in capsys.readouterr().err
