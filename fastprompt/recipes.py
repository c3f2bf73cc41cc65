"""Training recipes of the original code (METHODS.md), the defaults of `python -m fastprompt.train`.

Shared (Dassl defaults, no released YAML overrides them): SGD momentum 0.9, weight decay 5e-4,
16 shots, and Dassl's per-epoch schedule — `ConstantWarmupScheduler` (the first W epochs at
1e-5) wrapping `CosineAnnealingLR(T_max = epochs)`, whose count starts after the warm-up
(dassl/optim/lr_scheduler.py; the trainers step it once after each epoch's last batch):

    lr(e) = 1e-5                                 for e < W
    lr(e) = lr * (1 + cos(pi * (e - W) / E)) / 2  for W <= e < E        (e 0-indexed, E = epochs)

so the full rate is reached right after the warm-up and the cosine never reaches 0 (MaPLe:
1e-5, 3.5e-3, 3.17e-3, 2.29e-3, 1.21e-3).

Two protocols, each with the recipe of the released scripts (`RECIPE_SETS`):
* `base2novel` — train on the base half, test base and novel (`scripts/*/base2new_train*.sh`);
  also what the few-shot scripts of LAMM use over all classes.
* `cross` — train on all of ImageNet, test on other datasets / ImageNet variants
  (`xd_train*.sh`); MaPLe then uses `vit_b16_c2_ep5_batch4_2ctx_cross_datasets.yaml`.
`recipe_for` picks `cross` for a run on every class of ImageNet, `base2novel` otherwise, unless a
recipe is named.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field


@dataclass
class Recipe:
    batch_size: int = 32
    lr: float = 0.002
    epochs: int = 50
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    momentum: float = 0.9
    weight_decay: float = 5e-4
    shots: int = 16
    options: dict = field(default_factory=dict)  # method keyword options
    source: str = ""                             # the original config it follows

    def lr_at(self, epoch: int) -> float:
        """lr of a 0-indexed epoch under Dassl's constant warm-up + cosine (module docstring)."""
        if epoch < self.warmup_epochs:
            return self.warmup_lr
        t = (epoch - self.warmup_epochs) / max(self.epochs, 1)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * t))


_COOP_CFG = "CoOp configs/trainers/CoOp/vit_b16_ctxv1.yaml"
_MAPLE_CFG = "multimodal-prompt-learning configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml"
_LAMM_CFG = "LAMM configs/trainers/CoOp/vit_b16_ep50_ctxv1.yaml"

BASE2NOVEL: dict[str, Recipe] = {
    "zeroshot": Recipe(epochs=0, warmup_epochs=0, source="CoOp trainers/zsclip.py (no training)"),
    "coop": Recipe(batch_size=32, lr=0.002, epochs=200, source=_COOP_CFG),
    "cocoop": Recipe(batch_size=1, lr=0.002, epochs=10,
                     source="CoOp configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml"),
    "maple": Recipe(batch_size=4, lr=0.0035, epochs=5, source=_MAPLE_CFG),
    "ivlp": Recipe(batch_size=4, lr=0.0035, epochs=5,
                   source="multimodal-prompt-learning configs/trainers/IVLP/vit_b16_c2_ep5_batch4_2+2ctx.yaml"),
    "mma": Recipe(batch_size=16, lr=0.0015, epochs=5, warmup_epochs=0,
                  source="Multi-Modal-Adapter configs/trainers/MultiModalAdapter/vit_b16_ep5.yaml"),
    "lamm": Recipe(batch_size=32, lr=0.002, epochs=50, source=_LAMM_CFG),
    "coop+lamm": Recipe(batch_size=32, lr=0.002, epochs=50, source=_LAMM_CFG),
    "maple+lamm": Recipe(batch_size=4, lr=0.0035, epochs=5,
                         source="LAMM configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml"),
}

#: training on all of ImageNet for cross-dataset transfer / domain generalisation; methods not
#: listed use their base-to-novel recipe with the ImageNet departures (the released xd scripts
#: pass the same config: CoCoOp, IVLP, MMA; LAMM released no xd recipe)
CROSS: dict[str, Recipe] = {
    "coop": Recipe(batch_size=32, lr=0.002, epochs=50,
                   source="CoOp configs/trainers/CoOp/vit_b16_ep50_ctxv1.yaml (ImageNet)"),
    "maple": Recipe(batch_size=4, lr=0.0026, epochs=2, options={"depth": 3},
                    source="multimodal-prompt-learning configs/trainers/MaPLe/"
                           "vit_b16_c2_ep5_batch4_2ctx_cross_datasets.yaml"),
}

RECIPE_SETS = {"base2novel": BASE2NOVEL, "cross": CROSS}

#: dataset-specific departures of the original configs (any protocol)
DATASET_OVERRIDES: dict[tuple[str, str], dict] = {
    ("coop", "imagenet"): {"epochs": 50},   # CoOp's *_ep50 configs for ImageNet
    ("mma", "imagenet"): {"batch_size": 128,
                          "source": "Multi-Modal-Adapter configs/trainers/MultiModalAdapter/vit_b16_ep5_imnet.yaml"},
}

# back-compatible name: the base-to-novel recipes
RECIPES = BASE2NOVEL


def default_protocol(dataset: str, subsample: str) -> str:
    """`cross` for a run over every class of ImageNet (the transfer source), else `base2novel`."""
    return "cross" if dataset.lower() == "imagenet" and subsample == "all" else "base2novel"


def recipe_for(method: str, dataset: str = "", recipe: str | None = None, **overrides) -> Recipe:
    """The recipe of `method` (by name `recipe`, default base2novel) with its dataset departures
    and then `overrides` (None values ignored)."""
    if method not in BASE2NOVEL:
        raise ValueError(f"no training recipe for method '{method}'; known: {', '.join(BASE2NOVEL)}")
    name = recipe or "base2novel"
    if name not in RECIPE_SETS:
        raise ValueError(f"unknown recipe '{name}'; choose one of: {', '.join(RECIPE_SETS)}")
    base = RECIPE_SETS[name].get(method, BASE2NOVEL[method])
    base = dataclasses.replace(base, options=dict(base.options))
    base = dataclasses.replace(base, **DATASET_OVERRIDES.get((method, dataset), {}))
    names = {f.name for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown recipe field '{unknown[0]}'; valid: {', '.join(sorted(names))}")
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


def describe(method: str) -> str:
    """One line per protocol: batch, lr, epochs, warm-up and options of `method`'s recipes."""
    parts = []
    for name in RECIPE_SETS:
        r = recipe_for(method, recipe=name)
        opts = "".join(f" {k}={v}" for k, v in r.options.items())
        parts.append(f"{name}: batch {r.batch_size}, lr {r.lr:g}, {r.epochs} epochs"
                     f"{', warm-up 1e-5 x' + str(r.warmup_epochs) if r.warmup_epochs else ''}{opts}")
    return "; ".join(parts)


def zero_shot_templates(dataset: str, template: str | None = None, ensemble: bool = False) -> list[str]:
    """The prompts of zero-shot CLIP on `dataset` as CoOp's zsclip.py writes them: `template` or the
    dataset's CUSTOM_TEMPLATES entry; with `ensemble`, ZeroshotCLIP2's seven ImageNet templates
    plus that one (but not on ImageNet itself)."""
    from .data import canonical_name, zero_shot_template
    from .prompts import ENSEMBLE_TEMPLATES

    own = template or zero_shot_template(dataset)
    if not ensemble:
        return [own]
    imagenet = template is None and canonical_name(dataset) == "imagenet"
    return list(ENSEMBLE_TEMPLATES) + ([] if imagenet else [own])
