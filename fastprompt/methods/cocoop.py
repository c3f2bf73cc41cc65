"""CoCoOp: CoOp's context shifted per image by a meta-net of the image feature.

    pi(x) = meta_net(normalize(f(x))),  meta_net = Linear(E -> E/16) -> ReLU -> Linear(E/16 -> 512)
    ctx_m(x) = ctx_m + pi(x)            for every context row m
The text tower therefore runs once per image over all classes. Here that is one batched pass
over B*C sequences (truncated to max(eot)+1 tokens; `Backbone.encode_text_per_prompt`), not a
Python loop over images; nothing can be cached, and `classifier()` returns a module that says so
(`caches_text = False`).

Original checkpoints (CoOp trainers/cocoop.py): CoOp's prompt learner plus
`meta_net.linear{1,2}.*` <- `prompt_learner.meta_net.linear{1,2}.*`; no class-specific context.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..original.keys import Layout, err, first_key
from .base import register
from .coop import LEARNER_BUFFERS, ContextPrompt, CoOpConfig, context_names, coop_options

#: description and recipe (methods.base.card; read by fastprompt.catalog without torch)
CARDS = {
    "cocoop": {
        "about": "CoOp's context plus a shift computed from each image by a small meta-net (CoCoOp)",
        "recipes": {"base2novel": {
            "batch_size": 1, "lr": 0.002, "epochs": 10,
            "source": "CoOp configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml"}},
    },
}


@dataclass
class CoCoOpConfig(CoOpConfig):
    meta_ratio: int = 16


def _names(model) -> dict[str, str]:
    return {**context_names(model), **{f"prompt_learner.meta_net.{n}.{p}": f"meta_net.{n}.{p}"
                                       for n in ("linear1", "linear2") for p in ("weight", "bias")}}


def _options(layout, sd, cfg, n_classes, notes) -> dict:
    opts = coop_options(layout, sd, cfg, n_classes, csc=False)
    hidden, e = sd.get("prompt_learner.meta_net.linear1.weight", torch.zeros(0, 0)).shape
    if not hidden or e % hidden:
        raise err("checkpoint key 'meta_net.linear1.weight' is missing or of an odd shape: "
                  "expected [E/16, E] (E = the CLIP embedding width)")
    return {**opts, "meta_ratio": e // hidden}


@register("cocoop")
class CoCoOp(ContextPrompt):
    Config = CoCoOpConfig
    caches_text = False
    original_layout = Layout(
        "CoCoOp", ("CoCoOp",), "prompt_learner", "prompt_learner", "COCOOP", _names, _options,
        known=frozenset({"N_CTX", "CTX_INIT"}), kind="cocoop",
        detect=lambda keys: first_key(keys, r"(^|\.)meta_net\."), precedence=30,
        ignored=LEARNER_BUFFERS)

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
        txt = self.backbone.encode_text_per_prompt(template.embeddings, template.eot, ctx, self.opts,
                                                   used=template.used_tokens)
        txt = F.normalize(txt, dim=-1)                           # [B, C, E]
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
