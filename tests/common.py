"""Shared helpers for the core tests (imported by test modules; pytest puts tests/ on sys.path)."""
from __future__ import annotations

import functools

import torch

import fastprompt as fp

CLASSNAMES = ["dog", "cat", "sports_car", "golden retriever", "red apple"]
ALL_METHODS = ["zeroshot", "coop", "cocoop", "maple", "ivlp", "mma", "lamm", "coop+lamm", "maple+lamm",
               "promptsrc", "kgcoop", "clip_lora"]


@functools.lru_cache(maxsize=None)
def tiny_clip(seed: int = 0):
    """The tiny backbone, random init from `seed` (asked for: plain `load_clip("tiny")` is the
    shipped pretrained one)."""
    return fp.load_clip("tiny", pretrained=None, seed=seed)


def images(n: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g)


def perturb(model, seed: int = 0, std: float = 0.05):
    """Move every trainable tensor away from its init so round trips test real values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_state().values():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def grads(model) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in model.trainable_state().items() if p.grad is not None}
