"""`python -m bench.report FILE.json`: the speed-ups of a pytest-benchmark JSON file, then every group.

The JSON comes from `pytest bench --benchmark-only --benchmark-json=FILE.json`; the same speed-up
summary ends that pytest run (`bench/conftest.py`).

Summary (`speedups`): the training step and inference of each method, baseline (every optimisation
off) vs fastprompt, and for inference also vs open_clip's own `encode_image` + one matmul; the
other groups as one line each (every variant's speed-up over the group's baseline).

Every group (`table`): each variant's median time, its speed-up over the group's `baseline` (baseline time
divided by the variant's), images/s where the benchmark records `images`, GB/s where it records
`gbps`, and for training steps the achieved TFLOP/s (counted FLOPs / median) and its share of
the device's dense bf16 peak. Benchmarks that recorded device time (`gpu_ms`, CUDA graph replay,
cold L2) get three more columns: GPU ms, the speed-up on that clock, and GPU GB/s.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict

#: dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets
PEAK_TFLOPS = {"H100 SXM": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0,
               "A100": 312.0}


def peak_for(device: str) -> float | None:
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key in device:
            return PEAK_TFLOPS[key]
    return None


def group_key(b: dict) -> str:
    """The benchmark's group plus every parameter but the variant (e.g. the shape case), so that
    each variant is compared with the baseline of the same workload."""
    params = {k: v for k, v in (b.get("params") or {}).items() if k not in ("variant", "method", "config")}
    suffix = "".join(f" {v}" for v in params.values())
    return (b.get("group") or b["name"]) + suffix


def rows_of(data: dict) -> dict[str, list[dict]]:
    groups = defaultdict(list)
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        groups[group_key(b)].append({
            "variant": info.get("variant", b["name"]), "median": b["stats"]["median"],
            "images": info.get("images"), "gbps": info.get("gbps"), "flops": info.get("flops"),
            "device": info.get("device", ""), "gpu_ms": info.get("gpu_ms"), "gpu_gbps": info.get("gpu_gbps"),
            "graph": str(info.get("gpu_timing", "")).startswith("cuda graph"), "peak_mib": info.get("peak_mib")})
    return groups


def is_baseline(variant: str) -> bool:
    """The row a group's speed-ups are relative to: `baseline`, `sequential` (packed training), or
    `default` in a block-size sweep."""
    return variant in ("baseline", "sequential") or variant.endswith("[default]")


def _gpu_columns(r: dict, base_ms: float | None) -> str:
    if not r["gpu_ms"]:
        return f"{'':>10} {'':>8} {'':>8}"
    speed = f"{base_ms / r['gpu_ms']:.2f}x" if base_ms else ""
    gbps = f"{r['gpu_gbps']:.0f}" if r["gpu_gbps"] else ""
    return f"{r['gpu_ms']:9.4f}{' ' if r['graph'] else '*'} {speed:>8} {gbps:>8}"


def table(data: dict) -> str:
    groups = rows_of(data)
    every = [r for rows in groups.values() for r in rows]
    gpu, peak = any(r["gpu_ms"] for r in every), any(r["peak_mib"] for r in every)
    gw = max([34, *map(len, groups)])
    vw = max([16, *(len(r["variant"]) for r in every)])
    lines = [f"{'group':{gw}} {'variant':{vw}} {'median ms':>10} {'speed-up':>9} {'img/s':>10} "
             f"{'GB/s':>8} {'TFLOP/s':>8} {'% peak':>7}"
             + (f" {'GPU ms':>10} {'GPU x':>8} {'GPU GB/s':>8}" if gpu else "")
             + (f" {'peak MiB':>9}" if peak else "")]
    for group, rows in sorted(groups.items()):
        base = next((r for r in rows if is_baseline(r["variant"])), None)
        for r in sorted(rows, key=lambda r: not is_baseline(r["variant"])):
            speed = f"{base['median'] / r['median']:.2f}x" if base else ""
            ips = f"{r['images'] / r['median']:.1f}" if r["images"] else ""
            gbps = f"{r['gbps']:.0f}" if r["gbps"] else ""
            tflops = r["flops"] / r["median"] / 1e12 if r["flops"] else None
            pk = peak_for(r["device"]) if tflops else None
            lines.append(f"{group:{gw}} {r['variant']:{vw}} {r['median'] * 1e3:10.3f} {speed:>9} "
                         f"{ips:>10} {gbps:>8} {'' if tflops is None else f'{tflops:.1f}':>8} "
                         f"{'' if not pk else f'{100 * tflops / pk:.1f}':>7}"
                         + (" " + _gpu_columns(r, base and base["gpu_ms"]) if gpu else "")
                         + (f" {r['peak_mib'] or '':>9}" if peak else ""))
    if gpu and not all(r["graph"] for r in every if r["gpu_ms"]):
        lines.append("* device time without a CUDA graph (capture failed): host overhead may be included")
    return "\n".join(lines)


def _ms(seconds) -> str:
    return f"{seconds * 1e3:.2f}" if seconds else "-"


def _x(numerator, denominator) -> str:
    return f"{numerator / denominator:.2f}x" if numerator and denominator else "-"


def speedups(data: dict) -> str:
    """The speed-up summary (module docstring) of a pytest-benchmark JSON dict; '' if it has no
    benchmark with statistics."""
    by_group: dict[str, dict[str, dict]] = defaultdict(dict)
    for b in data.get("benchmarks", []):
        median = (b.get("stats") or {}).get("median")
        if median:
            info = b.get("extra_info", {})
            by_group[b.get("group") or b["name"]][info.get("variant", b["name"])] = {**info, "median": median}
    if not by_group:
        return ""
    every = [r for rows in by_group.values() for r in rows.values()]
    lines = [f"speed-ups: median wall time per call on {every[0].get('device', '?')} "
             f"({every[0].get('dtype', '?')}); baseline = every optimisation off"]
    train = {g: v for g, v in by_group.items() if g.startswith("train-")}
    if train:
        lines += ["", "training step (forward, backward, SGD)",
                  f"{'method':<12} {'classes':>7} {'batch':>5} {'baseline ms':>11} "
                  f"{'fastprompt ms':>13} {'speed-up':>8} {'img/s':>8}"]
        for group, rows in sorted(train.items()):
            base, fast = rows.get("baseline", {}), rows.get("fastprompt", {})
            ref = fast or base
            ips = f"{fast['images'] / fast['median']:.0f}" if fast.get("images") else "-"
            lines.append(f"{ref.get('method', group[6:]):<12} {ref.get('classes', '?'):>7} "
                         f"{ref.get('images', '?'):>5} {_ms(base.get('median')):>11} "
                         f"{_ms(fast.get('median')):>13} {_x(base.get('median'), fast.get('median')):>8} "
                         f"{ips:>8}")
    infer = {g: v for g, v in by_group.items() if g.startswith("inference-")}
    if infer:
        lines += ["", "inference (model.classifier(): one image pass)",
                  f"{'method':<12} {'classes':>7} {'batch':>5} {'baseline ms':>11} "
                  f"{'fastprompt ms':>13} {'encode_image ms':>15} {'vs baseline':>11} "
                  f"{'vs encode_image':>15}"]
        order = sorted(infer.items(), key=lambda kv: (next(iter(kv[1].values())).get("method", ""),
                                                      next(iter(kv[1].values())).get("classes", 0)))
        for group, rows in order:
            base, fast, clip = (rows.get(k, {}) for k in ("baseline", "fastprompt", "clip-image-only"))
            ref = fast or base or clip
            lines.append(f"{ref.get('method', group):<12} {ref.get('classes', '?'):>7} "
                         f"{ref.get('images', '?'):>5} {_ms(base.get('median')):>11} "
                         f"{_ms(fast.get('median')):>13} {_ms(clip.get('median')):>15} "
                         f"{_x(base.get('median'), fast.get('median')):>11} "
                         f"{_x(clip.get('median'), fast.get('median')):>15}")
    packs = {g: v for g, v in by_group.items() if g.startswith("pack-")}
    if packs:
        lines += ["", "packed training: R runs of one method, one step each (sequential: one after "
                      "the other; packed: one backbone pass for all)",
                  f"{'method':<12} {'runs':>4} {'images':>6} {'sequential ms':>13} {'packed ms':>9} "
                  f"{'speed-up':>8} {'packed img/s':>12} {'peak MiB':>8}"]
        order = sorted(packs.items(), key=lambda kv: (next(iter(kv[1].values())).get("method", ""),
                                                      next(iter(kv[1].values())).get("runs", 0)))
        for group, rows in order:
            seq, pk = rows.get("sequential", {}), rows.get("packed", {})
            ref = pk or seq
            ips = f"{pk['images'] / pk['median']:.0f}" if pk.get("images") else "-"
            lines.append(f"{ref.get('method', group):<12} {ref.get('runs', '?'):>4} "
                         f"{ref.get('images', '?'):>6} {_ms(seq.get('median')):>13} "
                         f"{_ms(pk.get('median')):>9} {_x(seq.get('median'), pk.get('median')):>8} "
                         f"{ips:>12} {pk.get('peak_mib', '-'):>8}")
    rest = {g: v for g, v in by_group.items() if g not in train and g not in infer and g not in packs}
    if rest:
        lines += ["", "other groups: each variant's speed-up over the group's baseline"]
        for key, rows in sorted(rows_of({"benchmarks": [b for b in data["benchmarks"]
                                                        if (b.get("group") or b["name"]) in rest]}).items()):
            base = next((r for r in rows if is_baseline(r["variant"])), None)
            if base is None:  # a yardstick such as the copy kernel: nothing to compare with
                continue
            shown = [f"{r['variant']} {_x(base['median'], r['median'])}"
                     + (f" (GPU time {_x(base['gpu_ms'], r['gpu_ms'])})" if r["gpu_ms"] and base["gpu_ms"] else "")
                     for r in rows if not is_baseline(r["variant"])]
            lines.append(f"{key:<36} " + (", ".join(shown) or "(baseline only)"))
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m bench.report", description="Print the speed-ups of a pytest-benchmark "
        "JSON file, then every group. Get the file with: pytest bench --benchmark-only "
        "--benchmark-json=FILE.json")
    p.add_argument("file", metavar="FILE.json", help="written by pytest-benchmark's --benchmark-json")
    p.add_argument("--summary", action="store_true",
                   help="print only the speed-up summary, not every group")
    args = p.parse_args(argv)
    try:
        with open(args.file, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
            raise ValueError("no 'benchmarks' list")
    except (OSError, ValueError) as err:
        print(f"error: cannot read {args.file} as pytest-benchmark JSON ({err}); write one with "
              f"pytest bench --benchmark-only --benchmark-json={args.file}", file=sys.stderr)
        return 2
    machine = data.get("machine_info", {})
    print(f"# {machine.get('node', '')} {machine.get('cpu', {}).get('brand_raw', '')} "
          f"{data.get('datetime', '')}")
    print(speedups(data) or "no benchmark with timings in this file (run with --benchmark-only)")
    if not args.summary:
        print()
        print(table(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
