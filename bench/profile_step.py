"""`python -m bench.profile_step [--method maple] [--classes 500]`: where a training step's time goes.

Times one step (forward, backward, SGD) three ways on the GPU — original-style baseline, the
eager fast path, the CUDA-graph replay the trainer uses — and prints torch.profiler's top ops of
the eager fast path, so launch overhead vs GPU work can be read off.
"""
from __future__ import annotations

import argparse
import time

import torch

import fastprompt as fp
from fastprompt.recipes import RECIPES
from fastprompt.training import TrainEnv, make_step


def timed_step(model, step, x, y, opt, iters: int = 20) -> float:
    def one():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = step(x, y)
        loss.backward()
        opt.step()
    for _ in range(5):
        one()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        one()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--method", default="maple")
    p.add_argument("--classes", type=int, default=500)
    p.add_argument("--model", default="ViT-B-16")
    a = p.parse_args()
    clip = fp.load_clip(a.model, pretrained=None, seed=0, device="cuda")
    batch = RECIPES[a.method].batch_size
    x = torch.randn(batch, 3, clip.image_size, clip.image_size, device="cuda")
    y = torch.arange(batch, device="cuda") % a.classes
    names = [f"object number {i}" for i in range(a.classes)]
    results = {}
    for label, fast, graphs in (("baseline", False, False), ("fast-eager", True, False),
                                ("fast-graphs", True, True)):
        torch.manual_seed(0)
        model = fp.create(a.method, clip, names).train().set_fast(fast)
        env = TrainEnv(device=torch.device("cuda"), precision="bf16", cuda_graphs=graphs)
        step = make_step(model, env)
        opt = torch.optim.SGD(model.trainable_state().values(), lr=1e-4, momentum=0.9)
        results[label] = timed_step(model, step, x, y, opt)
        if label == "fast-eager":
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                timed_step(model, step, x, y, opt, iters=3)
            print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
    for k, v in results.items():
        print(f"{a.method} C={a.classes} batch={batch} {k:12s} {v * 1e3:8.2f} ms/step  "
              f"{results['baseline'] / v:5.2f}x")


if __name__ == "__main__":
    main()
