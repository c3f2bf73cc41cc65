"""`TrainConfig`: everything a training run needs, as one typed value (no argv, no Namespace).

    import fastprompt as fp
    metrics = fp.fit(fp.TrainConfig(method="maple", dataset="oxford_pets", data_root="/data",
                                    model="ViT-B-16", pretrained="openai"))

`python -m fastprompt.train` builds one from its flags (`fastprompt.train.config_from_args`), and
`python -m fastprompt.table` one per table cell. The fields fall in five groups: the method and its
options, the backbone, the data and protocol, the recipe (None = the method's released recipe),
and the runtime (how the run is executed: nothing of it changes the model that is saved).
This module imports neither torch nor open_clip.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field

from .errors import InputError, setting, short_repr
from .options import FLOAT32_MAX

#: the built-in generated dataset of a run without --dataset (fastprompt.data.generated)
DEFAULT_DATASET = "shapes_colour"
#: weights of `model="tiny"` when `pretrained` is not given (fastprompt/weights/tiny-shapes.*)
TINY_DEFAULT_WEIGHTS = "shapes"
#: `pretrained` meaning "the model's default weights" (`load_clip`'s default; see resolve_weights)
DEFAULT_WEIGHTS = "default"
#: `pretrained` values that ask for a random-init backbone (besides None in `load_clip`)
RANDOM_INIT = ("none", "random")
#: the largest seed accepted (seeds also feed NumPy generators, which need 0 <= seed < 2**32)
MAX_SEED = 2**32 - 1
#: recipe fields a config file may set besides batch size, lr and epochs, with their lower bound
#: and whether they are real numbers (which must then be finite)
RECIPE_LIMITS = {"warmup_epochs": (0, False), "warmup_lr": (0.0, True), "momentum": (0.0, True),
                 "weight_decay": (0.0, True), "eps": (0.0, True), "min_lr": (0.0, True),
                 "iterations_per_shot": (0, False)}
#: what --device accepts (an index: cuda:0, cuda:1, ...)
DEVICES = re.compile(r"cpu|cuda(:[0-9]{1,4})?")


def resolve_weights(model: str, pretrained: str | None) -> str | None:
    """The weights `pretrained` names for backbone `model`; None is random init. "default" is the
    model's default: the shipped "shapes" for `tiny`, random init for any other (none is offline);
    None, "none" and "random" ask for random init; anything else is a tag or a file, kept."""
    if pretrained is None or pretrained.lower() in RANDOM_INIT:
        return None
    if pretrained == DEFAULT_WEIGHTS:
        return TINY_DEFAULT_WEIGHTS if model == "tiny" else None
    return pretrained


@dataclass
class TrainConfig:
    """One training run (`fastprompt.fit`). Defaults are the embedded offline job: MaPLe on the
    generated `shapes_colour` with the shipped tiny CLIP, base-to-novel, seed 1."""

    # --- method
    method: str = "maple"
    #: method options by name (typed values or their text, coerced by the method's Config)
    options: dict = field(default_factory=dict)
    #: zero-shot prompts: one template with {} (default: CoOp's template of the dataset) ...
    template: str | None = None
    #: ... or CoOp's ZeroshotCLIP2 prompt ensemble
    ensemble: bool = False

    # --- backbone
    model: str = "tiny"
    #: open_clip tag, checkpoint file, "none" for random init; None: "shapes" for the tiny model,
    #: random init otherwise
    pretrained: str | None = None
    #: QuickGELU (True) or GELU (False); None: what the weights say
    quick_gelu: bool | None = None
    backbone_seed: int = 0

    # --- data and protocol
    dataset: str | None = None          # None: DEFAULT_DATASET
    data_root: str | None = None
    shots: int | None = None            # None: the recipe's (16)
    seed: int = 1                       # few-shot draw, parameter init, data order
    subsample: str = "base"             # base (base-to-novel) | all
    eval_datasets: tuple = ()
    eval_split: str = "test"            # test | val
    on_error: str = "skip"              # unreadable images: skip (counted) | raise

    # --- recipe (None: the method's released recipe)
    recipe: str | None = None           # base2novel | cross | fewshot; None: by protocol
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    #: other Recipe fields (warmup_epochs, warmup_lr, momentum, weight_decay)
    recipe_overrides: dict = field(default_factory=dict)

    # --- runtime and output (how the run executes; not saved with the model)
    device: str | None = None           # cuda | cpu; None: cuda when available
    precision: str = "auto"             # auto | fp32 | bf16 | fp16
    workers: int | None = None          # None: 4 on CUDA, 0 on the CPU
    plain: bool = False                 # every optimisation off: the original-style baseline
    cuda_graphs: bool = True
    progress: bool = True
    zero_shot_ref: str = "auto"         # auto | always | never
    out: str | None = None              # None: runs/DATASET/METHOD/seedN
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self):
        for name in ("data_root", "out", "pretrained"):  # a pathlib.Path is as good as its text
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))

    # ------------------------------------------------------------------ derived values
    @property
    def dataset_name(self) -> str:
        return self.dataset or DEFAULT_DATASET

    @property
    def weights(self) -> str | None:
        """The `pretrained` argument of `load_clip`: None means random init."""
        return resolve_weights(self.model, DEFAULT_WEIGHTS if self.pretrained is None else self.pretrained)

    @property
    def run_dir(self) -> str:
        return self.out or f"runs/{self.dataset_name}/{self.method}/seed{self.seed}"

    def validate(self, recipe_source: str | None = None) -> "TrainConfig":
        """Refuse numbers and choices that would train nonsense (InputError, one line naming the
        setting by its command-line flag and field name; recipe fields by the file they came
        from, if given)."""
        def bad(flag, want, value):
            raise InputError(f"{setting(flag) if flag.startswith('--') else flag} must be {want}, "
                             f"got {short_repr(value)}")

        self._check_types()
        for flag, value in (("--seed", self.seed), ("--backbone-seed", self.backbone_seed)):
            if not (isinstance(value, int) and 0 <= value <= MAX_SEED):
                bad(flag, f"an integer from 0 to {MAX_SEED}", value)
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            bad("--lr", "a finite number > 0", self.lr)
        if self.lr is not None and self.lr > FLOAT32_MAX:
            bad("--lr", f"at most {FLOAT32_MAX:.4g} (float32's largest number)", self.lr)
        if self.device is not None and not DEVICES.fullmatch(self.device):
            bad("--device", "cpu, cuda or cuda:N", self.device)
        for flag, value, low in (("--epochs", self.epochs, 0), ("--shots", self.shots, 1),
                                 ("--batch-size", self.batch_size, 1), ("--workers", self.workers, 0)):
            if value is not None and value < low:
                bad(flag, f"an integer >= {low}", value)
        for flag, value, choices in (("--subsample", self.subsample, ("base", "all")),
                                     ("--eval-split", self.eval_split, ("test", "val")),
                                     ("--on-error", self.on_error, ("skip", "raise")),
                                     ("--precision", self.precision, ("auto", "fp32", "bf16", "fp16")),
                                     ("--zero-shot-ref", self.zero_shot_ref, ("auto", "always", "never")),
                                     ("--recipe", self.recipe, (None, "base2novel", "cross", "fewshot"))):
            if value not in choices:
                bad(flag, "one of " + ", ".join(str(c) for c in choices if c is not None), value)
        if self.resume and self.overwrite:
            raise InputError(f"{setting('--resume')} continues the run in --out and "
                             f"{setting('--overwrite')} replaces it: give one")
        def where(key):
            return f"'{key}' in {recipe_source}" if recipe_source else f"recipe field '{key}'"

        for key, value in self.recipe_overrides.items():
            if key not in RECIPE_LIMITS and key != "source":
                raise InputError(f"unknown recipe field '{key}': choose from "
                                 f"{', '.join(RECIPE_LIMITS)}")
            low, real = RECIPE_LIMITS.get(key, (None, False))
            if low is None:
                continue
            number = isinstance(value, (int, float) if real else int) and not isinstance(value, bool)
            if not number or value < low or (real and not (math.isfinite(value) and value <= FLOAT32_MAX)):
                bad(where(key), f"{'a finite number' if real else 'an integer'} >= {low}"
                    + (f" (at most {FLOAT32_MAX:.4g})" if real else ""), value)
        if self.recipe_overrides.get("momentum", 0) >= 1:
            bad(where("momentum"), "below 1", self.recipe_overrides["momentum"])
        return self

    def _check_types(self) -> None:
        """Each field holds a value of its annotated type (TrainConfig(epochs=1.5) is one line
        naming the field, not a TypeError deep in training); a string of eval_datasets would
        be read letter by letter."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), hints[f.name]
            kinds = [k for k in typing.get_args(kind) if k is not type(None)] or [kind]
            if value is None and type(None) in typing.get_args(kind):
                continue
            if f.name == "eval_datasets":
                ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
            else:
                ok = any(_is(value, k) for k in kinds)
            if not ok:
                want = " or ".join(_KIND_NAMES.get(k, getattr(k, "__name__", str(k))) for k in kinds)
                raise InputError(f"TrainConfig field '{f.name}' must be {want}"
                                 f"{' or None' if type(None) in typing.get_args(kind) else ''}, got "
                                 f"{short_repr(value)}")


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "True or False",
               dict: "a dict", tuple: "a list of dataset names"}


def _is(value, kind) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)
