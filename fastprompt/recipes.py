"""Training recipes of the original code (METHODS.md), the defaults of `python -m fastprompt.train`.

Shared: SGD momentum 0.9, weight decay 5e-4, cosine schedule stepped per epoch, the first
`warmup_epochs` at a constant 1e-5; 16 shots.
"""
from __future__ import annotations

import dataclasses
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

    def lr_at(self, epoch: int) -> float:
        """lr of a 0-indexed epoch: constant warm-up, then Dassl's cosine at step `epoch`:
        lr * (1 + cos(pi * epoch / epochs)) / 2 (its first value is skipped by the warm-up)."""
        import math

        if epoch < self.warmup_epochs:
            return self.warmup_lr
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / max(self.epochs, 1)))


RECIPES: dict[str, Recipe] = {
    "zeroshot": Recipe(epochs=0, warmup_epochs=0),
    "coop": Recipe(batch_size=32, lr=0.002, epochs=200),
    "cocoop": Recipe(batch_size=1, lr=0.002, epochs=10),
    "maple": Recipe(batch_size=4, lr=0.0035, epochs=5),
    "ivlp": Recipe(batch_size=4, lr=0.0035, epochs=5),
    "mma": Recipe(batch_size=16, lr=0.0015, epochs=5, warmup_epochs=0),
    "lamm": Recipe(batch_size=32, lr=0.002, epochs=50),
    "coop+lamm": Recipe(batch_size=32, lr=0.002, epochs=50),
    "maple+lamm": Recipe(batch_size=4, lr=0.0035, epochs=5),
}

#: dataset-specific departures of the original configs
DATASET_OVERRIDES: dict[tuple[str, str], dict] = {
    ("coop", "imagenet"): {"epochs": 50},
    ("mma", "imagenet"): {"batch_size": 128},
}


def recipe_for(method: str, dataset: str = "", **overrides) -> Recipe:
    if method not in RECIPES:
        raise ValueError(f"no training recipe for method '{method}'; known: {', '.join(RECIPES)}")
    base = dataclasses.replace(RECIPES[method], options=dict(RECIPES[method].options))
    base = dataclasses.replace(base, **DATASET_OVERRIDES.get((method, dataset), {}))
    names = {f.name for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown recipe field '{unknown[0]}'; valid: {', '.join(sorted(names))}")
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
