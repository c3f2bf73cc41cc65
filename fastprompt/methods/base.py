"""What every method shares: the registry, options, text/image features, logits, loss, classifier.

A method subclasses `Method`, owns only its learnable tensors, and overrides some of:
  - `text_embeddings(template)`  token embeddings [C, L, D] with its shallow text prompts in place
  - `text_hooks()` / `image_hooks()`  deep prompts and adapters per layer (backbone.TowerHooks)
  - `loss(images, labels)`  when the objective is more than cross-entropy
Logits are CLIP's: `logit_scale.exp() * normalize(image) @ normalize(text).T`.

Everything else about a method lives in its own file (how to add one: README, "How the code is
laid out"): its `Config` dataclass (what defines the model, saved in config.json), its card in the
file's `CARDS` dict (the one-line description and the training recipes, plain literals that
`fastprompt.catalog` also reads without importing torch), and its `original_layout` (the map to the
authors' checkpoints, `fastprompt.original.keys.Layout`). How fast it runs is not part of the
config: `model.runtime` (`backbone.RunOptions`: kernels, text shortcut, caches, text chunks).
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import NO_HOOKS, Backbone, RunOptions, TowerHooks
from ..clip import Clip
from ..prompts import PromptTemplate

#: name -> class, in registration order (the order of methods/__init__.MODULES: tables, --help)
METHODS: dict[str, type["Method"]] = {}
_REFERENCE: list[str] = []


def register(name: str, *, reference: bool = False):
    """Class decorator: register a method under `name`. Its file must hold `CARDS[name]` (see
    `card`); `reference=True` marks the zero-shot baseline other runs are compared with."""
    def wrap(cls):
        cards = getattr(sys.modules.get(cls.__module__), "CARDS", {})
        if name not in cards:
            raise TypeError(f"method '{name}' has no entry in CARDS of {cls.__module__}: add its "
                            f"description and recipes there")
        if name in METHODS:
            raise TypeError(f"method '{name}' is registered twice")
        cls.name = name
        METHODS[name] = cls
        if reference:
            _REFERENCE.append(name)
        return cls
    return wrap


def list_methods() -> list[str]:
    """The registered names, sorted (`METHODS` keeps the registration order)."""
    return sorted(METHODS)


def reference_method() -> str:
    """The name of the zero-shot baseline (the method registered with `reference=True`)."""
    if len(_REFERENCE) != 1:
        raise RuntimeError(f"expected one reference method, found {_REFERENCE}")
    return _REFERENCE[0]


def card(name: str) -> dict:
    """A method's card: the entry `name` of the `CARDS` dict in its class's file, a literal
    {"about": one line, "recipes": {protocol: Recipe fields}, "datasets": {dataset: departures}}
    (fastprompt.recipes builds the Recipe objects; fastprompt.catalog reads the same literal)."""
    return sys.modules[METHODS[name].__module__].CARDS[name]


@dataclass
class MethodConfig:
    """What defines a model beyond its tensors (saved in config.json; how fast it runs is not:
    that is `Method.runtime`)."""

    prompt: str = "a photo of a"  # hand-written prompt prefix ("{prompt} {class}.")

    @classmethod
    def from_options(cls, method: str, options: dict, also: tuple = ()) -> "MethodConfig":
        """The config of `method` from keyword options, each coerced by its field's type
        (`fastprompt.options`: "False" -> False for a bool, "3" -> 3 for an int); an unknown name
        or a value that does not fit is an InputError naming the option (`also`: other valid
        names to list, the runtime switches)."""
        from ..errors import InputError
        from ..options import coerce_all

        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise InputError(f"unknown option '{unknown[0]}' for method '{method}'; valid options: "
                             f"{', '.join(sorted(names | set(also)))}")
        return cls(**coerce_all(cls, f"method '{method}'", options))


class Method(nn.Module):
    name: ClassVar[str] = "?"
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    #: the map to the authors' checkpoints (fastprompt.original.keys.Layout); None: no original
    original_layout: ClassVar = None
    #: False for methods whose text features depend on the image (CoCoOp)
    caches_text: ClassVar[bool] = True
    #: options that training sets (Tip-Adapter's searched alpha, beta and its cache size): a run's
    #: config.json holds the fitted values, not the ones the run was asked for
    fitted_options: ClassVar[tuple] = ()

    def __init__(self, clip: Clip, classnames: list[str], config: MethodConfig):
        super().__init__()
        self.clip = clip
        self.backbone = Backbone(clip)
        self.config = config
        #: how it runs (not saved): fused kernels, the exact text shortcut, caches, text chunks
        self.runtime = RunOptions()
        self.classnames = [str(c) for c in classnames]
        if len(set(self.classnames)) != len(self.classnames):
            raise ValueError("duplicate class names: each class needs a distinct name")
        self.template = self.make_template(self.classnames)
        self._cache: dict = {}

    # ----------------------------------------------------------------- options and helpers
    @property
    def opts(self) -> RunOptions:
        """The runtime switches (`self.runtime`) as the backbone takes them."""
        return self.runtime

    def set_fast(self, fast: bool) -> "Method":
        """Turn every optimisation on (fast) or off (the original-style baseline); `text_chunk`
        is kept. Only `self.runtime` changes: a saved model reloads fast either way."""
        self.runtime = dataclasses.replace(self.runtime, kernels=fast, truncate_text=fast, cache=fast)
        self._cache.clear()
        return self

    def make_template(self, classnames: list[str]) -> PromptTemplate:
        return PromptTemplate(self.backbone, classnames, prefix=self.config.prompt)

    def cached(self, key, fn):
        """fn() once per key (plus device and autocast dtype) when caching is on; exact for
        values that depend only on frozen weights and fixed inputs."""
        if not self.runtime.cache:
            return fn()
        dev = self.backbone.model.logit_scale.device
        amp = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else None
        full = (key, str(dev), amp)
        if full not in self._cache:
            with torch.no_grad():
                self._cache[full] = fn()
        return self._cache[full]

    def _apply(self, fn, *args, **kwargs):  # .to()/.cuda(): drop device-bound caches
        self._cache.clear()
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.train(mode)
        return self

    # ----------------------------------------------------------------- to override
    def text_embeddings(self, template: PromptTemplate) -> torch.Tensor:
        return template.embeddings

    def text_hooks(self) -> TowerHooks:
        return NO_HOOKS

    def image_hooks(self) -> TowerHooks:
        return NO_HOOKS

    # ----------------------------------------------------------------- features and logits
    def encode_text(self, template: PromptTemplate, embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """Un-normalised text features [C, E] of a template under this method's prompts and
        hooks; `embeddings` replaces `text_embeddings(template)` (e.g. LAMM's initial labels)."""
        emb = self.text_embeddings(template) if embeddings is None else embeddings
        return self.backbone.encode_text(emb, template.eot, self.text_hooks(), self.opts,
                                         used=template.used_tokens)

    def text_features(self, template: PromptTemplate | None = None) -> torch.Tensor:
        return F.normalize(self.encode_text(template or self.template), dim=-1)

    def image_features(self, images: torch.Tensor, hooks: TowerHooks | None = None) -> torch.Tensor:
        hooks = self.image_hooks() if hooks is None else hooks
        return F.normalize(self.backbone.encode_image(images, hooks, self.opts), dim=-1)

    def logit_scale(self) -> torch.Tensor:
        """The factor of the cosine logits: CLIP's exp(logit_scale) (CLIP-LoRA: the integer 100)."""
        return self.backbone.logit_scale()

    def frozen_text_features(self, templates, classnames: list[str] | None = None) -> torch.Tensor:
        """The mean over `templates` of the un-normalised text features [C, E] of the frozen CLIP
        (no prompt, no hook) for `classnames` (default: the training classes). What PromptSRC's
        (60 templates) and KgCoOp's (the dataset's one) teachers are; their code computes them
        once, when the model is built, in fp32. So here: once per templates, classes and device
        (kept whatever `runtime.cache` says), without a graph and without autocast."""
        names = tuple(self.classnames if classnames is None else classnames)
        dev = self.backbone.model.logit_scale.device
        key = ("frozen_text", tuple(templates), names, str(dev))
        if key not in self._cache:
            parts = []
            with torch.no_grad(), torch.autocast(dev.type, enabled=False):
                for i in range(0, len(names), 256):  # bounded memory for 1000+ classes
                    chunk = [PromptTemplate(self.backbone, list(names[i:i + 256]), fmt=f) for f in templates]
                    feats = [self.backbone.encode_text(t.embeddings, t.eot, NO_HOOKS, self.opts,
                                                       used=t.used_tokens) for t in chunk]
                    parts.append(torch.stack(feats, dim=1).mean(dim=1))  # [c, K, E] -> [c, E]
            self._cache[key] = torch.cat(parts)
        return self._cache[key]

    def logits_from(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        return self.logit_scale() * image_features @ text_features.t()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits_from(self.image_features(images), self.text_features())

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The method's full training objective."""
        return self.loss_and_logits(images, labels)[0]

    def loss_and_logits(self, images: torch.Tensor, labels: torch.Tensor):
        logits = self(images)
        return F.cross_entropy(logits, labels), logits

    @classmethod
    def dataset_options(cls, dataset: str) -> dict:
        """Options that follow the run's dataset (canonical name): `fastprompt.fit` sets them
        unless the run gives them (KgCoOp's hand-written teacher prompt); most methods: none."""
        return {}

    # ----------------------------------------------------------------- training hooks
    # (fastprompt.training.train calls them; a method that needs none keeps these no-ops)
    def begin_training(self, context) -> None:
        """Before the first step (`context`: training.TrainingContext — the training and
        validation items, the run's env and recipe, `context.features` for frozen features). A
        training-free method (Tip-Adapter) does its whole work here. Also called on resume, before
        the checkpoint is restored: what it builds must follow from the data and the seed."""

    def end_epoch(self, epoch: int, epochs: int) -> None:
        """After the last optimiser step of 0-indexed `epoch` of `epochs` (PromptSRC's snapshot)."""

    def end_training(self, context) -> None:
        """After the last epoch (also right after `begin_training` when the recipe trains
        nothing): the model saved and evaluated is what this leaves (PromptSRC: the average)."""

    def training_state(self) -> dict[str, torch.Tensor]:
        """Tensors a resumed run needs besides parameters and optimiser state (running sums); saved
        in the per-epoch checkpoint, never in the adapter files."""
        return {}

    def load_training_state(self, tensors: dict[str, torch.Tensor], path) -> None:
        """Restore `training_state()` from a checkpoint (`path` names it in errors)."""
        if tensors:
            from ..errors import CheckpointError

            raise CheckpointError(f"{path} holds training state {sorted(tensors)[0]!r} that method "
                                  f"'{self.name}' does not keep: a checkpoint of another method")

    # ----------------------------------------------------------------- inference
    @torch.no_grad()
    def classifier(self, classnames: list[str] | None = None, chunk: int = 256):
        """Images -> logits over `classnames` (default: the training classes) in one image pass:
        the text features are computed here, once."""
        from ..classifier import Classifier

        names = self.classnames if classnames is None else list(classnames)
        feats = []
        for i in range(0, len(names), chunk):  # bounded memory for 1000+ classes
            feats.append(self.text_features(self.template_for(names[i:i + chunk])))
        return Classifier(self, torch.cat(feats), names)

    def predict(self, images, topk: int = 5, batch_size: int = 32, on_error: str = "raise"):
        """[(class name, probability), ...] of each image file or PIL image, preprocessed as
        evaluation does (`Classifier.predict`); keep `clf = model.classifier()` to call often."""
        return self.classifier().predict(images, topk=topk, batch_size=batch_size, on_error=on_error)

    def template_for(self, classnames: list[str]) -> PromptTemplate:
        if classnames == self.classnames:
            return self.template
        return self.make_template(classnames)

    # ----------------------------------------------------------------- checkpoints
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor of the method (nothing of the backbone, nothing recomputable)."""
        return {k: p for k, p in self.named_parameters() if p.requires_grad}

    def options(self) -> dict:
        """What defines the model besides its tensors (config.json's "options"); no runtime switch."""
        return dataclasses.asdict(self.config)

    def extra_repr(self) -> str:
        n = sum(p.numel() for p in self.trainable_state().values())
        return f"method={self.name}, classes={len(self.classnames)}, trainable={n:,}"


def normal_(shape, std: float = 0.02) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape) * std)
