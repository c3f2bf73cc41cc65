"""Choose between the Triton kernels and the pure-torch references.

Rule (evaluated on every call, nothing is decided at import time):

1. ``with fastprompt.kernels.use("torch" | "triton" | "auto"):`` overrides everything inside the
   block (thread- and task-local, nests).
2. Otherwise the environment variable ``FASTPROMPT_KERNELS=torch|triton|auto`` (read at call time).
3. ``auto`` (the default): Triton when every tensor argument is on CUDA and ``triton`` imports,
   the reference otherwise (CPU, MPS, export tracing, ...).

Forcing ``triton`` with CPU tensors works only under the Triton interpreter
(``TRITON_INTERPRET=1`` set before the first kernel is used); otherwise a ``RuntimeError`` says so.

``launch_counts`` counts every Triton kernel launch by kernel name, so a test can check that the
Triton path really ran (``reset_launch_counts()`` clears it).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.util
import os
import sys
from collections import Counter
from typing import Iterator

import torch

BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "FASTPROMPT_KERNELS"

#: kernel name -> number of launches since the last ``reset_launch_counts()``.
launch_counts: Counter = Counter()

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastprompt_kernels", default=None)


@functools.lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    """Streaming multiprocessors of CUDA device `index` (2 for the CPU interpreter, index < 0)."""
    return torch.cuda.get_device_properties(index).multi_processor_count if index >= 0 else 2


def reset_launch_counts() -> None:
    launch_counts.clear()


def record_launch(name: str) -> None:
    """Called by the Triton wrappers right before each kernel launch."""
    launch_counts[name] += 1


def _check_backend(name: str, source: str) -> str:
    name = (name or "auto").strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


@contextlib.contextmanager
def use(backend: str) -> Iterator[None]:
    """Force a backend inside a ``with`` block: ``with use("torch"): ...``."""
    token = _override.set(_check_backend(backend, "fastprompt.kernels.use(backend)"))
    try:
        yield
    finally:
        _override.reset(token)


def requested_backend() -> str:
    """The backend asked for right now: the ``use()`` override, else $FASTPROMPT_KERNELS, else auto."""
    forced = _override.get()
    if forced is not None:
        return forced
    raw = os.environ.get(ENV_VAR)
    if raw is None or raw in BACKENDS:   # the common spellings skip the normalisation
        return raw or "auto"
    return _check_backend(raw, f"${ENV_VAR}")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def backend_for(*tensors: torch.Tensor | None) -> str:
    """Return ``"torch"`` or ``"triton"`` for a call on these tensors (``None`` entries ignored)."""
    wanted = requested_backend()
    if wanted == "torch":
        return "torch"
    present = [t for t in tensors if isinstance(t, torch.Tensor)]
    on_cuda = bool(present) and all(t.is_cuda for t in present)
    if wanted == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    # forced triton
    if not triton_available():
        raise RuntimeError(f"{ENV_VAR}=triton / use('triton') but the 'triton' package is not installed")
    if not on_cuda:
        if not interpret_mode():
            devices = ", ".join(sorted({str(t.device) for t in present})) or "no tensors"
            raise RuntimeError(
                f"Triton kernels were forced but the tensors are on {devices}; Triton needs CUDA "
                "tensors, or TRITON_INTERPRET=1 (set before triton is first imported) to run the "
                "kernels in the CPU interpreter")
        if not _interpreter_active():
            raise RuntimeError(
                "TRITON_INTERPRET=1 was set after triton.language had been imported, so triton is "
                "not in interpreter mode; set it before anything imports triton (e.g. in conftest.py)")
    return "triton"


def _interpreter_active() -> bool:
    """Whether triton.language (if already imported) was imported in interpreter mode."""
    tl = sys.modules.get("triton.language")
    return tl is None or type(tl.cdiv).__name__ == "InterpretedFunction"


_modules: dict = {}


def implementation(module: str):
    """Import ``fastprompt.kernels.<module>`` lazily (keeps triton out of plain imports); cached."""
    mod = _modules.get(module)
    if mod is None:
        mod = _modules[module] = importlib.import_module(f"{__package__}.{module}")
    return mod


def adapter_residual(h, y, w_down, b_down, w_shared, b_shared, w_up, b_up, scale, grad_scale=True):
    """Dispatching entry point; see :func:`fastprompt.kernels.reference.adapter_residual`."""
    tensors = (h, y, w_down, b_down, w_shared, b_shared, w_up, b_up)
    impl = implementation("adapter" if backend_for(*tensors) == "triton" else "reference")
    return impl.adapter_residual(h, y, w_down, b_down, w_shared, b_shared, w_up, b_up, scale, grad_scale)


def insert_prompts_layernorm(x, prompts, start, weight, bias, eps=1e-5):
    """Dispatching entry point; see :func:`fastprompt.kernels.reference.insert_prompts_layernorm`."""
    use_triton = backend_for(x, prompts, weight, bias) == "triton"
    impl = implementation("insert_layernorm" if use_triton else "reference")
    return impl.insert_prompts_layernorm(x, prompts, start, weight, bias, eps)
