"""MaPLe (deep multi-modal prompts coupled text -> vision) and IVLP (independent prompts).

Text: n_ctx learnable rows after SOS replace the embeddings of the first n_ctx words of
"a photo of a {class}." (shallow); at layers 1..J-1 deep text prompts P_i [n_ctx, 512]
replace rows 1..n_ctx (no position embedding).
Vision (MaPLe): V_0 = F_0(ctx) is appended after the 197 image tokens (after the position
embedding, before ln_pre); at layers 1..J-1 the last n_ctx rows are replaced by V_i = F_i(P_i),
F_i = Linear(512 -> 768). The J-1 deep couplings start as copies of one nn.Linear.
IVLP: the same slots, but the vision prompts are free parameters N(0, 0.02).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

from ..backbone import TowerHooks
from .base import normal_, register
from .coop import ContextPrompt, CoOpConfig


@dataclass
class MaPLeConfig(CoOpConfig):
    n_ctx: int = 2
    depth: int = 9  # J: prompts in layers 0..J-1


class DeepPrompts(ContextPrompt):
    Config = MaPLeConfig

    def __init__(self, clip, classnames, config):
        super().__init__(clip, classnames, config)
        layers = min(self.backbone.n_text_layers, self.backbone.n_image_layers)
        if not 1 <= config.depth <= layers:
            raise ValueError(f"depth={config.depth} must be between 1 and {layers} (the layers of "
                             f"the backbone)")
        if getattr(config, "csc", False):
            raise ValueError(f"csc=True is not supported by {self.name}")
        dt = self.backbone.text_width
        self.deep_text = nn.ParameterList([normal_((config.n_ctx, dt)) for _ in range(config.depth - 1)])

    def text_hooks(self) -> TowerHooks:
        return TowerHooks(prompts={i + 1: p for i, p in enumerate(self.deep_text)})


@register("maple")
class MaPLe(DeepPrompts):
    def __init__(self, clip, classnames, config):
        super().__init__(clip, classnames, config)
        dt, dv = self.backbone.text_width, self.backbone.image_width
        self.proj = nn.Linear(dt, dv)
        one = nn.Linear(dt, dv)
        self.deep_proj = nn.ModuleList([copy.deepcopy(one) for _ in range(config.depth - 1)])

    def image_hooks(self) -> TowerHooks:
        prompts = {0: self.proj(self.ctx)}
        for i, (p, f) in enumerate(zip(self.deep_text, self.deep_proj)):
            prompts[i + 1] = f(p)
        return TowerHooks(prompts=prompts)


@dataclass
class IVLPConfig(MaPLeConfig):
    #: the released IVLP scripts' depth in both towers (configs/trainers/IVLP/
    #: vit_b16_c2_ep5_batch4_2+2ctx.yaml: PROMPT_DEPTH_VISION = PROMPT_DEPTH_TEXT = 12; the code's
    #: default is 9): 12 x 2 x (512 + 768) = 30,720 parameters on ViT-B/16
    depth: int = 12


@register("ivlp")
class IVLP(DeepPrompts):
    Config = IVLPConfig

    def __init__(self, clip, classnames, config):
        super().__init__(clip, classnames, config)
        dv = self.backbone.image_width
        self.vision = nn.ParameterList([normal_((config.n_ctx, dv)) for _ in range(config.depth)])

    def image_hooks(self) -> TowerHooks:
        return TowerHooks(prompts={i: p for i, p in enumerate(self.vision)})
