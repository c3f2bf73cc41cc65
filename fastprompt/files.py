"""Atomic file writes: every file fastprompt writes goes through here.

A write goes to a temporary file in the target's directory, is flushed and fsync'd, then renamed
over the target with `os.replace` (atomic on POSIX and Windows), and the directory is fsync'd. A
crash, a full disk or Ctrl-C at any point leaves either the old file or the new one, never a mix,
and the temporary file is removed on every failure. The new file gets the permissions a plain
`open(path, "w")` would give it (the old file's mode when it replaces one), and, as with
`open(path, "w")`, a symbolic link is written through (its target is replaced, the link stays).

    write_text(path, text)            write_bytes(path, data)
    write_json(path, obj)             append_line(path, line)   # a log that never holds half a line
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))   # a library that writes by path
    move_into_place(tmp, path)        # a finished temporary file, kept under another name
"""
from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["append_line", "atomic_write", "move_into_place", "write_bytes", "write_json",
           "write_text"]


def _mode_for(path: Path) -> int:
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _fsync_path(path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # some filesystems (and Windows) cannot open a directory: best effort
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def atomic_write(path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` to fill a temporary file next to `path`, then move it over `path`.

    `write` receives the temporary file's path (it exists, empty) and writes the whole content
    there, by any means (safetensors, onnx.save, matplotlib). On any exception, KeyboardInterrupt
    included, the temporary file is removed and `path` is untouched; an OSError names `path`
    (a full disk's error from `write` names no file). A `path` that is a symbolic link is
    written through: its target gets the new content, the link stays.
    """
    asked = path = Path(path)
    if path.is_symlink():  # write through the link, as open(path, "w") does: the link stays
        path = Path(os.path.realpath(path))
    if path.is_dir():
        raise IsADirectoryError(21, "is a directory, not a file", str(asked))
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        move_into_place(tmp, path)
    except BaseException as err:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(err, OSError) and err.filename in (str(tmp), tmp, name, None):
            err.filename = str(asked)  # the file the user asked for, not our temporary one
        raise
    return path


def move_into_place(tmp, path) -> Path:
    """Rename the finished file `tmp` over `path` (same directory): it gets the permissions a
    plain `open(path, "w")` would give it, its bytes reach the disk before the rename and the
    rename reaches the disk after it. `atomic_write` ends with this; a caller that keeps a
    finished temporary file under another name (an export that failed its check) uses it too."""
    tmp, path = Path(tmp), Path(path)
    os.chmod(tmp, _mode_for(path))
    _fsync_path(tmp)
    os.replace(tmp, path)
    _fsync_path(path.parent or ".", directory=True)
    return path


def write_bytes(path, data: bytes) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
    return atomic_write(path, write)


def write_text(path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path, obj, indent: int | None = 2) -> Path:
    """JSON that any parser reads: NaN / inf are refused (ValueError) instead of written."""
    return write_text(path, json.dumps(obj, indent=indent, allow_nan=False) + "\n")


def append_line(path, line: str) -> Path:
    """Add one line to a small text file (a log) by rewriting it atomically: the file holds the
    old lines, or the old lines plus the whole new one, never half a line."""
    path = Path(path)
    if "\n" in line:
        raise ValueError("append_line writes one line: the text holds a newline")
    try:
        old = path.read_bytes()
    except FileNotFoundError:
        old = b""
    if old and not old.endswith(b"\n"):  # a torn last line of an older, non-atomic writer
        old = old[: old.rfind(b"\n") + 1]
    return write_bytes(path, old + line.encode("utf-8") + b"\n")
