"""The project's error types: one base class, one subclass per kind of failure.

Every failure a user can cause or fix (bad flag, bad file, bad data, missing package) is a
`FastpromptError` whose message is one line naming the problem and the fix; the shared CLI handler
(`fastprompt.cli.run_cli`) prints that line and exits with status 2 (1 for a failed export check).
Anything else is a bug and keeps its traceback.

The classes are also importable where they used to live (`fastprompt.checkpoint.CheckpointError`,
`fastprompt.data.DataError`, `fastprompt.training.TrainingError`, ...). Those that replaced a
`ValueError` / `RuntimeError` still subclass it, so existing `except ValueError` code keeps working.
"""
from __future__ import annotations


class FastpromptError(Exception):
    """Base of every expected failure (one-line message naming the problem and the fix)."""

    exit_code = 2
    prefix = "error"   # what the CLI handler prints before the message


class InputError(FastpromptError, ValueError):
    """A bad command-line value, option, or config-file entry."""


class ConfigError(InputError):
    """A recipe/config file (YAML or JSON) that cannot be used."""


class DataError(FastpromptError):
    """Bad or missing data (dataset layout, split files, images)."""


class CheckpointError(FastpromptError, ValueError):
    """A run directory or checkpoint file that cannot be loaded or written."""


class BackboneError(FastpromptError, ValueError):
    """A backbone that cannot be loaded or is not supported."""


class TrainingError(FastpromptError, RuntimeError):
    """Training cannot go on (NaN loss, too little data, ...)."""


class RunDirError(FastpromptError):
    """A run directory that is in use by another process or already holds a run."""


class ExportError(FastpromptError, ValueError):
    """Bad input for an export or a runner (missing run, unsupported method, bad metadata)."""


class RunnerError(FastpromptError, RuntimeError):
    """A model that failed while running, or computed NaN/inf (exit status 1); importable from
    `fastprompt.export.runners` as well."""

    exit_code = 1


class ExportCheckError(FastpromptError, RuntimeError):
    """An exported file that does not reproduce the torch classifier (exit status 1)."""

    exit_code = 1
    prefix = "check failed"


class MissingDependency(FastpromptError, ImportError):
    """An optional package is not installed; the message names the extra to install."""


#: optional top-level modules -> the extra of pyproject.toml that installs them
EXTRAS = {"onnx": "export", "onnxruntime": "export", "onnxscript": "export", "onnx_ir": "export",
          "tensorrt": "tensorrt", "triton": "dev", "pytest": "dev"}


def missing_dependency(name: str, what: str = "") -> MissingDependency:
    """The error for optional module `name` (e.g. "onnxruntime") missing; `what` says what needed it."""
    top = (name or "?").split(".")[0]
    extra = EXTRAS.get(top)
    fix = f"pip install 'fastprompt[{extra}]'" if extra else f"pip install {top}"
    return MissingDependency(f"{top} is not installed{f' ({what} needs it)' if what else ''}: {fix}")


def require(*modules: str, what: str = ""):
    """Import the optional `modules` (all of them, before any work starts) or raise
    MissingDependency naming the extra; returns the first module."""
    import importlib

    loaded = []
    for name in modules:
        try:
            loaded.append(importlib.import_module(name))
        except ModuleNotFoundError as err:
            if err.name and err.name.split(".")[0] != name.split(".")[0]:
                raise  # a dependency of the module itself is missing: not ours to explain
            raise missing_dependency(name, what) from None
    return loaded[0] if loaded else None


def setting(flag: str, value=None) -> str:
    """A setting named for both audiences of a library error, the command line and Python:
    `setting("--data-root", "DIR")` is "--data-root DIR (data_root=DIR)", `setting("--on-error",
    "skip")` "--on-error skip (on_error='skip')", `setting("--lr")` "--lr (lr=)". The Python name
    is the flag's, as `TrainConfig`'s fields are; an upper-case value is a placeholder."""
    name = flag.lstrip("-").replace("-", "_")
    if value is None:
        return f"{flag} ({name}=)"
    py = repr(value) if isinstance(value, str) and not value.isupper() else value
    return f"{flag} {value} ({name}={py})"


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name if it has none). For
    an error re-raised from a DataLoader worker ("Caught X in DataLoader worker process N" plus
    the worker's traceback), the original error's own message."""
    text = str(err)
    if "Original Traceback (most recent call last)" in text:
        last = [line for line in text.strip().splitlines() if line.strip()][-1].strip()
        head, sep, rest = last.partition(": ")
        text = rest if sep and " " not in head else last
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0].strip() if lines else type(err).__name__


def short_repr(value, limit: int = 60) -> str:
    """A short description of `value` that never formats a huge or deeply nested object (a full
    `repr` of a pickle bomb's shared sub-lists takes minutes and gigabytes)."""
    if isinstance(value, (str, bytes)):
        return repr(value[:limit]) + ("..." if len(value) > limit else "")
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return repr(value) if value.bit_length() <= 128 else f"<int of {value.bit_length()} bits>"
    if isinstance(value, (list, tuple, dict, set, frozenset)):
        return f"<{type(value).__name__} of {len(value)} items>"
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is not None and dtype is not None:
        return f"<{type(value).__name__} {tuple(shape)} {dtype}>"
    return f"<{type(value).__name__}>"
