"""CLIP-Adapter: a residual bottleneck MLP on the image feature (gaopengcuhk/CLIP-Adapter).

    a  = ReLU(W2 · ReLU(W1 · f))        W1 [E/r, E], W2 [E, E/r], no biases (the release's Adapter)
    f' = ratio · a + (1 − ratio) · f    ratio 0.2, f the UNNORMALISED image feature
    logits = exp(logit_scale) · normalise(f') · normalise(t)ᵀ

with t the text features of the dataset's prompt (the release's CUSTOM_TEMPLATES, CoOp's table:
"a photo of a {}, a type of pet.", ...; zero-shot CLIP's, computed once here where the release
re-encodes them on every forward) and E the backbone's embedding width (the release hard-codes
1024, RN50's; ViT-B/16: 512 -> 131,072 parameters). The image tower runs without a graph.

The release ships no config or script (its README: follow CoOp): CoOp's recipe is used, SGD lr
0.002, batch 32, cosine with one constant warm-up epoch, 200 epochs as CoOp's 8/16-shot scripts
(ImageNet 50, its *_ep50 configs).

Original checkpoints (clip_adapter.py's trainer CLIP_Adapter): Dassl registers the adapter alone,
`clip_adapter/model.pth.tar-<epoch>` with keys `fc.0.weight`, `fc.2.weight` (= ours, under
`adapter.`); the prompt comes from the config's DATASET.NAME.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..original.keys import Layout, err, first_key
from .base import register
from .heads import FeatureHead, HeadClassifier
from .zeroshot import ZeroShotConfig

#: description and recipes (methods.base.card; read by fastprompt.catalog without torch)
CARDS = {
    "clip_adapter": {
        "about": "residual bottleneck MLP on the image feature, text as zero-shot CLIP (CLIP-Adapter)",
        "recipes": {
            "base2novel": {"batch_size": 32, "lr": 0.002, "epochs": 200,
                           "source": "CLIP-Adapter clip_adapter.py (no config released): CoOp "
                                     "configs/trainers/CoOp/vit_b16.yaml"},
            "cross": {"batch_size": 32, "lr": 0.002, "epochs": 50,
                      "source": "CLIP-Adapter clip_adapter.py (no config released): CoOp "
                                "configs/trainers/CoOp/vit_b16_ep50.yaml"},
        },
        "datasets": {"imagenet": {"epochs": 50}},  # CoOp's *_ep50 configs for ImageNet
    },
}


@dataclass
class CLIPAdapterConfig(ZeroShotConfig):
    ratio: float = 0.2   # the residual ratio (a literal in the release's forward)
    reduction: int = 4   # the bottleneck: E -> E / reduction -> E


class Bottleneck(nn.Module):
    """The release's `Adapter`: fc = Linear(E, E/r, no bias), ReLU, Linear(E/r, E, no bias), ReLU."""

    def __init__(self, width: int, reduction: int):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(width, width // reduction, bias=False), nn.ReLU(),
                                nn.Linear(width // reduction, width, bias=False), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def mix(adapter: nn.Module, feats: torch.Tensor, ratio: float) -> torch.Tensor:
    """ratio · adapter(f) + (1 − ratio) · f, on the un-normalised feature (clip_adapter.py)."""
    return ratio * adapter(feats) + (1 - ratio) * feats


def _names(model) -> dict[str, str]:
    return {f"adapter.fc.{i}.weight": f"adapter.fc.{i}.weight" for i in (0, 2)}


def _options(layout, sd, cfg, n_classes, notes) -> dict:
    """The bottleneck from the tensors; the prompt from DATASET.NAME (CUSTOM_TEMPLATES)."""
    from ..data import DataError, canonical_name, zero_shot_template

    w1 = sd.get("adapter.fc.0.weight")
    if w1 is None or w1.dim() != 2 or w1.shape[1] % max(1, w1.shape[0]):
        raise err(f"checkpoint key 'fc.0.weight' is {'missing' if w1 is None else tuple(w1.shape)}: "
                  f"expected [E / reduction, E]")
    opts = {"reduction": w1.shape[1] // w1.shape[0]}
    name = cfg.get("DATASET.NAME")
    if name:
        try:
            opts["templates"] = [zero_shot_template(canonical_name(str(name)))]
        except DataError:
            raise err(f"config DATASET.NAME {name!r} has no entry in CLIP-Adapter's "
                      f"CUSTOM_TEMPLATES") from None
    else:
        notes.append("the config gives no DATASET.NAME: the prompt is 'a photo of a {}.' "
                     "(CUSTOM_TEMPLATES of ImageNet, Caltech101, ...); pass the original config")
    return opts


@register("clip_adapter")
class CLIPAdapter(FeatureHead):
    Config = CLIPAdapterConfig
    original_layout = Layout(
        "CLIP-Adapter", ("CLIP_Adapter",), "clip_adapter", "adapter", "CLIP_ADAPTER", _names,
        _options, flags=frozenset({"DATASET.NAME"}), kind="clip_adapter",
        detect=lambda keys: first_key(keys, r"^fc\.[02]\.weight$"), precedence=60)

    def __init__(self, clip, classnames, config):
        super().__init__(clip, classnames, config)
        width, r = self.backbone.embed_dim, self.config.reduction
        if not 1 <= r <= width:
            raise ValueError(f"reduction={r} must be between 1 and the embedding width {width}")
        self.adapter = Bottleneck(width, r)

    def image_features(self, images: torch.Tensor, hooks=None) -> torch.Tensor:
        """normalise(ratio · adapter(f) + (1 − ratio) · f), f from the frozen tower (no graph)."""
        return F.normalize(mix(self.adapter, self.encode(images), self.config.ratio), dim=-1)

    @torch.no_grad()
    def classifier(self, classnames: list[str] | None = None, chunk: int = 256):
        text, names = self.text_for(classnames)
        return AdapterClassifier(self, text, names)


class AdapterClassifier(HeadClassifier):
    """Zero-shot CLIP's single image pass with the adapter mixed into the image feature."""

    def __init__(self, method, text, names):
        super().__init__(method, text, names)
        self.adapter, self.ratio = method.adapter, float(method.config.ratio)

    def head_features(self, feats: torch.Tensor) -> torch.Tensor:
        return mix(self.adapter, feats, self.ratio)
