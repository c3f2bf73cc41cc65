"""MaPLe (deep multi-modal prompts coupled text -> vision) and IVLP (independent prompts).

Text: n_ctx learnable rows after SOS replace the embeddings of the first n_ctx words of
"a photo of a {class}." (shallow); at layers 1..J-1 deep text prompts P_i [n_ctx, 512]
replace rows 1..n_ctx (no position embedding).
Vision (MaPLe): V_0 = F_0(ctx) is appended after the 197 image tokens (after the position
embedding, before ln_pre); at layers 1..J-1 the last n_ctx rows are replaced by V_i = F_i(P_i),
F_i = Linear(512 -> 768). The J-1 deep couplings start as copies of one nn.Linear.
IVLP: the same slots, but the vision prompts are free parameters N(0, 0.02).

Original checkpoints (muzairkhattak/multimodal-prompt-learning): both trainers register the whole
model, CLIP included (ignored, compared with the backbone given). MaPLe (trainers/maple.py):
`proj` <- `prompt_learner.proj`; `deep_text.{i}` <- `prompt_learner.compound_prompts_text.{i}`;
`deep_proj.{i}` <- `prompt_learner.compound_prompt_projections.{i}` (i = 0..J-2, used at layer i+1).
IVLP (trainers/independentVL.py) keeps its prompts in the CLIP blocks: `vision.0` <-
`image_encoder.VPT`; `vision.{i}` <- `image_encoder.transformer.resblocks.{i}.VPT_shallow` and
`deep_text.{i-1}` <- `text_encoder.transformer.resblocks.{i}.VPT_shallow` (i = 1..J-1). Both use
CTX_INIT only when N_CTX <= 4.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass

from torch import nn

from ..backbone import TowerHooks
from ..original.keys import Layout, contiguous, err, first_key, given, layers
from .base import normal_, register
from .coop import LEARNER_BUFFERS, ContextPrompt, CoOpConfig, context_names, original_context

#: descriptions and recipes (methods.base.card; read by fastprompt.catalog without torch)
CARDS = {
    "maple": {
        "about": "deep prompts in both towers, vision prompts projected from text ones (MaPLe)",
        "recipes": {
            "base2novel": {"batch_size": 4, "lr": 0.0035, "epochs": 5,
                           "source": "multimodal-prompt-learning configs/trainers/MaPLe/"
                                     "vit_b16_c2_ep5_batch4_2ctx.yaml"},
            "cross": {"batch_size": 4, "lr": 0.0026, "epochs": 2, "options": {"depth": 3},
                      "source": "multimodal-prompt-learning configs/trainers/MaPLe/"
                                "vit_b16_c2_ep5_batch4_2ctx_cross_datasets.yaml"},
        },
    },
    "ivlp": {
        "about": "independent deep prompts in the text and the vision tower (IVLP)",
        "recipes": {"base2novel": {
            "batch_size": 4, "lr": 0.0035, "epochs": 5,
            "source": "multimodal-prompt-learning configs/trainers/IVLP/vit_b16_c2_ep5_batch4_2+2ctx.yaml"}},
    },
}


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


# ---------------------------------------------------------------------- original checkpoints
#: the CLIP saved in whole-model files (not learned; IVLP's `...VPT...` prompts excepted)
WHOLE_MODEL_CLIP = ("image_encoder.", "text_encoder.", "logit_scale")


def context_init(cfg: dict, n_ctx: int, always: bool = False) -> str:
    """MaPLe's and IVLP's rule: CTX_INIT (default "a photo of a") only when n_ctx <= 4."""
    init = str(cfg.get("CTX_INIT", "a photo of a") or "").replace("_", " ").strip()
    return init if n_ctx <= 4 or always else ""


def maple_names(model) -> dict[str, str]:
    out = {**context_names(model), **{f"prompt_learner.proj.{p}": f"proj.{p}" for p in ("weight", "bias")}}
    for i in range(len(model.deep_text)):
        out[f"prompt_learner.compound_prompts_text.{i}"] = f"deep_text.{i}"
        out.update({f"prompt_learner.compound_prompt_projections.{i}.{p}": f"deep_proj.{i}.{p}"
                    for p in ("weight", "bias")})
    return out


def maple_options(layout, sd, cfg, n_classes, notes, always_init: bool = False) -> dict:
    n_ctx = original_context(sd, layout, csc=False).shape[-2]
    deep = layers(sd, r"prompt_learner\.compound_prompts_text\.(\d+)")
    contiguous("prompt_learner.compound_prompts_text.{}", deep, 0)
    given(cfg, "N_CTX", n_ctx, "prompt_learner.ctx")
    given(cfg, "PROMPT_DEPTH", len(deep) + 1, "prompt_learner.compound_prompts_text.*")
    return {"depth": len(deep) + 1, "n_ctx": n_ctx, "ctx_init": context_init(cfg, n_ctx, always_init)}


def _maple_detect(keys):
    whole = first_key(keys, r"^prompt_learner\.")  # MaPLe registers the whole model
    return (first_key(keys, "compound_prompt") or whole) if whole else None


@register("maple")
class MaPLe(DeepPrompts):
    original_layout = Layout(
        "MaPLe", ("MaPLe",), "MultiModalPromptLearner", "", "MAPLE", maple_names, maple_options,
        known=frozenset({"N_CTX", "CTX_INIT", "PROMPT_DEPTH"}), kind="maple", detect=_maple_detect,
        precedence=50, ignored=LEARNER_BUFFERS, ignored_prefixes=WHOLE_MODEL_CLIP)

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


def ivlp_names(model) -> dict[str, str]:
    out = {**context_names(model), "image_encoder.VPT": "vision.0"}
    for i in range(1, len(model.vision)):
        out[f"image_encoder.transformer.resblocks.{i}.VPT_shallow"] = f"vision.{i}"
        out[f"text_encoder.transformer.resblocks.{i}.VPT_shallow"] = f"deep_text.{i - 1}"
    return out


def ivlp_options(layout, sd, cfg, n_classes, notes) -> dict:
    n_ctx = original_context(sd, layout, csc=False).shape[-2]
    if "image_encoder.VPT" not in sd:
        raise err("checkpoint lacks key 'image_encoder.VPT': IVLP without vision prompts "
                  "(PROMPT_DEPTH_VISION 0) is not supported")
    n_vis = sd["image_encoder.VPT"].shape[0]
    deep = {}
    for tower in ("text", "image"):
        key = tower + "_encoder.transformer.resblocks.{}.VPT_shallow"
        deep[tower] = layers(sd, re.escape(key).replace(r"\{\}", r"(\d+)"))
        contiguous(key, deep[tower], 1)
        given(cfg, f"PROMPT_DEPTH_{'TEXT' if tower == 'text' else 'VISION'}", len(deep[tower]) + 1,
              key.format("*"))
    given(cfg, "N_CTX_TEXT", n_ctx, "prompt_learner.ctx")
    given(cfg, "N_CTX_VISION", n_vis, "image_encoder.VPT")
    if n_vis != n_ctx or len(deep["text"]) != len(deep["image"]):
        raise err(f"checkpoint has {n_ctx} text / {n_vis} vision prompts over {len(deep['text']) + 1} / "
                  f"{len(deep['image']) + 1} layers: {layout.family} in fastprompt needs the same in "
                  f"both towers")
    return {"depth": len(deep["text"]) + 1, "n_ctx": n_ctx, "ctx_init": context_init(cfg, n_ctx)}


@register("ivlp")
class IVLP(DeepPrompts):
    Config = IVLPConfig
    original_layout = Layout(
        "IVLP", ("IVLP",), "VLPromptLearner", "", "IVLP", ivlp_names, ivlp_options,
        known=frozenset({"N_CTX_VISION", "N_CTX_TEXT", "CTX_INIT", "PROMPT_DEPTH_VISION",
                         "PROMPT_DEPTH_TEXT"}),
        kind="ivlp", detect=lambda keys: first_key(keys, r"(^|\.)VPT"), precedence=20,
        ignored=LEARNER_BUFFERS, ignored_prefixes=WHOLE_MODEL_CLIP)

    def __init__(self, clip, classnames, config):
        super().__init__(clip, classnames, config)
        dv = self.backbone.image_width
        self.vision = nn.ParameterList([normal_((config.n_ctx, dv)) for _ in range(config.depth)])

    def image_hooks(self) -> TowerHooks:
        return TowerHooks(prompts={i: p for i, p in enumerate(self.vision)})
