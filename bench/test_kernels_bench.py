"""Benchmarks of the fused kernels against their eager baselines.

Groups: kernel-adapter-fwd, kernel-adapter-fwdbwd, kernel-insert-ln-fwd, kernel-insert-ln-fwdbwd,
and kernel-copy (``t.clone()`` of the same activation size: the achievable-bandwidth yardstick).
Variants (``extra_info["variant"]``): ``baseline`` (eager pure-torch reference; for insertion that is
``torch.cat`` + ``F.layer_norm``), ``compile`` (torch.compile of the reference) and ``fastprompt``
(the Triton kernels, CUDA only).

``extra_info["bytes"]`` is the traffic the op cannot avoid (same for every variant), so ``gbps`` is
an effective bandwidth to compare with the copy group:
  adapter fwd      read h, y; write out                                   3 T D
  adapter fwd+bwd  fwd + read g, h; write dh (dy is g itself)             6 T D
  insert fwd       read x (and prompts); write x_new, h                   3 B L D
  insert fwd+bwd   fwd + read g_xnew, g_h, x_new; write dx                7 B L D
(times the element size; the narrow [T, R] tensors and parameters are ignored).

On CUDA every benchmark here also records its device time (``gpu_ms``, ``gpu_gbps``: the call
replayed from a CUDA graph with L2 flushed, see ``bench/conftest.py``). At these sizes (~0.1 ms)
the wall-clock median is mostly launch latency, synchronize and autograd bookkeeping, so the
kernel targets (speed-up over eager and compile, share of copy bandwidth) are read off device time.

Shapes: ViT-B/16 with batch 32 in bf16 on CUDA (vision: 199 tokens x 768, text: 77 x 512), and
vision at batch 256 where every variant is bandwidth-bound; small fp32 shapes on the CPU so a
smoke run takes seconds.
"""
from __future__ import annotations

import pytest
import torch

import fastprompt.kernels as K
from fastprompt.kernels import reference

VARIANTS = ["baseline", "compile", "fastprompt"]
if torch.cuda.is_available():  # "vision-b256": large enough (78 MB a tensor) to be bandwidth-bound
    ADAPTER_CASES = {"vision": (32, 199, 768, 32), "text": (32, 77, 512, 32),      # B, L, D, R
                     "vision-b256": (256, 199, 768, 32)}
    INSERT_CASES = {"vision": (32, 199, 768, 2, "end"), "text": (32, 77, 512, 4, "start1"),  # B, L, D, n
                    "vision-b256": (256, 199, 768, 2, "end")}
else:
    ADAPTER_CASES = {"vision": (4, 50, 256, 32), "text": (4, 20, 128, 16)}
    INSERT_CASES = {"vision": (4, 50, 256, 2, "end"), "text": (4, 20, 128, 4, "start1")}


def _impl(bench, variant, ref_fn, public_fn):
    bench.skip_unless(variant)
    if variant == "baseline":
        return ref_fn
    if variant == "compile":
        return bench.compiled(ref_fn)

    def triton_fn(*args):
        with K.use("triton"):
            return public_fn(*args)
    return triton_fn


def _adapter_inputs(env, B, L, D, R, requires_grad):
    gen = torch.Generator().manual_seed(0)

    def rnd(*s, std=1.0, dtype=env.dtype):
        t = (torch.randn(*s, generator=gen) * std).to(env.device, dtype)
        return t.requires_grad_(requires_grad)

    h, y = rnd(B, L, D), rnd(B, L, D)
    params = [rnd(R, D, std=D ** -0.5, dtype=torch.float32), rnd(R, std=0.1, dtype=torch.float32),
              rnd(R, R, std=R ** -0.5, dtype=torch.float32), rnd(R, std=0.1, dtype=torch.float32),
              rnd(D, R, std=R ** -0.5, dtype=torch.float32), rnd(D, std=0.1, dtype=torch.float32)]
    return h, y, params


def _insert_inputs(env, B, L, D, n, requires_grad):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, L, D, generator=gen).to(env.device, env.dtype).requires_grad_(requires_grad)
    prompts = (torch.randn(n, D, generator=gen) * 0.5).to(env.device).requires_grad_(requires_grad)
    weight = (1 + 0.1 * torch.randn(D, generator=gen)).to(env.device)   # frozen backbone LayerNorm
    bias = (0.1 * torch.randn(D, generator=gen)).to(env.device)
    return x, prompts, weight, bias


def _esize(env):
    return torch.finfo(env.dtype).bits // 8


# ------------------------------------------------------------------------------------ adapter
@pytest.mark.benchmark(group="kernel-adapter-fwd")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", list(ADAPTER_CASES))
def test_adapter_fwd(bench, case, variant):
    B, L, D, R = ADAPTER_CASES[case]
    h, y, params = _adapter_inputs(bench.env, B, L, D, R, requires_grad=False)
    fn = _impl(bench, variant, reference.adapter_residual, K.adapter_residual)
    out = bench.run(lambda: fn(h, y, *params, 0.1), variant=variant,
                    shapes=dict(h=h.shape, R=R), bytes_moved=3 * B * L * D * _esize(bench.env), device_time=True)
    assert out.shape == h.shape


@pytest.mark.benchmark(group="kernel-adapter-fwdbwd")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", list(ADAPTER_CASES))
def test_adapter_fwdbwd(bench, case, variant):
    B, L, D, R = ADAPTER_CASES[case]
    h, y, params = _adapter_inputs(bench.env, B, L, D, R, requires_grad=True)
    g = torch.randn_like(h)
    fn = _impl(bench, variant, reference.adapter_residual, K.adapter_residual)

    def step():
        out = fn(h, y, *params, 0.1)
        return torch.autograd.grad(out, [h, y, *params], g)

    grads = bench.run(step, variant=variant, shapes=dict(h=h.shape, R=R),
                      bytes_moved=6 * B * L * D * _esize(bench.env), device_time=True)
    assert len(grads) == 8


# ---------------------------------------------------------------------------------- insertion
@pytest.mark.benchmark(group="kernel-insert-ln-fwd")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", list(INSERT_CASES))
def test_insert_ln_fwd(bench, case, variant):
    B, L, D, n, where = INSERT_CASES[case]
    start = 1 if where == "start1" else L - n
    x, prompts, weight, bias = _insert_inputs(bench.env, B, L, D, n, requires_grad=False)
    fn = _impl(bench, variant, reference.insert_prompts_layernorm, K.insert_prompts_layernorm)
    x_new, h = bench.run(lambda: fn(x, prompts, start, weight, bias), variant=variant,
                         shapes=dict(x=x.shape, prompts=prompts.shape, start=start),
                         bytes_moved=3 * B * L * D * _esize(bench.env), device_time=True)
    assert h.shape == x.shape


@pytest.mark.benchmark(group="kernel-insert-ln-fwdbwd")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", list(INSERT_CASES))
def test_insert_ln_fwdbwd(bench, case, variant):
    B, L, D, n, where = INSERT_CASES[case]
    start = 1 if where == "start1" else L - n
    x, prompts, weight, bias = _insert_inputs(bench.env, B, L, D, n, requires_grad=True)
    gx, gh = torch.randn_like(x), torch.randn_like(x)
    fn = _impl(bench, variant, reference.insert_prompts_layernorm, K.insert_prompts_layernorm)

    def step():
        x_new, h = fn(x, prompts, start, weight, bias)
        return torch.autograd.grad([x_new, h], [x, prompts], [gx, gh])

    grads = bench.run(step, variant=variant,
                      shapes=dict(x=x.shape, prompts=prompts.shape, start=start),
                      bytes_moved=7 * B * L * D * _esize(bench.env), device_time=True)
    assert grads[1].shape == prompts.shape


# --------------------------------------------------------------------------- copy yardstick
@pytest.mark.benchmark(group="kernel-copy")
@pytest.mark.parametrize("case", list(ADAPTER_CASES))
def test_copy(bench, case):
    B, L, D, _ = ADAPTER_CASES[case]
    t = torch.randn(B, L, D, device=bench.env.device).to(bench.env.dtype)
    out = bench.run(t.clone, variant="copy", shapes=dict(t=t.shape),
                    bytes_moved=2 * t.numel() * t.element_size(), device_time=True)
    assert out.shape == t.shape


# ------------------------------------------------------------------- block-size sweep (opt-in)
# FASTPROMPT_BENCH_TUNE=1 pytest bench/test_kernels_bench.py -k tune --benchmark-only: the Triton
# variant under several block configurations (variant "fwd[config]"), to choose the defaults in
# kernels/adapter.py::_plan and kernels/insert_layernorm.py::_plan on a new GPU.
ADAPTER_TUNE = {
    "default": {},
    "T16-D64": dict(BLOCK_D=64),
    "T16-DO256": dict(BLOCK_DO=256),
    "T32": dict(BLOCK_T=32),
    "T32-w8": dict(BLOCK_T=32, num_warps=8),
    "T64-w8": dict(BLOCK_T=64, num_warps=8),
    "T16-s2": dict(num_stages=2),
    "T16-w8-D256": dict(BLOCK_D=256, BLOCK_DO=256, num_warps=8),
    "B-TB32-w4": dict(BLOCK_TB=32, warps_b=4),
    "B-DB128": dict(BLOCK_DB=128),
    "B-TB128": dict(BLOCK_TB=128),
    "B-splits-x2": dict(splits=24),
    "T32-bwdT16": dict(BLOCK_T=32, BLOCK_T_BWD=16),   # forward on 32 tokens, register-heavy backward on 16
    "bwdT32": dict(BLOCK_T_BWD=32),
}
INSERT_TUNE = {"default": {}, "M2": dict(BLOCK_M=2), "M8": dict(BLOCK_M=8, num_warps=8),
               "w8": dict(num_warps=8), "w2": dict(num_warps=2), "bwd-w4": dict(bwd_warps=4),
               "reduce-4": dict(reduce_per_sm=4)}


def _tuning(bench, module: str, overrides: dict):
    import os
    bench.skip_unless("fastprompt")
    if os.environ.get("FASTPROMPT_BENCH_TUNE") != "1":
        pytest.skip("set FASTPROMPT_BENCH_TUNE=1 to sweep block sizes")
    mod = __import__(f"fastprompt.kernels.{module}", fromlist=["configure"])
    mod.configure(**overrides)
    return mod


@pytest.mark.benchmark(group="tune-adapter")
@pytest.mark.parametrize("config", list(ADAPTER_TUNE))
@pytest.mark.parametrize("grads", [False, True], ids=["fwd", "fwdbwd"])
def test_tune_adapter(bench, config, grads):
    mod = _tuning(bench, "adapter", ADAPTER_TUNE[config])
    try:
        B, L, D, R = ADAPTER_CASES["vision"]
        h, y, params = _adapter_inputs(bench.env, B, L, D, R, requires_grad=grads)
        g = torch.randn_like(h)

        def step():
            with K.use("triton"):
                out = K.adapter_residual(h, y, *params, 0.1)
            return torch.autograd.grad(out, [h, y, *params], g) if grads else out
        bench.run(step, variant=f"{'fwdbwd' if grads else 'fwd'}[{config}]", shapes=dict(h=h.shape, R=R),
                  bytes_moved=(6 if grads else 3) * B * L * D * _esize(bench.env), device_time=True)
    finally:
        mod.configure()


@pytest.mark.benchmark(group="tune-insert-ln")
@pytest.mark.parametrize("config", list(INSERT_TUNE))
@pytest.mark.parametrize("grads", [False, True], ids=["fwd", "fwdbwd"])
def test_tune_insert(bench, config, grads):
    mod = _tuning(bench, "insert_layernorm", INSERT_TUNE[config])
    try:
        B, L, D, n, _ = INSERT_CASES["vision"]
        x, prompts, weight, bias = _insert_inputs(bench.env, B, L, D, n, requires_grad=grads)
        gx, gh = torch.randn_like(x), torch.randn_like(x)

        def step():
            with K.use("triton"):
                x_new, h = K.insert_prompts_layernorm(x, prompts, L - n, weight, bias)
            return torch.autograd.grad([x_new, h], [x, prompts], [gx, gh]) if grads else h
        bench.run(step, variant=f"{'fwdbwd' if grads else 'fwd'}[{config}]", shapes=dict(x=x.shape),
                  bytes_moved=(7 if grads else 3) * B * L * D * _esize(bench.env), device_time=True)
    finally:
        mod.configure()
