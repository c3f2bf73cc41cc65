"""CoCoOp: CoOp's context shifted per image by a meta-net of the image feature.

    pi(x) = meta_net(normalize(f(x))),  meta_net = Linear(E -> E/16) -> ReLU -> Linear(E/16 -> 512)
    ctx_m(x) = ctx_m + pi(x)            for every context row m
The text tower therefore runs once per image over all classes. Here that is one batched pass
over B*C sequences (truncated to max(eot)+1 tokens), not a Python loop over images; nothing can
be cached, and `classifier()` returns a module that says so (`caches_text = False`).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import insert_rows
from .base import register
from .coop import ContextPrompt, CoOpConfig


@dataclass
class CoCoOpConfig(CoOpConfig):
    meta_ratio: int = 16


@register("cocoop")
class CoCoOp(ContextPrompt):
    Config = CoCoOpConfig
    caches_text = False

    def __init__(self, clip, classnames, config):
        if config.csc:
            raise ValueError("csc=True is not supported by cocoop")
        super().__init__(clip, classnames, config)
        e, d = self.backbone.embed_dim, self.backbone.text_width
        hidden = e // config.meta_ratio
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(e, hidden)), ("relu", nn.ReLU(inplace=True)),
            ("linear2", nn.Linear(hidden, d))]))

    def logits_for(self, images: torch.Tensor, template) -> torch.Tensor:
        img = self.image_features(images)                        # [B, E], normalised
        ctx = self.ctx + self.meta_net(img).unsqueeze(1)         # [B, n_ctx, D]
        b, c = img.shape[0], len(template)
        n = self.backbone.text_length(template.eot, template.embeddings.shape[1], self.opts,
                                      template.used_tokens)
        base = template.embeddings[:, :n]                        # cut before the B-fold copy
        seq = base.unsqueeze(0).expand(b, -1, -1, -1).reshape(b * c, n, -1)
        seq = insert_rows(seq, ctx.repeat_interleave(c, dim=0), 1)
        eot = template.eot.repeat(b)
        txt = self.backbone.encode_text(seq, eot, opts=self.opts, used=template.used_tokens)
        txt = F.normalize(txt, dim=-1).view(b, c, -1)
        return self.backbone.logit_scale() * torch.einsum("be,bce->bc", img.to(txt.dtype), txt)

    def forward(self, images):
        return self.logits_for(images, self.template)

    def text_features(self, template=None):
        raise RuntimeError("cocoop's text features depend on each image: use model(images) or "
                           "model.classifier(), which runs the text tower per image")

    @torch.no_grad()
    def classifier(self, classnames=None, chunk: int = 256):
        from ..classifier import PerImageTextClassifier

        return PerImageTextClassifier(self, self.classnames if classnames is None else classnames)
