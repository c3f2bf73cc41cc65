"""Nothing lost, round 2 (issue #28, #29 items 3-4): the lock file, --overwrite, the order of
errors, failed runs, absolute data roots."""
import json
import os
import stat
import time

import pytest
from common import CLASSNAMES, tiny_clip
from test_faults_cli import folder_dataset, one_line_error, run

import fastprompt as fp
from fastprompt.errors import RunDirError
import fastprompt.rundir as rundir
from fastprompt.rundir import LOCK, RunLock, open_run_dir

COMMON = ["--method", "coop", "--batch-size", "1", "--no-progress", "--dataset", "folder",
          "--subsample", "all", "--shots", "1"]


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture
def flowers(tmp_path):
    return folder_dataset(tmp_path / "flowers")


@pytest.fixture
def old_run(tmp_path, flowers, capsys):
    """A finished one-epoch run in tmp/run (plus a file of the user's), and its bytes."""
    out = tmp_path / "run"
    code, _, err = run([*COMMON, "--data-root", str(flowers), "--epochs", "1", "--out", str(out)],
                       capsys)
    assert code == 0, err
    (out / "notes.txt").write_text("mine")
    return out, _files(out)


# ------------------------------------------------------------------------------ the lock file
def _plant(kind, lock, victim):
    if kind == "symlink":
        lock.symlink_to(victim)
    elif kind == "dangling-symlink":
        lock.symlink_to(victim.parent / "not-yet")
    elif kind == "hardlink":
        os.link(victim, lock)
    elif kind == "hardlink-to-a-lock":  # another run's lock record: ours would replace it
        victim.write_text(json.dumps({"pid": 1, "host": "other", "started": "x"}))
        os.link(victim, lock)
    elif kind == "fifo":
        os.mkfifo(lock)
    else:  # a file of someone else's making
        lock.write_text("precious notes, not a lock record")


@pytest.mark.parametrize("kind", ["symlink", "dangling-symlink", "hardlink", "hardlink-to-a-lock",
                                  "fifo", "foreign"])
def test_the_lock_never_writes_into_a_planted_file(kind, tmp_path, capsys):
    """A .fastprompt.lock that is a link (to any file), a FIFO or another file is refused, and
    whatever it points to keeps its bytes (the lock's JSON overwrote it before)."""
    victim, out = tmp_path / "victim.txt", tmp_path / "out"
    victim.write_text("do not touch")
    out.mkdir()
    _plant(kind, out / LOCK, victim)
    planted = victim.read_text()
    t0 = time.perf_counter()
    with pytest.raises(RunDirError, match="not a .*lock file"):
        RunLock(out).acquire()
    assert time.perf_counter() - t0 < 2  # a FIFO does not block
    code, _, err = run(["--method", "zeroshot", "--no-progress", "--out", str(out)], capsys)
    one_line_error(code, err, "lock file")
    assert victim.read_text() == planted and not (tmp_path / "not-yet").exists()
    assert not (out / "config.json").exists()


def test_a_lock_left_by_a_killed_run_is_still_taken_over(tmp_path):
    (tmp_path / LOCK).write_text(json.dumps({"pid": 1, "host": "h", "started": "x"}))
    with RunLock(tmp_path) as lock:
        assert lock.fd is not None and stat.S_ISREG(os.lstat(tmp_path / LOCK).st_mode)
    (tmp_path / LOCK).write_bytes(b"")  # killed between creating and filling it
    with RunLock(tmp_path) as lock:
        assert lock.fd is not None
    assert not (tmp_path / LOCK).exists()


# ------------------------------------------------------------------------------ --overwrite
@pytest.mark.parametrize("bad, needle", [
    (["--data-root", "{tmp}/typo"], "image folder not found"),
    (["--data-root", "{tmp}/flowers", "--opt", "n_ctx=x"], "option 'n_ctx' of method 'coop'"),
    (["--data-root", "{tmp}/flowers", "--eval-datasets", "nope"], "unknown dataset 'nope'"),
    (["--data-root", "{tmp}/flowers", "--pretrained", "{tmp}/flowers/rose/0.png"],
     "is not a weights file"),
])
def test_overwrite_with_bad_input_keeps_the_old_run(bad, needle, old_run, tmp_path, capsys):
    out, before = old_run
    argv = [*COMMON, "--epochs", "2", "--out", str(out), "--overwrite"]
    code, _, err = run(argv + [a.format(tmp=tmp_path) for a in bad], capsys)
    one_line_error(code, err, needle)
    assert _files(out) == before and sorted(os.listdir(out)) == sorted(before)


def test_ctrl_c_during_overwrite_keeps_the_old_run(old_run, flowers, monkeypatch, capsys):
    """Interrupted after training, while evaluating: the old run is whole, nothing of the new."""
    import fastprompt.jobs as jobs

    out, before = old_run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(jobs, "evaluate_base_novel", interrupted)
    code, _, err = run([*COMMON, "--data-root", str(flowers), "--epochs", "2", "--out", str(out),
                        "--overwrite"], capsys)
    assert code == 130, err
    assert _files(out) == before and sorted(os.listdir(out)) == sorted(before)


def test_overwrite_replaces_the_run_once_the_new_one_is_done(old_run, flowers, capsys):
    out, before = old_run
    code, _, err = run([*COMMON, "--data-root", str(flowers), "--epochs", "2", "--out", str(out),
                        "--overwrite"], capsys)
    assert code == 0, err
    log = [json.loads(x)["epoch"] for x in (out / "log.jsonl").read_text().splitlines()]
    assert log == [1, 2] and (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "config.json").read_text())["run"]["recipe"]["epochs"] == 2
    assert not (out / rundir.STAGE).exists() and not (out / rundir.COMMIT).exists()
    assert not (out / LOCK).exists()


def test_a_swap_cut_short_is_finished_by_the_next_open(tmp_path, monkeypatch):
    """A crash in the middle of the swap: no old marker beside new files; the next open_run_dir
    on the directory moves the rest of the new run in."""
    import fastprompt.files as files

    out = fp.save(fp.create("coop", tiny_clip(), CLASSNAMES), tmp_path / "run")
    (out / "log.jsonl").write_text("old\n")
    new = fp.create("coop", tiny_clip(), CLASSNAMES, n_ctx=2, ctx_init="")
    real, moved = files.move_into_place, []

    def crash_after_one(tmp, path):
        if moved:
            raise OSError(5, "Input/output error", str(path))
        moved.append(path)
        return real(tmp, path)

    with pytest.raises(OSError):
        with open_run_dir(out, overwrite=True) as work:
            fp.save(new, work)
            monkeypatch.setattr(files, "move_into_place", crash_after_one)  # in the swap
    assert not (out / "config.json").exists() and (out / rundir.COMMIT).is_dir()
    assert not (out / "log.jsonl").exists()  # the old run's file that the new run lacks
    monkeypatch.setattr(files, "move_into_place", real)
    with open_run_dir(out, resume=True):
        pass
    assert fp.load(out, clip=tiny_clip()).ctx.shape[0] == 2 and not (out / rundir.COMMIT).exists()


def test_convert_overwrite_interrupted_keeps_the_old_run(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    from fastprompt.convert import main as convert
    from fastprompt.original import save_original

    src = save_original(fp.create("coop", tiny_clip(), CLASSNAMES), tmp_path / "orig")
    names = tmp_path / "names.txt"
    names.write_text("\n".join(CLASSNAMES))
    out = fp.save(fp.create("coop", tiny_clip(), CLASSNAMES, n_ctx=2, ctx_init=""), tmp_path / "run")
    before = _files(out)

    def interrupted(model, run_dir, extra=None):
        (Path(run_dir) / "adapter.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(fp, "save", interrupted)
    argv = ["--original", "coop", str(src), "--model", "tiny", "--pretrained", "none",
            "--classnames", str(names), "--out", str(out), "--overwrite"]
    assert convert(argv) == 130
    assert _files(out) == before and sorted(os.listdir(out)) == sorted(before)
    monkeypatch.undo()
    assert convert(argv) == 0 and fp.load(out).ctx.shape[0] == 4  # a real overwrite replaces it
    assert json.loads((out / "config.json").read_text())["original"]["checkpoint"] == str(src)


# ------------------------------------------------------------------------------ order, leftovers
def test_the_data_is_named_before_the_run_in_out(old_run, tmp_path, capsys):
    """#29.4: an empty data folder and a run already in --out: the message is about the data."""
    out, before = old_run
    (tmp_path / "empty").mkdir()
    code, _, err = run([*COMMON, "--data-root", str(tmp_path / "empty"), "--out", str(out)], capsys)
    one_line_error(code, err, "no class folders in")
    assert _files(out) == before


@pytest.mark.parametrize("bad, needle", [
    (["--data-root", "{tmp}/typo"], "image folder not found"),
    (["--data-root", "{tmp}/flowers", "--opt", "csc=maybe"], "option 'csc'"),
    (["--data-root", "{tmp}/flowers", "--eval-datasets", "flowers"], "unknown dataset 'flowers'"),
    (["--data-root", "{tmp}/flowers", "--opt", "n_ctx=500", "--opt", "ctx_init="],
     "too long for the text encoder's context length of 77"),
])
def test_bad_input_never_creates_out(bad, needle, flowers, tmp_path, capsys):
    out = tmp_path / "runs" / "a" / "b"
    t0 = time.perf_counter()
    code, _, err = run([*COMMON, "--out", str(out)] + [a.format(tmp=tmp_path) for a in bad], capsys)
    one_line_error(code, err, needle)
    assert not (tmp_path / "runs").exists() and time.perf_counter() - t0 < 30


def test_a_run_that_dies_before_its_first_epoch_leaves_no_folder(flowers, tmp_path, monkeypatch,
                                                                  capsys):
    import fastprompt.training as training

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "train", interrupted)
    out = tmp_path / "runs" / "r"
    code, _, err = run([*COMMON, "--data-root", str(flowers), "--out", str(out)], capsys)
    assert code == 130 and not (tmp_path / "runs").exists(), err
    (tmp_path / "mine").mkdir()  # a folder the user made is kept, emptied of the run's files
    code, _, err = run([*COMMON, "--data-root", str(flowers), "--out", str(tmp_path / "mine")], capsys)
    assert code == 130 and os.listdir(tmp_path / "mine") == []


# ------------------------------------------------------------------------------ paths, settings
def test_data_root_is_stored_absolute_and_eval_only_runs_elsewhere(flowers, tmp_path, monkeypatch,
                                                                    capsys):
    """#29.3: a relative --data-root is stored (and shown) absolute."""
    monkeypatch.chdir(tmp_path)
    code, stdout, err = run([*COMMON, "--data-root", "flowers", "--epochs", "0", "--out", "r"], capsys)
    assert code == 0, err
    root = json.loads((tmp_path / "r" / "config.json").read_text())["run"]["data_root"]
    assert root == str(flowers) and f"folder ({flowers})" in stdout
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, again, err = run(["--eval-only", "--run", str(tmp_path / "r"), "--no-progress"], capsys)
    assert code == 0, err
    assert again.splitlines()[-1] == stdout.splitlines()[-1]  # the same accuracy line


def test_zero_shot_needs_no_training_shots(tmp_path, capsys):
    """3 images per class split into 2 training images: zero-shot trains nothing, so the default
    16 shots are no reason to refuse it (a method that trains still needs them)."""
    data = folder_dataset(tmp_path / "flowers", per_class=3)
    code, _, err = run(["--method", "zeroshot", "--dataset", "folder", "--data-root", str(data),
                        "--subsample", "all", "--no-progress", "--out", str(tmp_path / "z")], capsys)
    assert code == 0, err
    code, _, err = run(["--method", "coop", "--dataset", "folder", "--data-root", str(data),
                        "--subsample", "all", "--no-progress", "--out", str(tmp_path / "c")], capsys)
    one_line_error(code, err, "16 shots need 16")


def test_workers_are_capped_at_the_cpus_and_said_so(flowers, tmp_path, capsys):
    cpus = len(os.sched_getaffinity(0))
    code, _, err = run(["--method", "zeroshot", "--dataset", "folder", "--data-root", str(flowers),
                        "--subsample", "all", "--no-progress", "--workers", "100000", "--out",
                        str(tmp_path / "w")], capsys)
    assert code == 0, err
    assert f"warning: --workers 100000 is more than the {cpus} CPUs" in err
    from fastprompt.runtime import runtime_env
    assert runtime_env(fp.TrainConfig(workers=100000, device="cpu")).workers == cpus


def test_a_cuda_index_beyond_the_devices_is_refused(monkeypatch):
    """cuda:N is the N-th device (it ran on LOCAL_RANK's before) and must exist."""
    import torch

    from fastprompt.errors import InputError
    from fastprompt.runtime import init_distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(InputError, match="--device cuda:2: torch sees 2 CUDA device\\(s\\)"):
        init_distributed("cuda:2")
    assert init_distributed("cuda:1").device == torch.device("cuda:1")


@pytest.mark.parametrize("device, needle", [("nonsense", "--device (device=) must be cpu, cuda or cuda:N"),
                                            ("meta", "--device (device=) must be cpu, cuda or cuda:N"),
                                            ("cuda:99", "cuda:99")])
def test_devices_that_do_not_exist_are_refused(device, needle, tmp_path, capsys):
    """They ran on the CPU before, silently."""
    code, _, err = run(["--method", "zeroshot", "--no-progress", "--device", device, "--out",
                        str(tmp_path / "d")], capsys)
    one_line_error(code, err, needle)
    assert not (tmp_path / "d").exists()
