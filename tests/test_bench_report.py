"""`python -m bench.report`: speed-ups on the wall clock and, when recorded, on device time."""
from bench import report


def _bench(variant: str, median_s: float, gpu_ms=None, gpu_gbps=None, timing="cuda graph, cold L2",
           group="kernel-x", params=None) -> dict:
    info = {"variant": variant, "device": "NVIDIA H100 80GB HBM3", "gbps": 1.0}
    if gpu_ms is not None:
        info.update(gpu_ms=gpu_ms, gpu_gbps=gpu_gbps, gpu_timing=timing)
    return {"group": group, "name": variant, "params": params or {"variant": variant, "case": "vision"},
            "stats": {"median": median_s}, "extra_info": info}


def test_table_reports_device_time_speed_up_against_the_baseline_of_the_same_case():
    data = {"benchmarks": [_bench("baseline", 0.5e-3, gpu_ms=0.06, gpu_gbps=1000.0),
                           _bench("fastprompt", 0.4e-3, gpu_ms=0.03, gpu_gbps=2000.0)]}
    lines = report.table(data).splitlines()
    assert all(column in lines[0] for column in ("GPU ms", "GPU x", "GPU GB/s"))
    fast = next(line for line in lines if " fastprompt " in line)
    assert "1.25x" in fast          # wall clock: 0.5 / 0.4
    assert fast.split()[-3:] == ["0.0300", "2.00x", "2000"]   # device: 0.06 / 0.03
    assert not any(line.startswith("*") for line in lines)


def test_device_time_without_a_graph_is_marked():
    data = {"benchmarks": [_bench("baseline", 0.5e-3, gpu_ms=0.06, gpu_gbps=1000.0),
                           _bench("fastprompt", 0.4e-3, gpu_ms=0.03, gpu_gbps=2000.0,
                                  timing="events, no graph (RuntimeError: x), cold L2")]}
    lines = report.table(data).splitlines()
    assert next(line for line in lines if " fastprompt " in line).split()[-3] == "0.0300*"
    assert lines[-1].startswith("* device time without a CUDA graph")


def test_block_size_sweep_is_compared_with_its_default():
    rows = [_bench(f"fwd[{c}]", t, group="tune-adapter", params={"config": c, "grads": False})
            for c, t in (("default", 1e-3), ("T32", 0.5e-3))]
    line = next(line for line in report.table({"benchmarks": rows}).splitlines() if "fwd[T32]" in line)
    assert "2.00x" in line


def test_table_without_device_time_has_no_gpu_columns():
    data = {"benchmarks": [_bench("baseline", 2e-3), _bench("fastprompt", 1e-3)]}
    text = report.table(data)
    assert "GPU" not in text and "2.00x" in text
