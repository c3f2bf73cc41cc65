"""Packed training against the same runs one after the other, in one process and one benchmark run.

sequential = R runs, each its own training step (forward, backward, SGD) in turn: what R separate
             processes of the original code do, without their start-up
packed     = the same R runs in one packed step (`fastprompt.pack`: one backbone pass for all of
             them per call, each sample with its own run's prompts/adapters/LoRA deltas; losses summed, one
             backward, each run's own optimiser step)

Each run has its own parameters (another seed), its own images and labels, at the method's released
batch size. On CUDA: ViT-B/16 (random init), bf16 autocast, C = 100 classes per run, R = 3 and 11
(a base-to-novel table's 11 datasets, or its 3 seeds). On a CPU: the tiny backbone, fp32, C = 12,
R = 1, 3, 11 (R = 1 prices the pack's own overhead: threads and merging).
"""
from __future__ import annotations

import pytest
import torch

import fastprompt as fp
from fastprompt.pack import Pack
from fastprompt.recipes import RECIPES

METHODS = ["coop", "maple", "mma", "promptsrc", "clip_lora", "clip_adapter"]


def workload(env) -> dict:
    if env.cuda:
        return {"name": "ViT-B-16", "classes": 100, "image": 224, "runs": (3, 11)}
    return {"name": "tiny", "classes": 12, "image": 32, "runs": (1, 3, 11)}


@pytest.mark.parametrize("runs", [1, 3, 11], ids=lambda r: f"R{r}")
@pytest.mark.parametrize("variant", ["sequential", "packed"])
@pytest.mark.parametrize("method", METHODS)
def test_pack_step(benchmark, bench, method, variant, runs):
    env, w = bench.env, workload(bench.env)
    if runs not in w["runs"]:
        pytest.skip(f"R={runs} is not measured on this device")
    benchmark.group = f"pack-{method}-R{runs}"
    clip = fp.load_clip(w["name"], seed=0, device=env.device)
    batch = RECIPES[method].batch_size
    names = [f"object number {i}" for i in range(w["classes"])]
    models, opts, data = [], [], []
    for r in range(runs):
        torch.manual_seed(r)
        models.append(fp.create(method, clip, names).train())
        opts.append(torch.optim.SGD(models[-1].trainable_state().values(), lr=1e-4, momentum=0.9))
        g = torch.Generator().manual_seed(100 + r)
        data.append((torch.randn(batch, 3, w["image"], w["image"], generator=g).to(env.device),
                     torch.randint(0, w["classes"], (batch,), generator=g).to(env.device)))
    amp = torch.autocast(env.device.type, dtype=env.dtype, enabled=env.cuda)

    def sequential():
        for model, opt, (x, y) in zip(models, opts, data):
            opt.zero_grad(set_to_none=True)
            with amp:
                loss = model.loss(x, y)
            loss.backward()
            opt.step()

    def packed():
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        with amp:
            losses = Pack().run([lambda m=m, d=d: m.loss(*d) for m, d in zip(models, data)])
        sum(losses).backward()
        for opt in opts:
            opt.step()

    if env.cuda:
        torch.cuda.reset_peak_memory_stats()
    bench.run(sequential if variant == "sequential" else packed, variant=variant,
              shapes={"images": (runs, batch, 3, w["image"], w["image"])}, bytes_moved=0)
    benchmark.extra_info.update(method=method, runs=runs, images=runs * batch, classes=w["classes"])
    if env.cuda:
        benchmark.extra_info["peak_mib"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
