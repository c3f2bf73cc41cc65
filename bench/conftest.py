"""Shared helpers for the pytest-benchmark suites (`pytest bench --benchmark-only`).

Device and dtype: CUDA + bf16 when a GPU is present, else CPU + fp32 with small shapes (the CPU
numbers are a smoke run, not a measurement). The `bench` fixture bundles the helpers (fixtures, not
imports, so no module named `conftest` has to be importable): `bench.run(fn, ...)` warms up, times
a callable (with a CUDA synchronize inside the timed region) and fills `benchmark.extra_info` with
the variant, device, dtype, shapes, library versions, the bytes the op must move and the achieved
GB/s; `bench.skip_unless(variant)`; `bench.compiled(fn)`; `bench.env`.
"""
from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from functools import lru_cache, partial
from types import SimpleNamespace

import pytest
import torch


@dataclass(frozen=True)
class BenchEnv:
    device: torch.device
    dtype: torch.dtype
    cuda: bool
    device_name: str


@lru_cache(maxsize=None)
def bench_env() -> BenchEnv:
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        return BenchEnv(dev, torch.bfloat16, True, torch.cuda.get_device_name(dev))
    import platform
    name = platform.processor() or platform.machine() or "cpu"
    return BenchEnv(torch.device("cpu"), torch.float32, False, name)


@pytest.fixture(scope="session")
def env() -> BenchEnv:
    return bench_env()


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def skip_unless_variant_runs(variant: str, env: BenchEnv) -> None:
    """`fastprompt` (Triton) needs CUDA; `compile` is skipped on CPU unless FASTPROMPT_BENCH_COMPILE=1."""
    if variant == "fastprompt" and not env.cuda:
        pytest.skip("Triton variant needs CUDA (the CPU interpreter is not a benchmark)")
    if variant == "compile" and not env.cuda and os.environ.get("FASTPROMPT_BENCH_COMPILE") != "1":
        pytest.skip("torch.compile on CPU is slow to build; set FASTPROMPT_BENCH_COMPILE=1 to run it")


def compiled(fn):
    """torch.compile(fn); a failure to build skips the test instead of failing the suite."""
    cfn = torch.compile(fn)

    def call(*args, **kwargs):
        try:
            return cfn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - report any compiler failure as a skip
            pytest.skip(f"torch.compile failed: {type(exc).__name__}: {exc}"[:300])
    return call


def fill_extra_info(benchmark, *, variant: str, env: BenchEnv, shapes: dict, bytes_moved: int) -> None:
    benchmark.extra_info.update(
        variant=variant,
        device=env.device_name,
        dtype=str(env.dtype).replace("torch.", ""),
        shapes={k: list(v) if isinstance(v, (tuple, list, torch.Size)) else v for k, v in shapes.items()},
        bytes=int(bytes_moved),
        torch=torch.__version__,
        triton=_version("triton"),
    )


def run_bench(benchmark, fn, *, variant: str, env: BenchEnv, shapes: dict, bytes_moved: int, warmup: int = 3):
    """Time ``fn()`` (synchronised on CUDA) and record extra_info incl. ``gbps`` = bytes / median."""
    fill_extra_info(benchmark, variant=variant, env=env, shapes=shapes, bytes_moved=bytes_moved)

    def timed():
        out = fn()
        if env.cuda:
            torch.cuda.synchronize()
        return out

    for _ in range(warmup if benchmark.enabled else 0):  # JIT / compile / autotune outside the timing
        timed()
    result = benchmark(timed)
    stats = getattr(benchmark, "stats", None)
    if stats and bytes_moved:
        median = stats.stats.median
        benchmark.extra_info["gbps"] = round(bytes_moved / median / 1e9, 2) if median > 0 else None
    return result


@pytest.fixture
def bench(benchmark, env):
    return SimpleNamespace(env=env, run=partial(run_bench, benchmark, env=env),
                           skip_unless=partial(skip_unless_variant_runs, env=env), compiled=compiled)
