"""LAMM: learnable label embeddings and the hierarchical loss, alone or on CoOp / MaPLe.

Each training class c owns L_c [m, 512], initialised from the token embeddings of the first m BPE
tokens of its name (m = the shortest name length, or 1 on MaPLe); the rest of the name is fixed:
[SOS] ctx {L_c} {rest of name} . [EOS].  The objective is

  CE(s, y) + w_p * sum (L - L0)^2                                   (parameter space, w_p = 1/shots)
  + mean_i [1 - cos(t_{y_i}, stopgrad(t0_{y_i}))]                   (feature space; >= 2 labels)
  + lambda_l * T^2 * CE(s0 / T, softmax(s / T))                      (logit space, T = 2, lambda_l = 0.05)

where t0 / s0 are the text features / logits of the same prompt with the initial label
embeddings L0 (neither side of the logit term is detached, as in the released code).
Classes never trained keep their original name embeddings.
Two facts of the released code (gaojingsheng/LAMM) are options of their own:
* `param_weight`: w_p; None is the paper's 1/shots. The released scripts never pass `--shots`, so
  their weight was 1 (`param_weight=1`); a checkpoint's config says which it trained with.
* `label_layout` (MaPLe+LAMM): "name" (the paper: the label over the class name) or "of" (the
  released trainers/maple.py: the label over the token right after the context — the word "of" —
  while the class tokens stay fixed); the label still starts from, and is regularised toward, the
  class name's first token, while t0 is the plain prompt ("of").
`released_code=True` is shorthand for both released settings.

Original checkpoints (gaojingsheng/LAMM): the CoOp or MaPLe learner of its trainers plus
`label_emb` <- `prompt_learner.token_classes` ([C, m, D]; its frozen twin `fix_token` and
`token_suffix_test` are skipped). LAMM's train.py sets `shots`, `origin_clip` (a frozen context:
lamm), ... from its command line; `--shots` defaults to 1 and the released scripts never pass it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import insert_rows
from ..original.keys import Layout, err, first_key, flag
from .base import register
from .coop import LEARNER_BUFFERS, ContextPrompt, CoOpConfig, context_names, coop_options
from .maple import WHOLE_MODEL_CLIP, MaPLe, MaPLeConfig, maple_names, maple_options

#: descriptions and recipes (methods.base.card; read by fastprompt.catalog without torch);
#: LAMM released no cross-dataset recipe
CARDS = {
    "lamm": {
        "about": "learned label embeddings in place of the class names, context frozen (LAMM)",
        "recipes": {"base2novel": {"batch_size": 32, "lr": 0.002, "epochs": 50,
                                   "source": "LAMM configs/trainers/CoOp/vit_b16_ep50_ctxv1.yaml"}},
    },
    "coop+lamm": {
        "about": "CoOp's context and LAMM's label embeddings, trained together",
        "recipes": {"base2novel": {"batch_size": 32, "lr": 0.002, "epochs": 50,
                                   "source": "LAMM configs/trainers/CoOp/vit_b16_ep50_ctxv1.yaml"}},
    },
    "maple+lamm": {
        "about": "MaPLe's prompts and LAMM's label embeddings, trained together",
        "recipes": {"base2novel": {
            "batch_size": 4, "lr": 0.0035, "epochs": 5,
            "source": "LAMM configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml"}},
    },
}


LABEL_LAYOUTS = ("name", "of")


@dataclass
class LammOptions:
    shots: int = 16
    n_label_tokens: int = 0          # m; 0 = the shortest class name in tokens
    param_weight: float | None = None  # w_p; None = 1/shots (paper), 1 = the released scripts
    label_layout: str = "name"       # "name" (paper) | "of" (released MaPLe+LAMM)
    released_code: bool = False      # shorthand: param_weight=1 and, on MaPLe, label_layout="of"
    temperature: float = 2.0
    logit_weight: float = 0.05
    feature_weight: float = 1.0

    def released_settings(self, layout: str) -> None:
        """Apply `released_code` (refusing settings that contradict it); check the layout."""
        if self.released_code:
            if self.param_weight not in (None, 1, 1.0) or self.label_layout not in ("name", layout):
                raise ValueError("released_code=True means param_weight=1 and the released label "
                                 "layout: drop it or the contradicting option")
            self.param_weight, self.label_layout = 1.0, layout
        if self.label_layout not in LABEL_LAYOUTS:
            raise ValueError(f"label_layout must be one of {LABEL_LAYOUTS}, got {self.label_layout!r}")

    @property
    def param_term_weight(self) -> float:
        return 1.0 / self.shots if self.param_weight is None else float(self.param_weight)


@dataclass
class LammConfig(CoOpConfig, LammOptions):
    def __post_init__(self):
        self.released_settings("name")  # LAMM's CoOp trainer puts the label over the class name
        if self.label_layout != "name":
            raise ValueError("label_layout='of' exists only for maple+lamm (the released MaPLe "
                             "trainer); lamm and coop+lamm put the label over the class name")


@dataclass
class MaPLeLammConfig(MaPLeConfig, LammOptions):
    n_label_tokens: int = 1

    def __post_init__(self):
        self.released_settings("of")


class LabelAlignment:
    """Mixin over a ContextPrompt method: label rows, their substitution, and the LAMM loss."""

    train_context: bool = True

    def _init_labels(self):
        cfg, tpl = self.config, self.template
        m = cfg.n_label_tokens or min(tpl.name_lengths)
        # "of": the row right after the context (row 3 with MaPLe's 2 context vectors)
        self.label_start = tpl.name_start if cfg.label_layout == "name" else 1 + cfg.n_ctx
        if m < 1 or self.label_start + m > int(tpl.eot.min()):
            raise ValueError(f"{m} label tokens from row {self.label_start} do not fit every prompt")
        if m < 1 or tpl.name_start + m > int(tpl.eot.min()):
            raise ValueError(f"{m} label tokens do not fit every class name")
        # initial value and regularisation anchor: the first m tokens of each class name
        init = tpl.embeddings[:, tpl.name_start:tpl.name_start + m].detach().clone()
        self.label_emb = nn.Parameter(init.clone())
        self.register_buffer("label_init", init, persistent=False)
        self._class_index = {c: i for i, c in enumerate(self.classnames)}
        if not self.train_context:
            if not cfg.ctx_init:
                raise ValueError(f"{self.name} keeps the context frozen: it needs ctx_init text")
            self.ctx.requires_grad_(False)

    def label_rows(self, template, initial: bool = False) -> torch.Tensor:
        """[C, m, D] label rows for a template's classes: learned for trained classes, the
        template's own (original) embeddings for the others; `initial`: the original prompt's rows
        (those give t0; in the released MaPLe+LAMM layout they hold the word "of")."""
        s, m = self.label_start, self.label_emb.shape[1]
        if template is self.template and not initial:
            return self.label_emb
        own = template.embeddings[:, s:s + m]
        idx = [self._class_index.get(c, -1) for c in template.classnames]
        if initial or all(i < 0 for i in idx):
            return own
        known = torch.tensor([i >= 0 for i in idx], device=own.device)
        learned = self.label_emb[torch.tensor([max(i, 0) for i in idx], device=own.device)]
        return torch.where(known[:, None, None], learned, own)

    def text_embeddings(self, template, initial: bool = False):
        emb = super().text_embeddings(template)
        return insert_rows(emb, self.label_rows(template, initial), self.label_start)

    def initial_text_features(self) -> torch.Tensor:
        """t0: the training prompts with the initial label embeddings (constant when the context
        is frozen, so cached then)."""
        def compute():
            emb = self.text_embeddings(self.template, initial=True)
            return F.normalize(self.encode_text(self.template, emb), dim=-1)
        if self.train_context or self.text_hooks().prompts:
            return compute()
        return self.cached(("t0", self.template.key), compute)

    def loss_and_logits(self, images: torch.Tensor, labels: torch.Tensor):
        cfg = self.config
        img = self.image_features(images)
        t, t0 = self.text_features(), self.initial_text_features()
        logits, fixed = self.logits_from(img, t), self.logits_from(img, t0)
        loss = F.cross_entropy(logits, labels)
        loss = loss + cfg.param_term_weight * (self.label_emb - self.label_init).pow(2).sum()
        # feature term, skipped when the batch holds one label (as a mask: no host sync)
        several = (labels != labels[:1]).any().to(loss.dtype)
        cos = F.cosine_similarity(t[labels], t0[labels].detach(), dim=-1)
        loss = loss + several * cfg.feature_weight * (1 - cos).mean()
        T = cfg.temperature
        soft = F.cross_entropy(fixed / T, F.softmax(logits / T, dim=-1))
        return loss + cfg.logit_weight * T * T * soft, logits


# ---------------------------------------------------------------------- original checkpoints
_LAMM_BUFFERS = LEARNER_BUFFERS + ("prompt_learner.token_suffix_test", "prompt_learner.fix_token")
#: LAMM's train.py sets these top-level cfg attributes from its command-line flags
_LAMM_FLAGS = frozenset({"shots", "triplet_loss", "origin_clip", "random_init", "eval_only"})
_COOP_KNOWN = frozenset({"N_CTX", "CSC", "CTX_INIT", "CLASS_TOKEN_POSITION"})


def _label_names(names):
    return lambda model: {**names(model), "prompt_learner.token_classes": "label_emb"}


def lamm_options(cfg: dict, notes: list[str], frozen_context: bool) -> dict:
    """What LAMM's flags tell: `shots` (the parameter term's 1/shots, LAMM's --shots: 1 unless
    passed) and whether the context was frozen (`origin_clip`), checked against the method."""
    shots = int(cfg.get("shots") or 1)
    if "origin_clip" in cfg and flag(cfg["origin_clip"]) != frozen_context:
        raise err(f"config origin_clip={cfg['origin_clip']} means a " + (
            "frozen context: import it as lamm" if flag(cfg["origin_clip"]) else
            "trained context: import it as coop+lamm"))
    if "triplet_loss" in cfg and not flag(cfg["triplet_loss"]):
        notes.append("config triplet_loss=False: the original trained with cross-entropy only; "
                     "fastprompt's LAMM loss adds the three alignment terms (eval is unaffected)")
    if flag(cfg.get("random_init")):
        notes.append("config random_init=True: the original anchored the label embeddings to random "
                     "values; fastprompt anchors them to the class-name embeddings (eval is unaffected)")
    return {"shots": shots}


def _coop_lamm_options(frozen_context: bool):
    def read(layout, sd, cfg, n_classes, notes):  # LAMM's shipped config: CTX_INIT "a photo of a"
        opts = coop_options(layout, sd, cfg, n_classes, default_init="a photo of a")
        return {**opts, **lamm_options(cfg, notes, frozen_context)}
    return read


def _maple_lamm_options(layout, sd, cfg, n_classes, notes):
    opts = maple_options(layout, sd, cfg, n_classes, notes, always_init=True)  # LAMM: always CTX_INIT
    # the released MaPLe trainer's label position
    return {**opts, **lamm_options(cfg, notes, False), "label_layout": "of"}


def _coop_lamm_layout(family: str, frozen_context: bool, **detection) -> Layout:
    return Layout(family, ("CoOp",), "prompt_learner", "prompt_learner", "COOP",
                  _label_names(context_names), _coop_lamm_options(frozen_context), known=_COOP_KNOWN,
                  flags=_LAMM_FLAGS, kind="lamm", ignored=_LAMM_BUFFERS,
                  frozen=frozenset({"ctx"} if frozen_context else ()), **detection)


def _maple_lamm_detect(keys):
    label = first_key(keys, r"(^|\.)token_classes$")
    return label if label and first_key(keys, r"^prompt_learner\.") else None


@register("lamm")
class Lamm(LabelAlignment, ContextPrompt):
    """Label embeddings only: the CoOp context stays at "a photo of a"."""

    Config = LammConfig
    train_context = False
    original_layout = _coop_lamm_layout(
        "LAMM (CoOp trainer, --origin-clip)", True, precedence=60,
        detect=lambda keys: first_key(keys, r"(^|\.)token_classes$"))

    def __init__(self, clip, classnames, config):
        super().__init__(clip, classnames, config)
        self._init_labels()


@register("coop+lamm")
class CoOpLamm(Lamm):
    train_context = True
    original_layout = _coop_lamm_layout("CoOp+LAMM", False)  # detected as lamm's


@register("maple+lamm")
class MaPLeLamm(LabelAlignment, MaPLe):
    Config = MaPLeLammConfig
    original_layout = Layout(
        "MaPLe+LAMM", ("MaPLe",), "MultiModalPromptLearner", "", "MAPLE", _label_names(maple_names),
        _maple_lamm_options, known=MaPLe.original_layout.known, flags=_LAMM_FLAGS, kind="maple+lamm",
        detect=_maple_lamm_detect, precedence=40, ignored=_LAMM_BUFFERS,
        ignored_prefixes=WHOLE_MODEL_CLIP)

    def __init__(self, clip, classnames, config):
        super().__init__(clip, classnames, config)
        self._init_labels()
