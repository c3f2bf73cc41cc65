"""Training recipes of the original code (METHODS.md), the defaults of `python -m fastprompt.train`.

Shared (Dassl defaults, no released YAML overrides them): SGD momentum 0.9, weight decay 5e-4,
16 shots, and Dassl's per-epoch schedule — `ConstantWarmupScheduler` (the first W epochs at
1e-5) wrapping `CosineAnnealingLR(T_max = epochs)`, whose count starts after the warm-up
(dassl/optim/lr_scheduler.py; the trainers step it once after each epoch's last batch):

    lr(e) = 1e-5                                 for e < W
    lr(e) = lr * (1 + cos(pi * (e - W) / E)) / 2  for W <= e < E        (e 0-indexed, E = epochs)

so the full rate is reached right after the warm-up and the cosine never reaches 0 (MaPLe:
1e-5, 3.5e-3, 3.17e-3, 2.29e-3, 1.21e-3).

Three protocols (`PROTOCOLS`), each with the recipe of the released scripts; each method's
recipes are written in its own file (`CARDS` in fastprompt/methods/<file>.py, with their `source`):
* `base2novel` — train on the base half, test base and novel (`scripts/*/base2new_train*.sh`).
* `cross` — train on all of ImageNet, test on other datasets / ImageNet variants
  (`xd_train*.sh`); MaPLe then uses `vit_b16_c2_ep5_batch4_2ctx_cross_datasets.yaml`.
* `fewshot` — train and test on all classes of one dataset (`few_shot*.sh`; LAMM's scripts, the
  few-shot tables of PromptSRC, CLIP-LoRA, Tip-Adapter).
A method without a recipe of its own for a protocol uses its `base2novel` one there (the released
scripts pass the same config). A recipe may carry `datasets`: departures for that protocol alone
(PromptSRC's few-shot GPA groups), applied before the card's own `datasets` (every protocol).
`default_protocol` picks `cross` for a run on every class of ImageNet, `fewshot` for every class of
another dataset, `base2novel` for the base half, unless a recipe is named.
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
    source: str = ""                             # the original config it follows
    #: "sgd" (Dassl: momentum, weight decay) or "adamw" (betas, eps, weight decay)
    optimizer: str = "sgd"
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    #: "epoch": Dassl's warm-up + cosine, one rate per epoch (`lr_at`); "iteration": the cosine
    #: stepped after every optimiser step, as torch's CosineAnnealingLR(T_max = all steps,
    #: eta_min = min_lr) is in CLIP-LoRA and Tip-Adapter-F (`lr_at_step`)
    schedule: str = "epoch"
    min_lr: float = 0.0
    #: > 0: the run is this many optimiser steps times the shots (CLIP-LoRA: 500 x K), however
    #: many epochs that takes; the last epoch stops when the budget is spent. 0: `epochs` epochs
    #: (an `epochs` override, --epochs, sets it to 0 unless it is overridden too)
    iterations_per_shot: int = 0
    #: RandomResizedCrop's scale range of the training augmentation (CoOp 0.08-1; Tip-Adapter 0.5-1)
    crop_scale: tuple = (0.08, 1.0)

    def lr_at(self, epoch: int) -> float:
        """lr of a 0-indexed epoch under Dassl's constant warm-up + cosine (module docstring)."""
        from .schedule import warmup_cosine

        return warmup_cosine(self.lr, epoch, self.epochs, self.warmup_epochs, warmup_lr=self.warmup_lr)

    @property
    def iterations(self) -> int:
        """The optimiser-step budget (0: none, the run is `epochs` epochs)."""
        return self.iterations_per_shot * self.shots

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimiser steps of the whole run when an epoch has `steps_per_epoch` batches."""
        return self.iterations or self.epochs * steps_per_epoch

    def total_epochs(self, steps_per_epoch: int) -> int:
        """Epochs of the whole run: `epochs`, or as many as the step budget needs (the last one
        possibly cut short)."""
        if not self.iterations:
            return self.epochs
        return -(-self.iterations // max(1, steps_per_epoch))

    def lr_at_step(self, step: int, steps_per_epoch: int) -> float:
        """lr of the 0-indexed optimiser step `step` of the run: the epoch's rate (`lr_at`) under
        the "epoch" schedule; under "iteration", `warmup_epochs` epochs of steps at `warmup_lr`,
        then min_lr + (lr - min_lr)(1 + cos(pi t / T)) / 2 with t the step, T all steps."""
        from .schedule import warmup_cosine

        if self.schedule == "epoch":
            return self.lr_at(step // max(1, steps_per_epoch))
        return warmup_cosine(self.lr, step, self.total_steps(steps_per_epoch),
                             self.warmup_epochs * steps_per_epoch, warmup_lr=self.warmup_lr,
                             min_lr=self.min_lr)

    @property
    def trains(self) -> bool:
        """Whether the recipe takes any optimiser step (zero-shot and training-free ones do not)."""
        return self.epochs > 0 or self.iterations > 0

    def length_text(self) -> str:
        """How long the run is: '5 epochs', or '500 x 16 shots = 8000 steps' for a step budget."""
        if self.iterations:
            return f"{self.iterations_per_shot} x {self.shots} shots = {self.iterations} steps"
        return f"{self.epochs} epoch{'' if self.epochs == 1 else 's'}"

    def optimizer_text(self) -> str:
        """'' for Dassl's SGD stepped per epoch, else e.g. 'AdamW, cosine per step to 1e-06'."""
        parts = ["AdamW"] if self.optimizer == "adamw" else []
        if self.schedule == "iteration":
            parts.append(f"cosine per step to {self.min_lr:g}")
        return ", ".join(parts)

    def check(self) -> "Recipe":
        """InputError naming a field that no loop can run (unknown optimiser or schedule)."""
        from .errors import InputError

        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"recipe field 'optimizer' must be one of {', '.join(OPTIMIZERS)}, "
                             f"got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise InputError(f"recipe field 'schedule' must be one of {', '.join(SCHEDULES)}, "
                             f"got {self.schedule!r}")
        return self


OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("epoch", "iteration")


#: the protocols, in the order `describe` lists them; a method without a `cross` recipe uses its
#: base-to-novel one there (the released xd scripts pass the same config: CoCoOp, IVLP, MMA; LAMM
#: released no xd recipe)
PROTOCOLS = ("base2novel", "cross", "fewshot")
_FIELDS = frozenset(f.name for f in dataclasses.fields(Recipe))


def recipe_from_card(method: str, card: dict, dataset: str = "", recipe: str | None = None,
                     **overrides) -> Recipe:
    """The recipe `recipe` (default base2novel) of a method's card (`methods.base.card`), with
    the card's departures for `dataset` and then `overrides` (None values ignored). Torch-free:
    `fastprompt.catalog` calls it on the cards it reads from the method files."""
    name = recipe or "base2novel"
    if name not in PROTOCOLS:
        raise ValueError(f"unknown recipe '{name}'; choose one of: {', '.join(PROTOCOLS)}")
    recipes = card.get("recipes", {})
    fields = dict(recipes.get(name) or recipes["base2novel"])
    fields.update(fields.pop("datasets", {}).get(dataset, {}))
    fields.update(card.get("datasets", {}).get(dataset, {}))
    bad = sorted(set(fields) - _FIELDS)
    if bad:
        raise ValueError(f"the card of method '{method}' has the unknown recipe field '{bad[0]}'")
    for key in ("betas", "crop_scale"):  # literals may write them as lists
        if key in fields:
            fields[key] = tuple(fields[key])
    base = Recipe(**{**fields, "options": dict(fields.get("options", {}))}).check()
    unknown = sorted(set(overrides) - _FIELDS)
    if unknown:
        raise ValueError(f"unknown recipe field '{unknown[0]}'; valid: {', '.join(sorted(_FIELDS))}")
    given = {k: v for k, v in overrides.items() if v is not None}
    if "epochs" in given and "iterations_per_shot" not in given:
        given["iterations_per_shot"] = 0  # epochs asked for replace the card's step budget
    return dataclasses.replace(base, **given).check()


def recipe_for(method: str, dataset: str = "", recipe: str | None = None, **overrides) -> Recipe:
    """The recipe of `method` (by name `recipe`, default base2novel) with its dataset departures
    and then `overrides` (None values ignored), from the method's card in its own file."""
    from .methods import METHODS, card

    if method not in METHODS:
        raise ValueError(f"no training recipe for method '{method}'; known: {', '.join(METHODS)}")
    return recipe_from_card(method, card(method), dataset, recipe, **overrides)


def _recipe_sets() -> dict[str, dict[str, Recipe]]:
    """{protocol: {method: Recipe}}, from the registry; `cross` holds the methods that have a
    cross recipe of their own."""
    from .methods import METHODS, card

    return {name: {m: recipe_for(m, recipe=name) for m in METHODS
                   if name == "base2novel" or name in card(m).get("recipes", {})}
            for name in PROTOCOLS}


def __getattr__(name: str):
    """`RECIPE_SETS`, `BASE2NOVEL`, `CROSS` and `RECIPES` (= BASE2NOVEL), built from the
    registry on first use (importing this module imports no torch)."""
    if name == "RECIPE_SETS":
        return _recipe_sets()
    if name in ("BASE2NOVEL", "RECIPES"):
        return _recipe_sets()["base2novel"]
    if name == "CROSS":
        return _recipe_sets()["cross"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_protocol(dataset: str, subsample: str) -> str:
    """`cross` for a run over every class of ImageNet (the transfer source), `fewshot` over every
    class of another dataset, `base2novel` on the base half."""
    if subsample != "all":
        return "base2novel"
    return "cross" if dataset.lower() == "imagenet" else "fewshot"


def describe(method: str) -> str:
    """One line per protocol: batch, lr, epochs, warm-up and options of `method`'s recipes."""
    from .methods import card

    parts = []
    for name in PROTOCOLS:
        if name != "base2novel" and name not in card(method).get("recipes", {}):
            continue
        r = recipe_for(method, recipe=name)
        opts = "".join(f" {k}={v}" for k, v in r.options.items())
        how = f", {r.optimizer_text()}" if r.optimizer_text() else ""
        parts.append(f"{name}: batch {r.batch_size}, lr {r.lr:g}, {r.length_text()}{how}"
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
