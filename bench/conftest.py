"""Shared helpers for the pytest-benchmark suites (`pytest bench --benchmark-only`).

Device and dtype: CUDA + bf16 when a GPU is present, else CPU + fp32 with small shapes (the CPU
numbers are a smoke run, not a measurement). The `bench` fixture bundles the helpers (fixtures, not
imports, so no module named `conftest` has to be importable): `bench.run(fn, ...)` warms up, times
a callable (with a CUDA synchronize inside the timed region) and fills `benchmark.extra_info` with
the variant, device, dtype, shapes, library versions, the bytes the op must move and the achieved
GB/s; `bench.skip_unless(variant)`; `bench.compiled(fn)`; `bench.env`.

Two clocks on CUDA. pytest-benchmark's own statistics are host wall time per call, synchronize
included: what an eager caller waits, launch latency and autograd bookkeeping counted. Kernels of
~0.1 ms are dominated by that overhead, so `bench.run(..., device_time=True)` also records the device
time (`gpu_ms`, `gpu_gbps`, `gpu_timing`; see :func:`gpu_time`): what the GPU spends on the work,
the figure the kernel targets are about and what a CUDA-graphed step pays.
"""
from __future__ import annotations

import importlib.metadata
import os
import statistics
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
    """torch.compile(fn, dynamic=False); a failure to build (first call) skips the test instead of
    failing the suite. Static shapes: dynamo keeps one shape history per function across wrappers,
    so without it every case after the first of a shared reference would get dynamic-shape kernels."""
    cfn = torch.compile(fn, dynamic=False)
    built = False

    def call(*args, **kwargs):
        nonlocal built
        if built:   # later failures (e.g. inside a CUDA-graph capture) propagate as they are
            return cfn(*args, **kwargs)
        try:
            out = cfn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - report any compiler failure as a skip
            pytest.skip(f"torch.compile failed: {type(exc).__name__}: {exc}"[:300])
        built = True
        return out
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


#: zeroed before each timed replay: larger than the L2 cache of any current GPU (H100/H200: 50 MB)
FLUSH_BYTES = 256 << 20


def capture_graph(fn) -> "torch.cuda.CUDAGraph":
    """``fn()`` captured in a CUDA graph, after warm-up calls on the capture stream itself
    (PyTorch's recipe: lazy initialisation — per-stream library handles and workspaces, autotuning
    — must not happen during capture). Backward passes inside ``fn`` are captured too (autograd
    runs them on the forward's stream)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        fn()
    return graph


#: why CUDA-graph capture is off for the rest of the session (after one failed: on torch < 2.12 a
#: failed capture leaves the allocator unable to start another), or None
_capture_broken: str | None = None


def gpu_time(fn, rounds: int = 50) -> tuple[float, str]:
    """(median device ms of one ``fn()``, how it was timed).

    ``fn`` is captured once in a CUDA graph and replayed, so no host time (Python, launches,
    autograd) is counted. Before each replay a 256 MiB buffer is zeroed, so L2 is cold and every
    input comes from HBM (as for an activation written many kernels earlier); CUDA events bracket
    the replay alone. If capture fails, ``fn()`` itself is bracketed ("events, no graph"): host
    overhead then hides behind the flush only while it is shorter than the flush (~0.1 ms).
    """
    global _capture_broken
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    run, how = fn, f"events, no graph (capture off since: {_capture_broken}), cold L2"
    if _capture_broken is None:
        stream = torch.cuda.current_stream()
        try:
            run, how = capture_graph(fn).replay, "cuda graph, cold L2"
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to plain events
            torch.cuda.set_stream(stream)   # a failed capture_end leaves the capture stream current
            torch.cuda.synchronize()
            _capture_broken = f"{type(exc).__name__}: {exc}"[:200]
            how = f"events, no graph ({_capture_broken}), cold L2"
    marks = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
             for _ in range(rounds)]
    for begin, end in marks:
        flush.zero_()
        begin.record()
        run()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(begin.elapsed_time(end) for begin, end in marks), how


def run_bench(benchmark, fn, *, variant: str, env: BenchEnv, shapes: dict, bytes_moved: int,
              warmup: int = 3, device_time: bool = False):
    """Time ``fn()`` (synchronised on CUDA) and record extra_info incl. ``gbps`` = bytes / median.
    With ``device_time`` on CUDA, also the device time of :func:`gpu_time` (``gpu_ms``, ``gpu_gbps``)."""
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
    if device_time and env.cuda and benchmark.enabled:
        record_gpu_time(benchmark, fn, bytes_moved)
    return result


def record_gpu_time(benchmark, fn, bytes_moved: int) -> None:
    """Device time into extra_info; a failure is recorded, not raised (the wall time still stands)."""
    try:
        ms, how = gpu_time(fn)
    except Exception as exc:  # noqa: BLE001 - keep the wall-clock result of this benchmark
        benchmark.extra_info["gpu_timing"] = f"failed: {type(exc).__name__}: {exc}"[:300]
        return
    benchmark.extra_info.update(gpu_ms=round(ms, 5), gpu_timing=how,
                                gpu_gbps=round(bytes_moved / ms / 1e6, 1) if bytes_moved and ms > 0 else None)


@pytest.fixture
def bench(benchmark, env):
    return SimpleNamespace(env=env, run=partial(run_bench, benchmark, env=env),
                           skip_unless=partial(skip_unless_variant_runs, env=env), compiled=compiled)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Keep each benchmark's summary statistics, drop its raw per-round times (up to ~10^5 a
    benchmark: megabytes per file, too large to bring back from a GPU run or to commit)."""
    for b in output_json.get("benchmarks", []):
        b.get("stats", {}).pop("data", None)


def _report_module():
    """bench/report.py, loaded by path (`bench` need not be importable from pytest's sys.path)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("fastprompt_bench_report",
                                                  Path(__file__).with_name("report.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """End the run with `python -m bench.report`'s speed-up summary (after pytest-benchmark's own
    tables, which list every statistic of every benchmark); nothing when benchmarks were disabled
    or none ran."""
    session = getattr(config, "_benchmarksession", None)
    if session is None or getattr(session, "disabled", False):
        return
    data = {"benchmarks": [b.as_dict(include_data=False) for b in session.benchmarks
                           if not b.has_error]}
    text = _report_module().speedups(data)
    if text:
        terminalreporter.write_sep("=", "fastprompt speed-ups (python -m bench.report FILE.json "
                                        "prints them from a --benchmark-json file)")
        terminalreporter.write_line(text)
