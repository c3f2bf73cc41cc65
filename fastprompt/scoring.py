"""Scores: accuracy of a classifier on a list of images, and the base-to-novel harmonic mean."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from .data import DataError, ImageDataset, test_transform
from .errors import RunnerError
from .data.images import collate_readable
from .runtime import autocast, loader_kwargs


def non_finite_rows(logits: torch.Tensor) -> list[int]:
    """The rows of a [B, C] output holding a NaN or inf (a classifier's output is never shown
    or scored then: predict and evaluation refuse it)."""
    return (~torch.isfinite(logits).all(dim=-1)).nonzero().flatten().tolist()


def harmonic_mean(base: float, novel: float) -> float:
    """HM = 2 b n / (b + n)."""
    return 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)


@dataclass
class Score:
    """Top-1 accuracy (percent) over the `read` images that could be read; `unreadable` lists
    the sources of the others (left out, not replaced)."""

    acc: float
    read: int
    unreadable: list


@torch.no_grad()
def score(classifier, data, device, batch_size: int = 100, workers: int = 0,
          precision: str = "fp32", on_error: str = "skip", progress=None) -> Score:
    """Accuracy of `classifier` (images -> logits) over `data` (list of Datum). With
    ``on_error="skip"``, unreadable images (found by any loader worker) are left out of the
    accuracy, counted, and reported in one RuntimeWarning; none readable is a DataError."""
    if not data:
        raise DataError("no images to evaluate on: the evaluation split is empty")
    tf = test_transform(classifier.image_size, classifier.mean, classifier.std)
    dataset = ImageDataset(data, tf, on_error=on_error, image_size=classifier.image_size,
                           replace=False)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False,
                        collate_fn=collate_readable, **loader_kwargs(device, workers))
    correct = total = 0
    classifier.eval()
    for batch in (progress(loader) if progress else loader):
        if batch is None:  # every image of this batch was unreadable
            continue
        images, labels = batch
        images, labels = images.to(device, non_blocking=True), labels.to(device)
        with autocast(device, precision):
            logits = classifier(images)
        bad = non_finite_rows(logits)
        if bad:  # argmax of NaN rows is an arbitrary class: a wrong accuracy, never reported
            raise RunnerError(f"the model's logits hold NaN/inf for {len(bad)} of {len(logits)} "
                              f"images of a batch: nothing is scored; the model is broken (a "
                              f"diverged run or bad weights): train or convert it again")
        correct += int((logits.argmax(-1) == labels).sum())
        total += labels.numel()
    skipped = dataset.skipped  # over all loader workers
    if total == 0:
        raise DataError(f"none of the {len(data)} evaluation images could be read (first: "
                        f"{skipped[0] if skipped else '?'}) — check the data root")
    if skipped:
        warnings.warn(f"{len(skipped)} of {len(data)} evaluation images were unreadable and are "
                      f"left out: accuracy over the {total} read (first: {skipped[0]})",
                      RuntimeWarning, stacklevel=2)
    return Score(100.0 * correct / total, total, skipped)


@torch.no_grad()
def encode_items(encode, data, transform, env, batch_size: int = 256, replace: bool = False,
                 image_size: int | None = None):
    """(encode(images) of every readable item of `data` in order, as float32 [N, ...], their labels
    [N]): the frozen features a head on features is fitted or searched on, computed once and
    without a graph. `replace=True` swaps an unreadable image for another of its class (training
    items); otherwise it is left out, as in `score`."""
    dataset = ImageDataset(data, transform, on_error=env.on_error, image_size=image_size,
                           replace=replace)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_readable,
                        **loader_kwargs(env.device, env.workers))
    feats, labels = [], []
    for batch in loader:
        if batch is None:
            continue
        images, y = batch
        with autocast(env.device, env.precision):
            feats.append(encode(images.to(env.device, non_blocking=True)).float())
        labels.append(y.to(env.device))
    if not feats:
        raise DataError(f"none of the {len(data)} images could be read — check the data root")
    return torch.cat(feats), torch.cat(labels)


def accuracy(classifier, data, device, batch_size: int = 100, workers: int = 0,
             precision: str = "fp32", on_error: str = "skip", progress=None) -> float:
    """Top-1 accuracy in percent over the readable images of `data` (see `score`)."""
    return score(classifier, data, device, batch_size, workers, precision, on_error, progress).acc
