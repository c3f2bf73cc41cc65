"""KgCoOp: CoOp's context kept close to the hand-written prompt's text features.

CoOp (4 context vectors from "a photo of a", class name at the end) trained with

    L = CE(z, y) + W * (1 - mean_c cos(t_c, t^hand_c)),     W = 8 (every released script)

(htyao89/KgCoOp `KgCoOp/trainers/kgcoop.py`, `CustomCLIP.forward` and `forward_backward`; paper
eq. 5 writes the same distance as lambda * ||t - t^hand||^2 / 2 of unit vectors: W 8 is lambda 4).
t_c is the normalised prompted text feature of class c, t^hand_c the normalised feature of the
frozen CLIP for ONE hand-written prompt of the run's dataset — KgCoOp's own table
(`TEACHER_TEMPLATES`, its `CUSTOM_TEMPLATES`: CoOp's except DTD, "a photo of a {}, a type of
texture."), computed once per class list; the cosine uses eps 1e-7. `fastprompt.fit` fills
`teacher_template` from the dataset (`dataset_options`); elsewhere it is "a photo of a {}." unless
given. Evaluation is CoOp's.

Original checkpoints: `prompt_learner/model.pth.tar-N` (the prompt learner alone): CoOp's `ctx`,
token buffers, and the unused `bias_vectors` [1, 512] and `meta_net.linear1` (created, never used
in the forward; ignored with a note). `TRAINER.COOP.CTX_INIT` is a switch: any true value means
the hard-coded "a photo of a" (n_ctx 4); false means N_CTX vectors from N(0, 0.02), CSC allowed.
`DATASET.NAME` (CoOp's names) picks the teacher prompt, as in the code; without it the import
keeps "a photo of a {}." (evaluation does not use the teacher).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..original.keys import Layout, err, file_key, first_key, given
from ..prompts import DEFAULT_TEMPLATE, check_template
from .base import register
from .coop import LEARNER_BUFFERS, ContextPrompt, CoOpConfig, context_names, original_context

#: description and recipe (methods.base.card; read by fastprompt.catalog without torch). The
#: other protocols use it too (KgCoOp's xd_train.sh passes the same config)
CARDS = {
    "kgcoop": {
        "about": "CoOp's context kept near the hand-written prompt's text features (KgCoOp)",
        "recipes": {"base2novel": {
            "batch_size": 128, "lr": 0.002, "epochs": 100,
            "source": "KgCoOp configs/trainers/KgCoOp/vit_b16_ep100_ctxv1.yaml, scripts/"
                      "base2new_train.sh (W 8)"}},
    },
}

#: the teacher prompt of each dataset (KgCoOp trainers/kgcoop.py CUSTOM_TEMPLATES, by fastprompt's
#: dataset names); other datasets (folders, generated ones): "a photo of a {}."
TEACHER_TEMPLATES = {
    "oxford_pets": "a photo of a {}, a type of pet.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "dtd": "a photo of a {}, a type of texture.",
    "eurosat": "a centered satellite photo of {}.",
    "stanford_cars": "a photo of a {}.",
    "food101": "a photo of {}, a type of food.",
    "sun397": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenet": "a photo of a {}.",
    "imagenet_sketch": "a photo of a {}.",
    "imagenetv2": "a photo of a {}.",
    "imagenet_a": "a photo of a {}.",
    "imagenet_r": "a photo of a {}.",
}


@dataclass
class KgCoOpConfig(CoOpConfig):
    weight: float = 8.0                       # W (TRAINER.COOP.W of the released scripts)
    teacher_template: str = DEFAULT_TEMPLATE  # the dataset's hand-written prompt

    def __post_init__(self):
        from ..errors import InputError

        try:
            check_template(self.teacher_template)
        except ValueError as e:
            raise InputError(f"option 'teacher_template': {e}") from None


# ---------------------------------------------------------------------- original checkpoints
#: created by KgCoOp's PromptLearner, saved, never used in its forward
_UNUSED = ("prompt_learner.bias_vectors", "prompt_learner.meta_net.linear1.weight",
           "prompt_learner.meta_net.linear1.bias")
_INIT = "a photo of a"  # what any true CTX_INIT means in KgCoOp's code


def _switch(value) -> bool:
    """CTX_INIT as KgCoOp's `if ctx_init:` reads it (YAML True, or a text; "False" from a mapping)."""
    if isinstance(value, str):
        return value.strip().lower() not in ("", "false", "0", "no", "off", "none")
    return bool(value)


def _kgcoop_options(layout, sd, cfg, n_classes, notes) -> dict:
    ctx = original_context(sd, layout, csc=True)
    n_ctx, csc = ctx.shape[-2], ctx.dim() == 3
    key = file_key(layout, "prompt_learner.ctx")
    # no config: the released one (CTX_INIT True) when the tensor fits it
    init = _switch(cfg["CTX_INIT"]) if "CTX_INIT" in cfg else (not csc and n_ctx == 4)
    if init and (csc or n_ctx != 4):
        raise err(f"checkpoint key '{key}' has shape {tuple(ctx.shape)}, but CTX_INIT makes KgCoOp's "
                  f"context the 4 vectors of '{_INIT}': pass the run's CTX_INIT")
    if not init:
        given(cfg, "N_CTX", n_ctx, key)
    if csc and ctx.shape[0] != n_classes:
        raise err(f"checkpoint key '{key}' holds {ctx.shape[0]} class-specific contexts but "
                  f"{n_classes} class names were given")
    if "CSC" in cfg and not init and _switch(cfg["CSC"]) != csc:
        raise err(f"checkpoint key '{key}' has shape {tuple(ctx.shape)} but the config says CSC={cfg['CSC']}")
    unused = sorted({file_key(layout, k).split(".")[0] for k in _UNUSED if k in sd})
    if unused:
        notes.append(f"checkpoint keys {', '.join(repr(u) for u in unused)} are created but never used "
                     f"by KgCoOp's forward: ignored")
    opts = {"n_ctx": n_ctx, "ctx_init": _INIT if init else "", "csc": csc}
    if cfg.get("W") is not None:
        opts["weight"] = float(cfg["W"])
    if cfg.get("DATASET.NAME"):  # the teacher prompt of the run's dataset, as the code picks it
        from ..data import DataError, canonical_name

        try:
            dataset = canonical_name(str(cfg["DATASET.NAME"]))
        except DataError:
            dataset = None
        if dataset not in TEACHER_TEMPLATES:
            raise err(f"config DATASET.NAME={cfg['DATASET.NAME']!r} has no prompt in KgCoOp's "
                      f"table (CUSTOM_TEMPLATES: {', '.join(sorted(TEACHER_TEMPLATES))})")
        opts["teacher_template"] = TEACHER_TEMPLATES[dataset]
    return opts


@register("kgcoop")
class KgCoOp(ContextPrompt):
    Config = KgCoOpConfig
    original_layout = Layout(
        "KgCoOp", ("KgCoOp",), "prompt_learner", "prompt_learner", "COOP", context_names,
        _kgcoop_options, known=frozenset({"N_CTX", "CSC", "CTX_INIT", "CLASS_TOKEN_POSITION", "W"}),
        flags=frozenset({"DATASET.NAME"}), kind="kgcoop", precedence=25,
        detect=lambda keys: first_key(keys, r"(^|\.)bias_vectors$"),
        ignored=LEARNER_BUFFERS + _UNUSED,
        markers=lambda model: {"prompt_learner.bias_vectors": torch.zeros(1, model.backbone.text_width)})

    @classmethod
    def dataset_options(cls, dataset: str) -> dict:
        return {"teacher_template": TEACHER_TEMPLATES.get(dataset, DEFAULT_TEMPLATE)}

    def teacher_features(self) -> torch.Tensor:
        """t^hand: the normalised frozen text features of the teacher prompt [C, E]."""
        return F.normalize(self.frozen_text_features((self.config.teacher_template,)), dim=-1)

    def begin_training(self, context) -> None:
        self.teacher_features()  # once, before the first step (the released code: at build time)

    def loss_terms(self, images: torch.Tensor, labels: torch.Tensor):
        """({"ce", "kg"}: the released terms, W applied; the logits)."""
        text = self.text_features()
        logits = self.logits_from(self.image_features(images), text)
        cos = F.cosine_similarity(text, self.teacher_features(), dim=1, eps=1e-7)
        return {"ce": F.cross_entropy(logits, labels), "kg": self.config.weight * (1.0 - cos.mean())}, logits

    def loss_and_logits(self, images, labels):
        terms, logits = self.loss_terms(images, labels)
        return terms["ce"] + terms["kg"], logits
