"""Guarding a run directory: never overwrite a run unasked, never let two processes write one,
never lose the old run to a new one that did not finish.

* `open_run_dir(out, resume, overwrite)`: refuses a directory that already holds a run (a
  `config.json` or `checkpoint.safetensors`) unless `resume` (continue it) or `overwrite`; refuses
  a file in place of the directory; holds `RunLock` on it until the `with` block ends, and yields
  the directory the run writes to:
  - `out` itself, for a new run or a resumed one. If the block fails before the run saved a
    checkpoint or a model (bad input found late, Ctrl-C in the first epoch), the files it wrote
    and the folders it created are removed: a failed run leaves no empty or half-made folder.
  - with `overwrite` over an existing run: `out/.fastprompt-new`, beside the old run, which stays
    whole until the block ends well; then the new run's files replace the old run's
    (`_swap_in`: Ctrl-C and SIGTERM deferred for those few renames; interrupted by a crash, it is
    finished by the next `open_run_dir` on `out`). If the block fails, the new files are dropped
    and the old run is left as it was. Files in `out` that are not run files are never touched.
* `RunLock`: an exclusive `fcntl.flock` on `<out>/.fastprompt.lock`, which records the owner's pid,
  host and start time. The kernel drops the lock when its process dies, so the lock of a crashed
  or killed run is stale by construction and taken over at once; a live owner makes the second
  process fail with one line naming it. The lock file is created without following a symbolic
  link, and an existing one is used only if it is a regular file of this user with one link,
  holding a lock record or nothing: a link planted there never makes fastprompt write over the
  file it points to. On file systems without flock (some network mounts) the run goes on
  unlocked, with a warning.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import stat
import threading
import time
import warnings
from pathlib import Path

from .errors import RunDirError, setting

LOCK = ".fastprompt.lock"
#: where `--overwrite` builds the new run beside the old one; renamed to COMMIT once complete
STAGE, COMMIT = ".fastprompt-new", ".fastprompt-commit"
#: in COMMIT: the names of the new run's files (what the swap moves in, the rest of RUN_FILES goes)
MANIFEST = ".files.json"
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
            fd = _open_lock(self.path)
            if fd is None:  # removed by its previous owner as we opened it
                continue
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
                same = os.fstat(fd).st_ino == os.lstat(self.path).st_ino
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


def _open_lock(path: Path) -> int | None:
    """A descriptor of the lock file: created here (O_EXCL, so never through a link), or the one
    an earlier run left, if it is a regular file of this user with one name holding a lock record
    (or nothing). None if the file vanished as it was opened (its owner released it: retry)."""
    flags = (os.O_RDWR | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
             | getattr(os, "O_NONBLOCK", 0))  # O_NONBLOCK: a FIFO planted there cannot block us
    try:
        return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        pass
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as err:
        if err.errno != errno.ELOOP and not path.is_symlink():
            raise
        raise RunDirError(f"{path} is a symbolic link, not a fastprompt lock file: remove it "
                          f"(fastprompt never writes through it) or choose another --out") from None
    try:
        info = os.fstat(fd)
        if info.st_nlink == 0:
            os.close(fd)
            return None
        problem = ("not a regular file" if not stat.S_ISREG(info.st_mode) else
                   "another user's file" if hasattr(os, "geteuid") and info.st_uid != os.geteuid()
                   else f"a file with {info.st_nlink} names (hard links)" if info.st_nlink > 1
                   else None if _lock_record(os.pread(fd, 4096, 0)) else "not a lock record")
    except BaseException:
        os.close(fd)
        raise
    if problem:
        os.close(fd)
        raise RunDirError(f"{path} is {problem}, not a lock file fastprompt made: remove it "
                          f"(fastprompt writes nothing into it) or choose another --out")
    return fd


def _lock_record(data: bytes) -> bool:
    try:
        return not data or "pid" in json.loads(data)
    except (ValueError, TypeError):
        return False


def _refuse_unasked(out: Path, resume: bool, overwrite: bool) -> None:
    if holds_run(out) and not (resume or overwrite):
        raise RunDirError(f"{out} already holds a run: pass {setting('--resume')} to continue it, "
                          f"{setting('--overwrite')} to replace it, or another {setting('--out')}")


def _make_dirs(out: Path) -> list[Path]:
    """mkdir -p `out`; the folders it created, deepest first (removed again if the run fails)."""
    missing, p = [], out.absolute()
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    out.mkdir(parents=True, exist_ok=True)
    return missing


@contextlib.contextmanager
def open_run_dir(out, resume: bool = False, overwrite: bool = False, main: bool = True):
    """Check `out` for a training run, hold its lock (main process only) for the block and yield
    the directory the run writes to (see the module docstring)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a directory: choose another --out")
    _refuse_unasked(out, resume, overwrite)
    if not main:
        yield out
        return
    made = _make_dirs(out)
    try:
        with RunLock(out):
            _finish_commit(out)  # an --overwrite that a crash interrupted in its swap
            _refuse_unasked(out, resume, overwrite)
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(out / STAGE)  # the new run of a killed --overwrite
            if overwrite and any(os.path.lexists(out / name) for name in RUN_FILES):
                (out / STAGE).mkdir()
                try:
                    yield out / STAGE
                except BaseException:
                    shutil.rmtree(out / STAGE, ignore_errors=True)
                    raise
                _swap_in(out / STAGE, out)
            else:
                before = {name for name in RUN_FILES if os.path.lexists(out / name)}
                try:
                    yield out
                except BaseException:
                    if not resume:
                        _drop_unfinished(out, before)
                    raise
    except BaseException:
        for folder in made:  # only those created here, and only if nothing is left in them
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _drop_unfinished(out: Path, before: set) -> None:
    """After a failed new run: unless it saved a checkpoint or a model (then --resume or
    --eval-only can use it), remove the run files it wrote."""
    if any(name not in before and (out / name).is_file() for name in MARKERS):
        return
    for name in RUN_FILES:
        if name not in before:
            with contextlib.suppress(FileNotFoundError):
                (out / name).unlink()


def _swap_in(stage: Path, out: Path) -> None:
    """The finished new run in `stage` replaces the old run in `out`."""
    from .files import write_json

    names = sorted(p.name for p in stage.iterdir() if p.name in RUN_FILES)
    write_json(stage / MANIFEST, names)
    with _signals_deferred():
        os.replace(stage, out / COMMIT)  # from here on the new run is the one kept
        _finish_commit(out)


def _finish_commit(out: Path) -> None:
    """Move the files of `out/COMMIT` over the run in `out`: the old run's files that the new run
    lacks are removed, its markers before any new file lands (an old config.json never sits
    beside new tensors), the new markers moved last. Safe to repeat after a crash."""
    from .files import move_into_place

    commit = out / COMMIT
    if not commit.is_dir():
        return
    try:
        names = json.loads((commit / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise RunDirError(f"{commit} holds an unfinished replacement of the run in {out} without "
                          f"its list of files: remove {commit} (the run in {out} is the old one, "
                          f"or incomplete)") from None
    with _signals_deferred():
        for name in RUN_FILES:
            if name not in names or (name in MARKERS and (commit / name).exists()):
                with contextlib.suppress(FileNotFoundError):
                    (out / name).unlink()
        for name in sorted(names, key=lambda n: (n in MARKERS, n == "config.json")):
            if (commit / name).exists():
                move_into_place(commit / name, out / name)
        shutil.rmtree(commit)


@contextlib.contextmanager
def _signals_deferred():
    """Ctrl-C and SIGTERM wait until the block is done (main thread, POSIX), then act."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


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
