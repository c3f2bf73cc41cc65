"""Compile every Triton kernel launch of fastprompt.kernels for a Hopper GPU, without a GPU.

`python tests/compile_kernels_for_gpu.py [--arch 90]` (run by tests/test_kernels.py in a fresh
process: it must not run under TRITON_INTERPRET, which replaces the kernels by Python).

The CPU interpreter executes kernels as Python, so it accepts code the real compiler rejects
(dtype mismatches in ``tl.dot``, non-constexpr shapes, ...). This script drives the public Triton
entry points on small CPU tensors with the kernel launches intercepted: each launch is recorded
(kernel, argument values, meta-parameters), nothing runs. Block sizes are the GPU plan's (the
plans are asked for device 0 with 132 SMs, as on an H100). Each recorded launch is then compiled
ahead of time for ``cuda:sm_<arch>`` (Triton front end, LLVM, ptxas — all in the triton wheel),
and its registers / spills are printed when cuobjdump is there. Exit status 1 if any fails.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

LAUNCH_OPTIONS = ("num_warps", "num_stages")
TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class Recorder:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, **meta)`` is recorded, not run."""

    def __init__(self, name, jit_fn, launches):
        self.name, self.fn, self.launches = name, jit_fn, launches

    def __getitem__(self, grid):
        def record(*args, **meta):
            self.launches.append((self.name, self.fn, args, meta))
        return record


@contextmanager
def recorded_launches(modules):
    """Replace the kernels of `modules` by recorders; plans see a CUDA device with 132 SMs."""
    from fastprompt.kernels import dispatch

    launches, saved = [], []
    for mod in modules:
        for name in [n for n, v in vars(mod).items() if type(v).__name__ == "JITFunction"]:
            if name.startswith("_") and any(p.is_constexpr for p in getattr(mod, name).params):
                saved.append((mod, name, getattr(mod, name)))
                setattr(mod, name, Recorder(f"{mod.__name__.rsplit('.', 1)[-1]}.{name}", getattr(mod, name), launches))
    get_device, sm_count = torch.Tensor.get_device, dispatch.sm_count
    torch.Tensor.get_device = lambda self: 0
    dispatch.sm_count = lambda index: 132
    _forget_plans(modules)
    try:
        yield launches
    finally:
        torch.Tensor.get_device, dispatch.sm_count = get_device, sm_count
        for mod, name, fn in saved:
            setattr(mod, name, fn)
        _forget_plans(modules)   # no GPU plan cached for the CPU device index stays behind


def _forget_plans(modules) -> None:
    for mod in modules:
        if hasattr(mod, "_plan"):
            mod._plan.cache_clear()


def drive(adapter, insert):
    """Forward + backward of both kernels, fp32 and bf16, at ViT-B/16 widths: few tokens (the
    plans' small-T blocks), the adapter also at R = 64 and at 16896 tokens (4 programs of 32 tokens
    per SM: the large-T block of the plan, as for batch-100 inference)."""
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        cases = ((9, 768, 32),) if dtype == torch.float32 else ((9, 768, 32), (9, 512, 64), (8448, 768, 32))
        for L, D, R in cases:
            h = torch.randn(2, L, D, generator=gen).to(dtype).requires_grad_()
            y = torch.randn(2, L, D, generator=gen).to(dtype).requires_grad_()
            params = [torch.randn(*s, generator=gen).requires_grad_() for s in ((R, D), (R,), (R, R), (R,), (D, R), (D,))]
            out = adapter.adapter_residual(h, y, *params, 0.1)
            out.backward(torch.ones_like(out))
        for shared in (True, False):
            x = torch.randn(2, 7, 768, generator=gen).to(dtype).requires_grad_()
            prompts = torch.randn(*((2, 768) if shared else (2, 2, 768)), generator=gen).requires_grad_()
            weight, bias = torch.ones(768, requires_grad=True), torch.zeros(768, requires_grad=True)
            x_new, h = insert.insert_prompts_layernorm(x, prompts, 1, weight, bias)
            (x_new.float().sum() + h.float().sum()).backward()


def signature(fn, args, meta):
    """Triton's (signature, constexprs) of one recorded launch, from the argument values."""
    sig, constexprs, values = {}, {}, iter(args)
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name], constexprs[p.name] = "constexpr", meta[p.name]
            continue
        v = next(values)
        if isinstance(v, torch.Tensor):
            sig[p.name] = "*" + TYPES[v.dtype]
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i32" if -2 ** 31 <= int(v) < 2 ** 31 else "i64"
    if "EMU" in constexprs:
        constexprs["EMU"] = False   # the GPU code path, not the interpreter's emulation
    return sig, constexprs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter replaces the kernels by Python", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastprompt.kernels import adapter, insert_layernorm

    with recorded_launches([adapter, insert_layernorm]) as launches:
        drive(adapter, insert_layernorm)
    unique = {}
    for name, fn, a, meta in launches:
        sig, constexprs = signature(fn, a, meta)
        key = (name, tuple(sig.items()), tuple(sorted(constexprs.items())))
        unique.setdefault(key, (name, fn, sig, constexprs, {k: meta[k] for k in LAUNCH_OPTIONS if k in meta}))
    target, cuobjdump, failed = GPUTarget("cuda", args.arch, 32), _cuobjdump(), 0
    for name, fn, sig, constexprs, options in unique.values():
        shown = {k: v for k, v in constexprs.items() if k in ("D", "R") or k.startswith("BLOCK")}
        what = f"{name} {next(t for t in sig.values() if t.startswith('*'))[1:]} " + \
            " ".join(f"{k}={v}" for k, v in shown.items())
        try:
            compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                                      target=target, options=options)
        except Exception as exc:  # noqa: BLE001 - report every failing launch, then fail
            failed += 1
            print(f"FAILED {what}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        print(f"ok {what} {_usage(cuobjdump, compiled.asm.get('cubin'))}".rstrip())
    print(f"{len(unique)} launches compiled for sm_{args.arch}, {failed} failed")
    return 1 if failed or not unique else 0


def _cuobjdump() -> str | None:
    import triton
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else shutil.which("cuobjdump")


def _usage(cuobjdump, cubin) -> str:
    """'REG:.. LOCAL:..' of a cubin (LOCAL > 0: register spills), or '' without cuobjdump."""
    if not cuobjdump or not cubin:
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True)
    line = next((ln for ln in res.stdout.splitlines() if "REG:" in ln), "")
    return " ".join(w for w in line.split() if w.startswith(("REG:", "LOCAL:", "SHARED:")))


if __name__ == "__main__":
    sys.exit(main())
