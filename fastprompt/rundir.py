"""Guarding a run directory: never overwrite a run unasked, never let two processes write one.

* `open_run_dir(out, resume, overwrite)`: refuses a directory that already holds a run (a
  `config.json` or `checkpoint.safetensors`) unless `resume` (continue it) or `overwrite` (its run
  files are deleted first, nothing else in the directory); refuses a file in place of the
  directory; and holds `RunLock` on it until the `with` block ends.
* `RunLock`: an exclusive `fcntl.flock` on `<out>/.fastprompt.lock`, which records the owner's pid,
  host and start time. The kernel drops the lock when its process dies, so the lock of a crashed
  or killed run is stale by construction and taken over at once; a live owner makes the second
  process fail with one line naming it. On file systems without flock (some network mounts) the
  run goes on unlocked, with a warning.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
import warnings
from pathlib import Path

from .errors import RunDirError

LOCK = ".fastprompt.lock"
#: the files a training run writes (deleted by --overwrite)
RUN_FILES = ("config.json", "adapter.safetensors", "checkpoint.safetensors", "log.jsonl",
             "metrics.json", "split.json", "curves.png")
MARKERS = ("config.json", "checkpoint.safetensors")


def holds_run(out: Path) -> bool:
    return any((out / name).is_file() for name in MARKERS)


class RunLock:
    """Exclusive lock on a run directory (see the module docstring)."""

    def __init__(self, directory):
        self.path = Path(directory) / LOCK
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # not POSIX (Windows): run unlocked, and say so
            warnings.warn(f"no file locking on this system: nothing stops another run from "
                          f"writing to {self.path.parent}", RuntimeWarning, stacklevel=2)
            return self

        for _ in range(10):  # retried only if the lock file is replaced while we wait for it
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_owner(fd)
                os.close(fd)
                raise RunDirError(f"{self.path.parent} is in use by another run ({owner}): wait for "
                                  f"it to finish, stop it, or choose another --out") from None
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    warnings.warn(f"cannot lock {self.path} ({err.strerror}): nothing stops another "
                                  f"run from writing to {self.path.parent}", RuntimeWarning,
                                  stacklevel=2)
                    return self
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous owner removed the file as we opened it: retry
                os.close(fd)
                continue
            info = {"pid": os.getpid(), "host": socket.gethostname(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
            self.fd = fd
            return self
        raise RunDirError(f"could not lock {self.path}: the lock file keeps changing")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still locked: a waiter re-checks the inode
        except OSError:
            pass
        os.close(self.fd)  # drops the flock
        self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_owner(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "owner unknown"


@contextlib.contextmanager
def open_run_dir(out, resume: bool = False, overwrite: bool = False, main: bool = True):
    """Check `out` for a training run and hold its lock (main process only) for the block."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a directory: choose another --out")
    if holds_run(out) and not (resume or overwrite):
        raise RunDirError(f"{out} already holds a run: pass --resume to continue it, --overwrite "
                          f"to replace it, or another --out")
    if not main:
        yield None
        return
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out) as lock:
        if overwrite:
            for name in RUN_FILES:
                with contextlib.suppress(FileNotFoundError):
                    (out / name).unlink()
        yield lock


def check_resume(out: Path, want: dict) -> None:
    """A resumed run must continue with the settings it was started with: each key of `want`
    (method, dataset, seed, shots, subsample, backbone model) is compared with the run's
    config.json (runs without one have nothing to resume; `load_checkpoint` says so)."""
    from .checkpoint import CONFIG, read_config

    if not (out / CONFIG).is_file():
        return
    config = read_config(out)
    run = config.get("run", {})
    have = {"method": config.get("method"), "model": config["backbone"].get("model"),
            "dataset": run.get("dataset"), "seed": run.get("seed"),
            "subsample": run.get("subsample"),
            "shots": (run.get("recipe") or {}).get("shots")}
    for key, value in want.items():
        if have.get(key) is not None and have[key] != value:
            flag = {"model": "--model", "method": "--method"}.get(key, f"--{key}")
            raise RunDirError(f"{out} was started with {key} {have[key]!r}, not {value!r}: resume "
                              f"with {flag} {have[key]}, or start a new run in another --out")
