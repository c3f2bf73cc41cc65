"""Tip-Adapter (training-free): a cache of few-shot image features beside zero-shot CLIP.

Cache (utils.py build_cache_model): the N·K few-shot images pass `augment_epoch` times (10) through
RandomResizedCrop(scale 0.5–1) + flip; keys K [N·K, E] = normalise(mean over the passes of the
UNNORMALISED image features), values V [N·K, C] = the one-hot labels. Logits (main.py; eq. 6):

    logits = 100·f·Wᵀ + α·exp(−β(1 − f·Kᵀ))·V

f the normalised image feature, W the zero-shot classifier of the dataset's prompt (ImageNet: the
7-template ensemble), each template normalised, averaged, normalised again (utils.py
clip_classifier); 100 is a literal, not CLIP's logit scale. α (the cache's weight) and β (its
sharpness) start at the config file's init values and are then searched on the validation
features (`search`). Tip-Adapter-F (`tip_adapter_f.py`) also trains K.

Nothing flows into the backbone: image features are computed without a graph, the cache once, the
validation features once. The cache is part of the model: `cache_keys` and `cache_labels` (the
class of each key, as a float tensor) are saved with it, α and β in its options (`alpha`, `beta`,
the searched values once searched) and the number of keys in `cache_size`. Classes without
entries (base-to-novel's novel classes) get the zero-shot part only.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, InputError
from .base import register
from .heads import FeatureHead, HeadClassifier
from .tip_files import TIP_LAYOUT
from .tip_search import SCALE, grid, grid_correct
from .zeroshot import ZeroShotConfig

#: descriptions and recipes (methods.base.card; read by fastprompt.catalog without torch). The
#: per-dataset settings are each released configs/<dataset>.yaml's: search_scale [beta, alpha] and
#: init_alpha (init_beta is 1 everywhere); ImageNet's are the defaults, its prompt the 7-template
#: ensemble (main_imagenet.py), and its search is off: its validation split is its test set.
CARDS = {
    "tip_adapter": {
        "about": "training-free cache of few-shot image features beside zero-shot CLIP (Tip-Adapter)",
        "fits_without_steps": True,  # learns from the training images, no optimiser step
        "recipes": {"base2novel": {
            "epochs": 0, "warmup_epochs": 0, "batch_size": 256, "crop_scale": [0.5, 1.0],
            "source": "Tip-Adapter main.py run_tip_adapter + configs/<dataset>.yaml"}},
        "datasets": {
            "imagenet": {"options": {"search": False, "templates": [
                "itap of a {}.", "a bad photo of the {}.", "a origami {}.",
                "a photo of the large {}.", "a {} in a video game.", "art of the {}.",
                "a photo of the small {}."]},
                "source": "Tip-Adapter configs/imagenet.yaml, main_imagenet.py"},
            "caltech101": {"options": {"search_beta": 12.0, "search_alpha": 5.0, "alpha": 3.0},
                           "source": "Tip-Adapter configs/caltech101.yaml"},
            "dtd": {"options": {"search_beta": 13.0, "search_alpha": 13.0, "alpha": 2.0},
                    "source": "Tip-Adapter configs/dtd.yaml"},
            "eurosat": {"options": {"search_beta": 12.0, "search_alpha": 10.0, "alpha": 2.0},
                        "source": "Tip-Adapter configs/eurosat.yaml"},
            "fgvc_aircraft": {"options": {"search_beta": 30.0, "search_alpha": 30.0, "alpha": 5.0},
                              "source": "Tip-Adapter configs/fgvc.yaml"},
            "food101": {"options": {"search_beta": 10.0, "search_alpha": 10.0},
                        "source": "Tip-Adapter configs/food101.yaml"},
            "oxford_flowers": {"options": {"search_beta": 50.0, "search_alpha": 50.0,
                                           "alpha": 10.0},
                               "source": "Tip-Adapter configs/oxford_flowers.yaml"},
            "oxford_pets": {"source": "Tip-Adapter configs/oxford_pets.yaml"},
            "stanford_cars": {"options": {"search_beta": 20.0, "search_alpha": 10.0, "alpha": 3.0},
                              "source": "Tip-Adapter configs/stanford_cars.yaml"},
            "sun397": {"options": {"search_beta": 12.0, "search_alpha": 10.0},
                       "source": "Tip-Adapter configs/sun397.yaml"},
            "ucf101": {"options": {"alpha": 3.0}, "source": "Tip-Adapter configs/ucf101.yaml"},
        },
    },

}


@dataclass
class TipConfig(ZeroShotConfig):
    alpha: float = 1.17        # the cache's weight: init_alpha, then the searched value
    beta: float = 1.0          # its sharpness: init_beta, then the searched value
    #: search α, β on the run's validation split at the end of training (ImageNet: off, its
    #: validation split is its test set)
    search: bool = True
    search_beta: float = 7.0   # search_scale: β over beta_steps values of [0.1, search_beta)
    search_alpha: float = 3.0  # ... α over alpha_steps values of [0.1, search_alpha)
    beta_steps: int = 200
    alpha_steps: int = 20
    augment_epoch: int = 10    # augmented passes averaged into the keys; 0: one plain pass
    #: the release's selection on the test set, to reproduce its numbers only: α, β searched even
    #: where the validation split is the test set (ImageNet, main_imagenet.py), and Tip-Adapter-F's
    #: epoch chosen by accuracy on that split (main.py chooses it on the test split, which
    #: fastprompt's training never sees: elsewhere this is the validation split)
    select_on_test: bool = False
    cache_size: int = 0        # keys in the cache (set when it is built; fp.load reads it)


def tip_logits(f: torch.Tensor, text: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               alpha: float, beta: float) -> torch.Tensor:
    """100·f·Wᵀ + α·exp(−β(1 − f·Kᵀ))·V, written as main.py writes it (f, W: normalised)."""
    affinity = f @ keys.t().to(f.dtype)
    cache = ((-1) * (beta - beta * affinity)).exp() @ values.to(affinity.dtype)
    return SCALE * f @ text.to(f.dtype).t() + cache * alpha


@register("tip_adapter")
class TipAdapter(FeatureHead):
    Config = TipConfig
    original_layout = TIP_LAYOUT
    #: Tip-Adapter-F trains the keys
    trains_keys: ClassVar[bool] = False
    fitted_options: ClassVar[tuple] = ("alpha", "beta", "cache_size")
    _val = None  # (normalised validation features, labels) while training

    def __init__(self, clip, classnames, config):
        super().__init__(clip, classnames, config)
        c = self.config
        for name, low in (("beta_steps", 1), ("alpha_steps", 1), ("augment_epoch", 0),
                          ("cache_size", 0)):
            if getattr(c, name) < low:
                raise ValueError(f"{name}={getattr(c, name)} must be >= {low}")
        if min(c.search_beta, c.search_alpha) <= 0.1:
            raise ValueError(f"search_beta={c.search_beta}, search_alpha={c.search_alpha}: the "
                             f"search runs from 0.1 up to each, so both must exceed 0.1")
        self.cache_keys = nn.Parameter(torch.zeros(c.cache_size, self.backbone.embed_dim),
                                       requires_grad=self.trains_keys)
        self.register_buffer("cache_labels", torch.zeros(c.cache_size))
        self.notes: list[str] = []

    # ----------------------------------------------------------------- the cache
    def build_cache(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """The cache of few-shot image features [views, N, E] (or [N, E]), UNNORMALISED, with
        their labels [N]: keys = normalise(mean over the views) (build_cache_model)."""
        feats = features.float().mean(0) if features.dim() == 3 else features.float()
        self.set_cache(F.normalize(feats, dim=-1), labels)

    def set_cache(self, keys: torch.Tensor, labels: torch.Tensor) -> None:
        """Keys [NK, E] as given (Tip-Adapter-F's tuned keys are not re-normalised) and the class
        index of each [NK]."""
        n, e = len(self.classnames), self.backbone.embed_dim
        if keys.dim() != 2 or keys.shape[1] != e or labels.shape != keys.shape[:1]:
            raise ValueError(f"cache keys {tuple(keys.shape)} / labels {tuple(labels.shape)} must "
                             f"be [N, {e}] / [N]")
        dev = self.backbone.model.logit_scale.device
        self.cache_keys = nn.Parameter(keys.detach().float().clone().to(dev),
                                       requires_grad=self.trains_keys)
        self.cache_labels = labels.detach().float().clone().to(dev)
        self.check_labels(n)
        self.config.cache_size = keys.shape[0]

    def check_labels(self, n_classes: int) -> None:
        """Refuse cache labels that are not class indices (a file altered by hand)."""
        y = self.cache_labels
        if y.numel() and not bool(((y == y.round()) & (y >= 0) & (y < n_classes)).all()):
            raise CheckpointError(f"the cache labels of this {self.name} model are not class "
                                  f"indices 0..{n_classes - 1}: the saved file was altered")

    def cache_values(self, names: list[str] | None = None) -> torch.Tensor:
        """The one-hot values [NK, C] over `names` (default: the training classes); a key whose
        class is not among them is in no column (a class without keys: zero-shot only). Built
        by comparison, without a host sync (a training step may be captured as a CUDA graph)."""
        cols = self.cache_labels.long()
        if names is not None and list(names) != self.classnames:
            where = {c: i for i, c in enumerate(names)}
            column = torch.tensor([where.get(c, -1) for c in self.classnames], device=cols.device)
            cols = column[cols]
        n = len(self.classnames if names is None else names)
        return (cols.unsqueeze(1) == torch.arange(n, device=cols.device)).float()

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What is saved: the cache (keys, trained by Tip-Adapter-F, and the class of each)."""
        return {"cache_keys": self.cache_keys, "cache_labels": self.cache_labels}

    # ----------------------------------------------------------------- logits
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.training:
            self.check_labels(len(self.classnames))
        f = F.normalize(self.encode(images), dim=-1)
        return tip_logits(f, self.text_features(), self.cache_keys, self.cache_values(),
                          self.config.alpha, self.config.beta)

    @torch.no_grad()
    def classifier(self, classnames: list[str] | None = None, chunk: int = 256):
        self.check_labels(len(self.classnames))
        text, names = self.text_for(classnames)
        return TipClassifier(self, text, names, self.cache_keys.detach(), self.cache_values(names),
                             self.config.alpha, self.config.beta)

    # ----------------------------------------------------------------- α, β
    @torch.no_grad()
    def search(self, features: torch.Tensor, labels: torch.Tensor) -> dict:
        """α, β by the release's grid search (utils.py search_hp) on normalised features [N, E]
        and labels [N]: β over `beta_steps` values (outer), α over `alpha_steps` (inner), the
        first grid point with the most correct predictions wins; if none is correct, α = β = 0 as
        in the release (the cache term is then constant). Sets `config.alpha/beta`; returns
        what it found."""
        c = self.config
        betas, alphas = grid(c.search_beta, c.beta_steps), grid(c.search_alpha, c.alpha_steps)
        counts = grid_correct(features, labels, self.text_features().float(),
                              self.cache_keys.float(), self.cache_labels, betas, alphas)
        best = int(counts.argmax())  # flattened β-major: the first maximum is the release's
        i, j = divmod(best, len(alphas))
        found = int(counts.view(-1)[best]) > 0
        c.beta, c.alpha = (betas[i], alphas[j]) if found else (0.0, 0.0)
        n = max(1, labels.numel())
        return {"beta": c.beta, "alpha": c.alpha, "val_acc": 100.0 * int(counts.view(-1)[best]) / n,
                "val_images": labels.numel(), "grid": counts}

    # ----------------------------------------------------------------- training hooks
    def begin_training(self, context) -> None:
        if context.recipe.trains and not self.trains_keys:
            raise InputError(f"{self.name} is training-free: use --epochs 0, or tip_adapter_f to "
                             f"fine-tune the cache keys")
        feats, labels = context.features(self.encode, context.train,
                                         views=self.config.augment_epoch)
        self.build_cache(feats, labels)
        self.notes = []
        if self.config.select_on_test:
            text = ("select_on_test=true: alpha/beta (and Tip-Adapter-F's epoch) are chosen on the "
                    "validation split, which for ImageNet is the test set: accuracy on it is "
                    "optimistic")
            warnings.warn(text, UserWarning, stacklevel=2)
            self.notes.append(text)

    def end_training(self, context) -> None:
        c = self.config
        if not (c.search or c.select_on_test):
            self.notes.append(f"alpha {c.alpha:g}, beta {c.beta:g}: the config's values, not "
                              f"searched (search=false)")
            return
        if not context.val:
            self.notes.append(f"no validation images: alpha {c.alpha:g}, beta {c.beta:g} kept")
            return
        found = self.search(*self.validation(context))
        self._val = None
        self.notes.append(f"alpha/beta searched on {found['val_images']} validation images: beta "
                          f"{found['beta']:.4g}, alpha {found['alpha']:.4g} (val acc "
                          f"{found['val_acc']:.2f}%)")

    def validation(self, context) -> tuple[torch.Tensor, torch.Tensor]:
        """The validation split's normalised features and labels, encoded once per run."""
        if self._val is None:
            feats, labels = context.features(self.encode, context.val)
            self._val = (F.normalize(feats, dim=-1), labels)
        return self._val

    def evaluation_notes(self, novel: list[str]) -> list[str]:
        """Lines for the run's output and metrics (jobs.py): what the search chose, and that
        classes without cache entries are scored by the zero-shot part alone."""
        lines = list(self.notes)
        if novel:
            lines.append(f"{self.name}: the {len(novel)} novel classes have no cache entries: "
                         f"their accuracy is zero-shot CLIP's (100 f W only)")
        return lines

    def extra_repr(self) -> str:
        n = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return (f"method={self.name}, classes={len(self.classnames)}, cache={self.config.cache_size}"
                f", trainable={n:,}, alpha={self.config.alpha:g}, beta={self.config.beta:g}")


class TipClassifier(HeadClassifier):
    """Zero-shot CLIP at scale 100 plus the cache term: one image pass, keys and values fixed."""

    def __init__(self, method, text, names, keys, values, alpha: float, beta: float):
        super().__init__(method, text, names, logit_scale=SCALE)
        self.register_buffer("cache_keys", keys.float().clone())
        self.register_buffer("cache_values", values.float())
        self.alpha, self.beta = float(alpha), float(beta)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return tip_logits(self.features(images), self.text_features, self.cache_keys,
                          self.cache_values, self.alpha, self.beta)
