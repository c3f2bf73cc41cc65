"""CoOp: learnable context vectors after SOS, shared by all classes (or one set per class).

Sequence: [SOS] ctx_1..ctx_n {class tokens} . [EOS], position embedding added to all of it.
The context is initialised from the token embeddings of `ctx_init` ("a photo of a": n_ctx = its
token count) or, with ctx_init="", drawn from N(0, 0.02) over the placeholder prompt "X X X X".
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..backbone import insert_rows
from .base import Method, MethodConfig, normal_, register


@dataclass
class CoOpConfig(MethodConfig):
    n_ctx: int = 4
    ctx_init: str = "a photo of a"
    csc: bool = False  # class-specific context: one [n_ctx, D] per class


def context_template_prefix(ctx_init: str, n_ctx: int) -> str:
    return ctx_init if ctx_init else " ".join(["X"] * n_ctx)


class ContextPrompt(Method):
    """Methods whose text prompt starts with n_ctx learnable vectors (CoOp, CoCoOp, MaPLe, IVLP)."""

    Config = CoOpConfig

    def __init__(self, clip, classnames, config):
        config.prompt = context_template_prefix(config.ctx_init, config.n_ctx)
        super().__init__(clip, classnames, config)
        n_prefix = self.template.name_start - 1
        if not 1 <= config.n_ctx <= max(n_prefix, 1) or (config.ctx_init and config.n_ctx > n_prefix):
            raise ValueError(f"n_ctx={config.n_ctx} does not fit ctx_init '{config.ctx_init}' "
                             f"({n_prefix} tokens): use n_ctx <= {n_prefix} or another ctx_init")
        rows = (len(self.classnames),) if getattr(config, "csc", False) else ()
        if config.ctx_init:
            init = self.template.embeddings[0, 1:1 + config.n_ctx].detach().clone()
            self.ctx = nn.Parameter(init.expand(*rows, *init.shape).clone())
        else:
            self.ctx = normal_((*rows, config.n_ctx, self.backbone.text_width))

    def context_for(self, template) -> torch.Tensor:
        """The context rows for a template: shared, or (csc) those of each of its classes."""
        if self.ctx.dim() == 2 or template is self.template:
            return self.ctx
        index = {c: i for i, c in enumerate(self.classnames)}
        unknown = [c for c in template.classnames if c not in index]
        if unknown:
            raise ValueError(f"class-specific context (csc=True) exists only for the training "
                             f"classes, not for '{unknown[0]}'")
        rows = torch.tensor([index[c] for c in template.classnames], device=self.ctx.device)
        return self.ctx[rows]

    def text_embeddings(self, template):
        return insert_rows(template.embeddings, self.context_for(template), 1)


@register("coop")
class CoOp(ContextPrompt):
    pass
