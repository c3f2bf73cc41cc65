"""CoOp: learnable context vectors after SOS, shared by all classes (or one set per class).

Sequence: [SOS] ctx_1..ctx_n {class tokens} . [EOS], position embedding added to all of it.
The context is initialised from the token embeddings of `ctx_init` ("a photo of a": n_ctx = its
token count) or, with ctx_init="", drawn from N(0, 0.02) over the placeholder prompt "X X X X".

Original checkpoints (KaiyangZhou/CoOp trainers/coop.py): the trainer registers the prompt learner
alone; `ctx` <- `prompt_learner.ctx` ([n_ctx, D], CSC: [C, n_ctx, D]); its token buffers
`token_prefix` / `token_suffix` are not learned. CoCoOp and LAMM's CoOp trainer save the same learner.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..backbone import insert_rows
from ..original.keys import Layout, err, file_key, flag, given
from .base import Method, MethodConfig, normal_, register

#: description and recipes (methods.base.card; read by fastprompt.catalog without torch)
CARDS = {
    "coop": {
        "about": "4 learned context words before the class name (CoOp)",
        "recipes": {
            "base2novel": {"batch_size": 32, "lr": 0.002, "epochs": 200,
                           "source": "CoOp configs/trainers/CoOp/vit_b16_ctxv1.yaml"},
            "cross": {"batch_size": 32, "lr": 0.002, "epochs": 50,
                      "source": "CoOp configs/trainers/CoOp/vit_b16_ep50_ctxv1.yaml (ImageNet)"},
        },
        "datasets": {"imagenet": {"epochs": 50}},  # CoOp's *_ep50 configs for ImageNet
    },
}


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
        # a copy: the caller's config is left as it was
        config = dataclasses.replace(config, prompt=context_template_prefix(config.ctx_init, config.n_ctx))
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


# ---------------------------------------------------------------------- original checkpoints
#: the CoOp prompt learner's token buffers (every prompt-learner checkpoint holds them)
LEARNER_BUFFERS = ("prompt_learner.token_prefix", "prompt_learner.token_suffix")


def context_names(model) -> dict[str, str]:
    return {"prompt_learner.ctx": "ctx"}


def original_context(sd: dict, layout: Layout, csc: bool) -> torch.Tensor:
    """`prompt_learner.ctx` of a state dict: [n_ctx, D], or with `csc` also [C, n_ctx, D]."""
    ctx = sd.get("prompt_learner.ctx")
    if ctx is None or ctx.dim() not in (2, 3) or (ctx.dim() == 3 and not csc):
        what = "missing" if ctx is None else f"of shape {tuple(ctx.shape)}"
        raise err(f"checkpoint key '{file_key(layout, 'prompt_learner.ctx')}' is {what}: expected "
                  f"[n_ctx, D]{' or [classes, n_ctx, D] (CSC)' if csc else ''}")
    return ctx


def coop_options(layout: Layout, sd: dict, cfg: dict, n_classes: int, notes=None, *,
                 csc: bool = True, default_init: str = "") -> dict:
    """CoOp's rule: with CTX_INIT, n_ctx = its number of words (CSC then ignored: ctx is
    [n_ctx, D]); without, n_ctx = N_CTX and the prompt prefix is "X X ... X". `default_init`:
    CTX_INIT when the config does not give one (CoOp's code: none)."""
    ctx = original_context(sd, layout, csc)
    n_ctx, is_csc = ctx.shape[-2], ctx.dim() == 3
    init = str(cfg.get("CTX_INIT", default_init) or "").replace("_", " ").strip()
    if init and len(init.split(" ")) != n_ctx:
        if "CTX_INIT" in cfg:
            raise err(f"checkpoint key 'ctx' has n_ctx={n_ctx}, CTX_INIT '{init}' has "
                      f"{len(init.split(' '))} words")
        init = ""  # the default does not fit this checkpoint: it was trained without one
    if not init:
        given(cfg, "N_CTX", n_ctx, "ctx")
    if is_csc and ctx.shape[0] != n_classes:
        raise err(f"checkpoint key 'ctx' holds {ctx.shape[0]} class-specific contexts but "
                  f"{n_classes} class names were given")
    if "CSC" in cfg and flag(cfg["CSC"]) != is_csc and not (flag(cfg["CSC"]) and init):
        raise err(f"checkpoint key 'ctx' has shape {tuple(ctx.shape)} but the config says CSC={cfg['CSC']}")
    if str(cfg.get("CLASS_TOKEN_POSITION", "end")).lower() != "end":
        raise err(f"CLASS_TOKEN_POSITION={cfg['CLASS_TOKEN_POSITION']!r} is not supported: "
                  f"fastprompt puts the class name after the context ('end') only")
    opts = {"n_ctx": n_ctx, "ctx_init": init}
    return {**opts, "csc": is_csc} if csc else opts


COOP_LAYOUT = Layout(
    "CoOp", ("CoOp",), "prompt_learner", "prompt_learner", "COOP", context_names, coop_options,
    known=frozenset({"N_CTX", "CSC", "CTX_INIT", "CLASS_TOKEN_POSITION"}), kind="coop",
    detect=lambda keys: "ctx" if "ctx" in keys else None, precedence=90, ignored=LEARNER_BUFFERS)


@register("coop")
class CoOp(ContextPrompt):
    original_layout = COOP_LAYOUT
