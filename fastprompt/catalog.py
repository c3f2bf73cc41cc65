"""What the command lines list in their --help: the methods (one line each, with their recipe
defaults) and the datasets, without importing torch.

The registries themselves (`fastprompt.list_methods()`, `fastprompt.data.list_datasets()`) import
torch and open_clip, which takes seconds; `--help` must answer at once. The methods are therefore
read from their source files with `ast`: `MODULES` of fastprompt/methods/__init__.py (the order)
and the `CARDS` literal of each file (description and recipes, the very constants the registry
uses at run time). The datasets are written out here; `tests/test_first_hour.py` checks that both
lists name exactly what the registries hold.
"""
from __future__ import annotations

import argparse
import ast
from pathlib import Path

from .config import DEFAULT_DATASET, TrainConfig
from .recipes import recipe_from_card

METHODS_DIR = Path(__file__).resolve().parent / "methods"


def _literal(path: Path, name: str):
    """The value of the module-level assignment `name = <literal>` in the source file `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise LookupError(f"{path} has no module-level literal {name}")


def method_cards() -> dict[str, dict]:
    """{method: its card}, in the order of the registry (methods/__init__.MODULES, then each
    file's CARDS), read from the sources without importing them."""
    cards: dict[str, dict] = {}
    for module in _literal(METHODS_DIR / "__init__.py", "MODULES"):
        cards.update(_literal(METHODS_DIR / f"{module}.py", "CARDS"))
    return cards


CARDS = method_cards()
#: method -> what it learns (README's method table, METHODS.md), in the registry's order
METHOD_SUMMARIES = {name: card["about"] for name, card in CARDS.items()}


def method_names(trained: bool = False) -> list[str]:
    """The methods in the registry's order (the table's); `trained`: only those with training
    (a recipe of more than 0 epochs: every method but the zero-shot reference)."""
    return [name for name in CARDS
            if not trained or recipe_from_card(name, CARDS[name]).trains]

#: generated in memory (no files, no --data-root); shapes_colour is the default dataset
GENERATED_DATASETS = ("shapes_colour", "shapes_texture", "shapes_count")
#: (what they are, names) of the --dataset help
DATASET_GROUPS = (
    ("generated in memory, no --data-root (made for the built-in tiny backbone)",
     GENERATED_DATASETS + ("builtin",)),
    ("your own images (--data-root DIR holding one sub-folder of images per class, or train/ "
     "and test/ holding those)", ("folder",)),
    ("CoOp's benchmarks (--data-root in the layout of CoOp's DATASETS.md)",
     ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
      "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101")),
    ("ImageNet shifts, test only (--eval-datasets of a run trained on imagenet)",
     ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")),
)


def dataset_names() -> list[str]:
    return [name for _, names in DATASET_GROUPS for name in names]


def recipe_summary(method: str) -> str:
    """The recipe defaults of `method`, compact: base-to-novel's batch, lr, epochs (warm-up), and
    where the cross-dataset recipe differs, what differs."""
    def recipe_for(method, dataset="", recipe=None):
        return recipe_from_card(method, CARDS[method], dataset, recipe)

    base = recipe_for(method, recipe="base2novel")
    if not base.trains:
        return "no training"

    def fields(r):
        return {"batch": f"batch {r.batch_size}", "lr": f"lr {r.lr:g}", "epochs": r.length_text(),
                "optimizer": r.optimizer_text(),
                "warmup": f"{r.warmup_epochs} warm-up" if r.warmup_epochs else "no warm-up",
                **{f"opt {k}": f"{k}={v}" for k, v in r.options.items()}}

    def differ(r):
        theirs = fields(r)
        return ", ".join(v for k, v in theirs.items() if v and own.get(k) != v)

    own = fields(base)
    text = ", ".join(v for v in own.values() if v)
    cross = differ(recipe_for(method, recipe="cross"))
    fewshot = differ(recipe_for(method, recipe="fewshot"))
    imagenet = differ(recipe_for(method, "imagenet", recipe="base2novel"))
    return (text + (f"; cross: {cross}" if cross else "") + (f"; fewshot: {fewshot}" if fewshot else "")
            + (f"; on imagenet: {imagenet}" if imagenet else ""))


def methods_help() -> str:
    """--method's help: one line per method, what it learns and its recipe defaults."""
    width = max(map(len, METHOD_SUMMARIES))
    lines = [f"method to train (default {TrainConfig.method}). Each with its recipe: batch, lr, "
             "epochs (warm-up "
             "epochs at lr 1e-5) of base2novel, and where the cross recipe or imagenet differ; "
             "--batch-size, --lr, --epochs override them:"]
    lines += [f"{name:<{width}}  {what}; {recipe_summary(name)}"
              for name, what in METHOD_SUMMARIES.items()]
    return "\n".join(lines)


def datasets_help() -> str:
    """--dataset's help: the datasets by kind, and what --data-root must hold for each; each kind
    says what it is first, its names after (a name at the start of a line reads like a heading)."""
    lines = [f"dataset (default {DEFAULT_DATASET}), by kind:"]
    lines += [f"- {what}: {', '.join(names)}" for what, names in DATASET_GROUPS]
    return "\n".join(lines)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written; an argument's help keeps its own line breaks (each line wrapped
    on its own, later lines indented); "(default: X)" appended where a flag has a default worth
    showing (not None, False or an empty list) and its help does not state it already."""

    def _split_lines(self, text, width):
        import re
        import textwrap

        lines = text.splitlines()
        out = super()._split_lines(lines[0], width) if lines else []
        for line in lines[1:]:  # a listed line: "name  what", wrapped under "what"
            name, gap, what = re.match(r"(\S+)(\s{2,})?(.*)", line).groups()
            hang = 2 + len(name) + len(gap or " ") if gap else 6
            parts = textwrap.wrap(what if gap else line, max(width - hang, 20))
            head = f"  {name}{gap}" if gap else "  "
            out += [(head if i == 0 else " " * hang) + part for i, part in enumerate(parts)]
        return out

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or "default" in text.lower() or default is None
                or default is False or default == [] or default is argparse.SUPPRESS
                or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"
