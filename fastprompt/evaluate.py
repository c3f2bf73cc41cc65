"""Accuracy of a classifier on a list of images, and the base-to-novel harmonic mean."""
from __future__ import annotations

import warnings

import torch
from torch.utils.data import DataLoader

from .data import ImageDataset, test_transform


def harmonic_mean(base: float, novel: float) -> float:
    """HM = 2 b n / (b + n)."""
    return 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)


def loader_kwargs(device: torch.device, workers: int) -> dict:
    kw = {"num_workers": workers, "pin_memory": device.type == "cuda"}
    if workers > 0:
        kw["persistent_workers"] = False
    return kw


@torch.no_grad()
def accuracy(classifier, data, device, batch_size: int = 100, workers: int = 0,
             precision: str = "fp32", on_error: str = "skip", progress=None) -> float:
    """Top-1 accuracy in percent of `classifier` (images -> logits) over `data` (list of Datum).
    With ``on_error="skip"``, unreadable images (found by any loader worker) are counted in one
    RuntimeWarning at the end."""
    if not data:
        raise ValueError("no images to evaluate on")
    tf = test_transform(classifier.image_size, classifier.mean, classifier.std)
    dataset = ImageDataset(data, tf, on_error=on_error)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False,
                        **loader_kwargs(device, workers))
    correct = total = 0
    classifier.eval()
    for images, labels in (progress(loader) if progress else loader):
        images, labels = images.to(device, non_blocking=True), labels.to(device)
        with autocast(device, precision):
            logits = classifier(images)
        correct += int((logits.argmax(-1) == labels).sum())
        total += labels.numel()
    skipped = dataset.skipped  # over all loader workers
    if skipped:
        warnings.warn(f"{len(skipped)} of {len(data)} evaluation images were unreadable and "
                      f"replaced by others of their class (first: {skipped[0]})", RuntimeWarning,
                      stacklevel=2)
    return 100.0 * correct / total


def autocast(device: torch.device, precision: str, cache: bool = True):
    """bf16/fp16 autocast on CUDA (or bf16 on CPU when asked); a no-op for fp32.
    `cache=False` for CUDA-graph capture (autocast's weight-cast cache must be off there)."""
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache)
