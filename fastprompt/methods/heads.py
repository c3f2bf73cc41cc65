"""Heads on frozen features (DESIGN.md's fourth slot kind): methods that act on CLIP's outputs only.

Tip-Adapter's feature cache (`tip_adapter.py`) and CLIP-Adapter's residual MLP (`clip_adapter.py`)
put nothing into the backbone: the text side is zero-shot CLIP's (`ZeroShot`: one prompt per
dataset, or an ensemble averaged as CoOp's ZeroshotCLIP2 does), the image tower runs once per image
without a graph (no gradient ever enters it), and the method's own tensors act on the image
feature that comes out. `model.classifier()` is zero-shot CLIP's single image pass (text computed
once) with the head applied to the image feature: what the ONNX export traces.
"""
from __future__ import annotations

import torch

from ..backbone import NO_HOOKS
from ..classifier import Classifier
from .zeroshot import ZeroShot


class FeatureHead(ZeroShot):
    """Zero-shot CLIP's text features and a frozen image tower; subclasses add the head."""

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Un-normalised image features [B, E] of the frozen tower, computed without a graph."""
        with torch.no_grad():
            return self.backbone.encode_image(images, NO_HOOKS, self.opts)

    def text_for(self, classnames: list[str] | None) -> tuple[torch.Tensor, list[str]]:
        """(normalised text features [C, E], the names) of `classnames` (default: the training
        classes), in chunks as `Method.classifier` computes them."""
        base = super().classifier(classnames)
        return base.text_features, base.classnames


class HeadClassifier(Classifier):
    """The cached-text classifier of a head on features: `head_features` maps the un-normalised
    image feature to the one that is normalised and scored (CLIP-Adapter's mix); Tip-Adapter's
    adds its cache term in its own `forward`. The head's modules and tensors are registered by the
    subclass, so `.to()` and the export see them."""

    def __init__(self, method, text_features: torch.Tensor, classnames: list[str],
                 logit_scale: float | None = None):
        super().__init__(method, text_features, classnames)
        if logit_scale is not None:  # Tip-Adapter's literal 100 instead of exp(logit_scale)
            self.register_buffer("logit_scale", torch.tensor(float(logit_scale),
                                                             device=self.text_features.device))

    def head_features(self, feats: torch.Tensor) -> torch.Tensor:
        return feats

    def features(self, images: torch.Tensor) -> torch.Tensor:
        raw = self.backbone.encode_image(images, self.image_hooks(), self.opts)
        return torch.nn.functional.normalize(self.head_features(raw), dim=-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.features(images)
        return self.logit_scale * feats @ self.text_features.to(feats.dtype).t()
