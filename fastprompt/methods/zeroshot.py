"""Zero-shot CLIP: hand-written prompts, no parameters.

`templates` holds one prompt (default "a photo of a {}."; CoOp's zero-shot uses a per-dataset one,
e.g. "a photo of a {}, a type of pet.", chosen by the train CLI) or several: prompt ensembling as
CoOp's ZeroshotCLIP2 (trainers/zsclip.py) computes it,

    t_c = normalize( (1/K) * sum_k normalize(f(template_k(c))) ).

The text features depend only on frozen weights: with caching on they are computed once.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..prompts import DEFAULT_TEMPLATE, PromptTemplate, check_template
from .base import Method, MethodConfig, register


@dataclass
class ZeroShotConfig(MethodConfig):
    templates: list = field(default_factory=lambda: [DEFAULT_TEMPLATE])


@register("zeroshot")
class ZeroShot(Method):
    Config = ZeroShotConfig

    def __init__(self, clip, classnames, config):
        if isinstance(config.templates, str):
            config.templates = [config.templates]
        if not config.templates:
            raise ValueError("zeroshot needs at least one prompt template, e.g. 'a photo of a {}.'")
        config.templates = [check_template(t) for t in config.templates]
        super().__init__(clip, classnames, config)

    def make_template(self, classnames: list[str]) -> PromptTemplate:
        """The first template (`self.template`); the others are built with the features."""
        return PromptTemplate(self.backbone, classnames, fmt=self.config.templates[0])

    def text_features(self, template=None):
        template = template or self.template
        names = template.classnames

        def compute():
            feats = [super(ZeroShot, self).text_features(template)]
            for fmt in self.config.templates[1:]:
                feats.append(super(ZeroShot, self).text_features(
                    PromptTemplate(self.backbone, names, fmt=fmt)))
            return feats[0] if len(feats) == 1 else F.normalize(torch.stack(feats).mean(0), dim=-1)
        return self.cached(("text", tuple(self.config.templates), tuple(names)), compute)
