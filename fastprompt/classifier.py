"""The inference module: cached text features, one image pass per batch.

`Classifier(images) = logit_scale * normalize(encode_image(images; image prompts/adapters)) @ T.T`
with `T` [C, E] the normalised text features computed once. Image-side prompts that depend only
on learnable tensors (MaPLe's coupled prompts) are evaluated once here and kept as buffers, so
the module holds constants only; adapters are shared with the method that made it. Weight deltas
(LoRA) are merged into copies of their blocks' attention weights, kept as buffers: the image pass
is plain CLIP's with other weights.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import TowerHooks
from .lora import Merged


class Classifier(nn.Module):
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


class PerImageTextClassifier(nn.Module):
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

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.method.logits_for(images, self.template)

    def train(self, mode: bool = True):
        return super().train(False)

