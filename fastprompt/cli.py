"""What every command shares (train, predict, export, convert, table, pretrain): the argument
parser (`Parser`: defaults shown, one-line errors) and the error handler (`run_cli`).

`run_cli(body)` returns `body()`'s exit status and turns the expected failures into one line on
stderr, never a traceback:

* a `FastpromptError` (bad flag, data, checkpoint, backbone, NaN loss, failed export check ...):
  its own message; status 2 (1 for a failed export check);
* an `OSError` (unwritable or read-only path, a file where a directory is needed, full disk,
  symlink loop ...): the reason, the path and what to do; status 2;
* an optional package that is missing: the extra to install; status 2;
* GPU out of memory: status 3; Ctrl-C: status 130;
* stdout closed by the reader (`... | head -1`): quiet, status 141 (128 + SIGPIPE), as other
  Unix tools.

Warnings, the library's (`warnings.warn`, with their classes for Python users) and the command's
own, print as one line each, `warning: MESSAGE` (`warning`), never Python's `FILE:LINE: Category:`
and source line; a warning identical to one printed before in the same command is left out.

Anything else is a bug and keeps its traceback. `ValueError` is *not* caught broadly: library code
raises the project's own errors for bad input.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys
import warnings
from typing import Callable

from .errors import EXTRAS, FastpromptError, first_line, missing_dependency

_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free some space or write elsewhere (files written before are "
                  "intact)",
    errno.EDQUOT: "the disk quota is exceeded: free some space or write elsewhere",
    errno.EACCES: "check its permissions or choose another path",
    errno.EPERM: "check its permissions or choose another path",
    errno.EROFS: "the file system is read-only: choose another path",
    errno.ELOOP: "a symbolic link points back to itself: fix or remove the link",
    errno.ENOTDIR: "a part of this path is a file, not a directory: choose another path",
    errno.EISDIR: "this is a directory: give a file name",
    errno.EEXIST: "a file is in the way: remove it or choose another path",
    errno.ENOENT: "check the path",
    errno.ENAMETOOLONG: "use a shorter path",
    errno.EIO: "an I/O error from the device: check the disk",
}


def describe_os_error(err: OSError) -> str:
    """One line: what failed, on which path, and what to do."""
    reason = err.strerror or first_line(err)
    path = err.filename if err.filename is not None else None
    where = f": {path}" if path is not None else ""
    if err.filename2 is not None:
        where += f" -> {err.filename2}"
    hint = _OS_HINTS.get(err.errno)
    return f"{reason}{where}" + (f" ({hint})" if hint else "")


def _silence_stdout() -> None:
    """After the reader closed stdout: point it at /dev/null so the exit flush stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


class Parser(argparse.ArgumentParser):
    """argparse with the project's help layout (defaults shown, listed lines kept:
    `fastprompt.catalog.HelpFormatter`) and a bad flag as one line, exit status 2, no usage block."""

    def __init__(self, prog: str, description: str | None = None, **kwargs):
        from .catalog import HelpFormatter  # torch-free: --help answers at once

        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(prog=prog, description=description, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


#: the warning lines printed by the running command (`run_cli` empties it)
_WARNED: set[str] = set()


def warning(message) -> None:
    """`warning: MESSAGE` on stderr, the message's first line only, once per command."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    text = lines[0] if lines else "(no message)"
    if text in _WARNED:
        return
    _WARNED.add(text)
    print(f"warning: {text}", file=sys.stderr, flush=True)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """`warnings.showwarning` while a command runs: the message alone, as `warning` prints it."""
    warning(message)


def run_cli(body: Callable[[], int],
            interrupted: str = "interrupted") -> int:
    """`body()`'s exit status, with the expected failures as one line on stderr (see the module
    docstring). `interrupted` is the line printed on Ctrl-C. Warnings print through `warning`."""
    _WARNED.clear()
    with warnings.catch_warnings():  # restores Python's display when the command is done
        warnings.showwarning = _show_warning
        return _handle(body, interrupted)


def _handle(body: Callable[[], int], interrupted: str) -> int:
    try:
        code = body()
        sys.stdout.flush()  # a closed pipe shows here, inside the handler
        return code
    except BrokenPipeError:
        _silence_stdout()
        return 141
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    except FastpromptError as err:
        print(f"{err.prefix}: {first_line(err)}", file=sys.stderr)
        return err.exit_code
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in EXTRAS:
            raise
        error(first_line(missing_dependency(err.name)))
        return 2
    except OSError as err:
        error(describe_os_error(err))
        return 2
    except MemoryError:
        error("out of memory: lower --batch-size or use a smaller input")
        return 3
    except Exception as err:  # noqa: BLE001 - re-raised unless it is one of the kinds below
        import torch

        if isinstance(err, torch.OutOfMemoryError):
            error("GPU out of memory: lower --batch-size (or use --precision bf16); finished "
                  "epochs are saved, --resume continues")
            return 3
        raise
