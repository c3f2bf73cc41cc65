"""Zero-shot CLIP: hand-written prompts, no parameters.

`templates` holds one prompt (default "a photo of a {}."; CoOp's zero-shot uses a per-dataset one,
e.g. "a photo of a {}, a type of pet.", chosen by the train CLI) or several: prompt ensembling as
CoOp's ZeroshotCLIP2 (trainers/zsclip.py) computes it,

    t_c = normalize( (1/K) * sum_k normalize(f(template_k(c))) ).

The text features depend only on frozen weights: with caching on they are computed once.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..prompts import DEFAULT_TEMPLATE, PromptTemplate, check_template
from .base import Method, MethodConfig, register

#: description and recipe (methods.base.card; read by fastprompt.catalog without torch)
CARDS = {
    "zeroshot": {
        "about": "CLIP as released, prompted with CoOp's template of the dataset",
        "recipes": {"base2novel": {"epochs": 0, "warmup_epochs": 0,
                                   "source": "CoOp trainers/zsclip.py (no training)"}},
    },
}


@dataclass
class ZeroShotConfig(MethodConfig):
    templates: list = field(default_factory=lambda: [DEFAULT_TEMPLATE])


@register("zeroshot", reference=True)
class ZeroShot(Method):
    Config = ZeroShotConfig

    def __init__(self, clip, classnames, config):
        templates = [config.templates] if isinstance(config.templates, str) else config.templates
        if not templates:
            raise ValueError("zeroshot needs at least one prompt template, e.g. 'a photo of a {}.'")
        # a copy: the caller's config is left as it was
        config = dataclasses.replace(config, templates=[check_template(t) for t in templates])
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
