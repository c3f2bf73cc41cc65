"""Nothing lost: atomic writes, the run-directory guard and lock, finite checkpoints."""
import errno
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from common import CLASSNAMES, tiny_clip

import fastprompt as fp
from fastprompt.checkpoint import CheckpointError
from fastprompt.errors import RunDirError, TrainingError
from fastprompt.files import append_line, atomic_write, write_json, write_text
from fastprompt.rundir import LOCK, RunLock, open_run_dir


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     KeyboardInterrupt()])
def test_a_failed_write_leaves_the_old_file(tmp_path, failure):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"good old model")

    def half_then_fail(tmp):
        tmp.write_bytes(b"half a new mo")
        raise failure

    with pytest.raises(type(failure)):
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"good old model" and _leftovers(tmp_path) == []


def test_new_files_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(umask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644


def test_json_is_strict_and_log_lines_whole(tmp_path):
    with pytest.raises(ValueError):
        write_json(tmp_path / "m.json", {"acc": float("nan")})
    assert not (tmp_path / "m.json").exists()
    log = tmp_path / "log.jsonl"
    log.write_bytes(b'{"epoch": 1}\n{"epo')  # a torn line from an older, non-atomic writer
    append_line(log, '{"epoch": 2}')
    assert [json.loads(x)["epoch"] for x in log.read_text().splitlines()] == [1, 2]


def test_a_run_is_never_overwritten_unasked(tmp_path):
    run = tmp_path / "run"
    fp.save(fp.create("zeroshot", tiny_clip(), CLASSNAMES), run)  # config.json, no checkpoint
    before = (run / "config.json").read_bytes()
    with pytest.raises(RunDirError, match=r"already holds a run: pass --resume \(resume=\)"):
        with open_run_dir(run):
            pass
    assert (run / "config.json").read_bytes() == before
    (run / "notes.txt").write_text("mine")
    with open_run_dir(run, overwrite=True) as work:  # the new run is built beside the old one
        assert (run / "config.json").read_bytes() == before and (run / LOCK).exists()
        assert work != run and not (work / "config.json").exists()
    assert not (run / "config.json").exists()  # ... and replaced it (this one wrote nothing)
    assert (run / "notes.txt").read_text() == "mine" and not (run / LOCK).exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="is a file"):
        with open_run_dir(tmp_path / "file"):
            pass


HOLD = """
import sys, time
from fastprompt.rundir import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_second_writer_is_refused_naming_the_owner_and_stale_locks_are_taken_over(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=f"in use by another run \\(pid {proc.pid} on "):
            RunLock(tmp_path).acquire()
    finally:
        proc.kill()
        proc.wait()
    assert (tmp_path / LOCK).exists()  # the dead owner left its lock file behind
    t0 = time.perf_counter()
    with RunLock(tmp_path) as lock:  # ... which is taken over at once
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid() and lock.fd
    assert time.perf_counter() - t0 < 1 and not (tmp_path / LOCK).exists()


def test_two_trainings_into_one_out(tmp_path, capsys):
    """The second `python -m fastprompt.train` into a locked --out exits with one line."""
    from fastprompt.train import main

    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        code = main(["--method", "zeroshot", "--out", str(tmp_path), "--no-progress"])
    finally:
        proc.kill()
        proc.wait()
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"pid {proc.pid}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK]


def test_non_finite_parameters_are_never_saved_or_loaded(tmp_path):
    from fastprompt.training import save_checkpoint

    model = fp.create("coop", tiny_clip(), CLASSNAMES)
    good = fp.save(model, tmp_path / "good")
    opt = torch.optim.SGD(list(model.trainable_state().values()), lr=0.1)
    with torch.no_grad():
        model.ctx[0, 0] = float("nan")
    with pytest.raises(TrainingError, match="'param/ctx' .*NaN/inf.*epoch 3 was not saved"):
        save_checkpoint(model, opt, tmp_path / "good", 3, {})
    assert not (tmp_path / "good" / "checkpoint.safetensors").exists()
    with pytest.raises(CheckpointError, match="NaN/inf"):
        fp.save(model, tmp_path / "bad")
    assert not (tmp_path / "bad" / "adapter.safetensors").exists()
    from safetensors.torch import save_file  # a file that holds NaN anyway is refused on load
    save_file({"ctx": model.ctx.detach().clone()}, str(good / "adapter.safetensors"))
    with pytest.raises(CheckpointError, match="'ctx' of .*adapter.safetensors holds NaN/inf"):
        fp.load(good, clip=tiny_clip())
