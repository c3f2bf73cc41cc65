"""The inference module: cached text features, one image pass per batch.

`Classifier(images) = logit_scale * normalize(encode_image(images; image prompts/adapters)) @ T.T`
with `T` [C, E] the normalised text features computed once. Image-side prompts that depend only
on learnable tensors (MaPLe's coupled prompts) are evaluated once here and kept as buffers, so
the module holds constants only; adapters are shared with the method that made it. Weight deltas
(LoRA) are merged into copies of their blocks' attention weights, kept as buffers: the image pass
is plain CLIP's with other weights.

`predict(images, topk)` classifies image files or PIL images with the model's own preprocessing
(evaluation's `test_transform` at the backbone's image size, mean and std; files decoded as
training and evaluation decode them, `data/decode.py`). `top_classes` is that code, shared with
`python -m fastprompt.predict`, whose runners (ONNX, TensorRT) it serves as well.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import TowerHooks
from .errors import DataError, InputError, RunnerError
from .lora import Merged

#: (class name, softmax probability), most probable first: what `predict` gives per image
Top = list[tuple[str, float]]


def open_image(item, image_size: int | None = None):
    """An 8-bit RGB PIL image from a file path or a PIL image, as evaluation reads it;
    `decode.ImageReadError` (the reason) for a file that cannot be read."""
    from PIL import Image

    from .data.decode import open_rgb, to_rgb

    if isinstance(item, Image.Image):
        return to_rgb(item)
    if isinstance(item, (str, os.PathLike)):
        return open_rgb(item, image_size)
    raise InputError(f"predict takes image file paths or PIL images, got a {type(item).__name__}: "
                     f"call the classifier itself on a preprocessed image tensor")


def top_classes(model, items, topk: int = 5, batch_size: int = 32,
                on_unreadable: Callable | None = None) -> Iterator[tuple[int, Top]]:
    """(index in `items`, the `topk` most probable classes) for each readable item, in order.

    `model`: a classifier, or anything with `classnames`, `image_size`, `mean`, `std`, `device`
    whose `run` maps a float image batch [B, 3, S, S] to logits [B, C] (predict's runners). An item that
    cannot be read goes to `on_unreadable(index, item, reason)`, or is a DataError without it.
    Logits holding NaN/inf are a RunnerError: the model is broken, nothing is returned for it."""
    from .data import test_transform
    from .data.decode import ImageReadError

    transform = test_transform(model.image_size, model.mean, model.std)
    k = max(1, min(topk, len(model.classnames)))
    batch: list = []
    for i, item in enumerate(items):
        try:
            image = open_image(item, model.image_size)
        except ImageReadError as err:
            if on_unreadable is None:
                raise DataError(f"cannot read image {item}: {err}") from None
            on_unreadable(i, item, str(err))
            continue
        batch.append((i, item, transform(image)))
        if len(batch) == batch_size:
            yield from _top(model, batch, k)
            batch = []
    if batch:
        yield from _top(model, batch, k)


@torch.no_grad()
def _top(model, batch: list, k: int) -> Iterator[tuple[int, Top]]:
    from .scoring import non_finite_rows

    run = getattr(model, "run", model)  # a runner's `run`, a classifier's forward
    logits = run(torch.stack([x for _, _, x in batch]).to(model.device)).float().cpu()
    bad = non_finite_rows(logits)
    if bad:
        raise RunnerError(f"the model's output for {batch[bad[0]][1]} holds NaN/inf: the model is "
                          f"broken; train or export it again")
    values, index = torch.softmax(logits, dim=-1).topk(k, dim=-1)
    for (i, _, _), vals, idx in zip(batch, values.tolist(), index.tolist()):
        yield i, [(model.classnames[c], v) for c, v in zip(idx, vals)]


class Predicts:
    """`predict` for the classifiers below."""

    def predict(self, images, topk: int = 5, batch_size: int = 32, on_error: str = "raise"):
        """The `topk` most probable classes of each image, as [(class name, probability), ...]
        (softmax over all classes, most probable first; `topk` above the class count gives all).

        images: an image file path or a PIL image, or a list of them; a single one gives its
        list, a list a list of them, in order. Each is preprocessed as evaluation does (decoded
        to 8-bit RGB, resized and centre-cropped to the backbone's input size, normalised by its
        mean and std). on_error: "raise" (a DataError naming the file) or "skip" (None in its
        place) for a file that cannot be read."""
        from PIL import Image

        if on_error not in ("raise", "skip"):
            raise InputError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if topk < 1 or batch_size < 1:
            raise InputError(f"topk and batch_size must be at least 1, got {topk} and {batch_size}")
        single = isinstance(images, (str, os.PathLike, Image.Image))
        items = [images] if single else list(images)
        found: list = [None] * len(items)
        skip = (lambda *_: None) if on_error == "skip" else None
        for i, top in top_classes(self, items, topk, batch_size, skip):
            found[i] = top
        return found[0] if single else found


class Classifier(Predicts, nn.Module):
    caches_text = True

    def __init__(self, method, text_features: torch.Tensor, classnames: list[str]):
        super().__init__()
        self.backbone = method.backbone
        self.opts = method.runtime
        self.classnames = list(classnames)
        self.image_size = method.clip.image_size
        self.mean, self.std = tuple(method.clip.mean), tuple(method.clip.std)
        self.register_buffer("text_features", text_features.detach().float())
        self.register_buffer("logit_scale", torch.as_tensor(method.logit_scale()).detach().float())
        hooks = self.backbone.merged(method.image_hooks(), text=False)
        self._prompt_layers = sorted(hooks.prompts)
        for i in self._prompt_layers:
            self.register_buffer(f"image_prompt_{i}", hooks.prompts[i].detach().clone())
        self._adapters = dict(hooks.adapters)
        # the adapter Linear layers, registered so .to() / export see them
        self.adapter_modules = nn.ModuleList(
            nn.ModuleList([a.down, a.shared, a.up]) for a in self._adapters.values())
        self._merged_layers = sorted(hooks.lora)
        for i, m in hooks.lora.items():
            for part in ("in_proj", "out_proj"):
                if getattr(m, part) is not None:
                    self.register_buffer(f"image_{part}_{i}", getattr(m, part).detach().clone())

    def image_hooks(self) -> TowerHooks:
        prompts = {i: getattr(self, f"image_prompt_{i}") for i in self._prompt_layers}
        lora = {i: Merged(*(getattr(self, f"image_{part}_{i}", None) for part in ("in_proj", "out_proj")))
                for i in self._merged_layers}
        return TowerHooks(prompts=prompts, adapters=self._adapters, lora=lora)

    @property
    def device(self) -> torch.device:
        return self.text_features.device

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised image features [B, E]."""
        return F.normalize(self.backbone.encode_image(images, self.image_hooks(), self.opts), dim=-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.features(images)
        return self.logit_scale * feats @ self.text_features.to(feats.dtype).t()

    def train(self, mode: bool = True):  # inference only
        return super().train(False)

    def use_reference_kernels(self) -> "Classifier":
        """Route every fused op through its pure-torch reference (what export traces)."""
        self.opts = dataclasses.replace(self.opts, kernels=False)
        return self


class PerImageTextClassifier(Predicts, nn.Module):
    """For methods whose text features depend on each image (CoCoOp): nothing can be cached, the
    text tower runs over all classes for every image, batched. Says so through `caches_text`."""

    caches_text = False

    def __init__(self, method, classnames: list[str]):
        super().__init__()
        self.method = method
        self.classnames = list(classnames)
        self.template = method.template_for(self.classnames)
        self.image_size = method.clip.image_size
        self.mean, self.std = tuple(method.clip.mean), tuple(method.clip.std)

    @property
    def device(self) -> torch.device:
        return self.method.clip.device

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.method.logits_for(images, self.template)

    def train(self, mode: bool = True):
        return super().train(False)

