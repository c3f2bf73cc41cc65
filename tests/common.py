"""Shared helpers for the core tests (imported by test modules; pytest puts tests/ on sys.path)."""
from __future__ import annotations

import contextlib
import functools

import torch

import fastprompt as fp

CLASSNAMES = ["dog", "cat", "sports_car", "golden retriever", "red apple"]
ALL_METHODS = ["zeroshot", "coop", "cocoop", "maple", "ivlp", "mma", "lamm", "coop+lamm", "maple+lamm",
               "promptsrc", "kgcoop", "clip_lora", "tip_adapter", "tip_adapter_f", "clip_adapter"]
#: methods without an optimiser step (the reference, Tip-Adapter's training-free cache)
TRAINING_FREE = ["zeroshot", "tip_adapter"]
#: heads on features that hold a cache of few-shot image features (Tip-Adapter)
CACHE_METHODS = ["tip_adapter", "tip_adapter_f"]


@functools.lru_cache(maxsize=None)
def tiny_clip(seed: int = 0):
    """The tiny backbone, random init from `seed` (asked for: plain `load_clip("tiny")` is the
    shipped pretrained one)."""
    return fp.load_clip("tiny", pretrained=None, seed=seed)


def images(n: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g)


def perturb(model, seed: int = 0, std: float = 0.05):
    """Move every trainable tensor away from its init so round trips test real values (saved
    tensors that are not trained, a cache's labels, are left as they are)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_state().values():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def with_cache(model, shots: int = 2, seed: int = 0):
    """A Tip-Adapter model with a cache of `shots` random images per class (what training builds
    from the few-shot images), keys over 2 views; other models as they are."""
    if model.name in CACHE_METHODS:
        n = len(model.classnames)
        labels = torch.arange(n).repeat(shots)
        views = torch.stack([model.encode(images(n * shots, seed=seed + v)) for v in range(2)])
        model.build_cache(views, labels)
    return model


def trained_count(model) -> int:
    """Elements of the tensors a method trains."""
    return sum(p.numel() for p in model.trainable_state().values() if p.requires_grad)


def grads(model) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in model.trainable_state().items() if p.grad is not None}


@contextlib.contextmanager
def killed_in_epoch(monkeypatch, epoch: int):
    """Within the block, training stops with KeyboardInterrupt (a user's Ctrl-C) as its 0-indexed
    `epoch` starts; after it, training runs on as usual."""
    import inspect

    import fastprompt.training as training

    real = training._run_epoch

    def run_epoch(*args, **kwargs):
        if inspect.signature(real).bind(*args, **kwargs).arguments["epoch"] == epoch:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(training, "_run_epoch", run_epoch)
    try:
        yield
    finally:
        monkeypatch.setattr(training, "_run_epoch", real)
