"""What a training run says (text only, no printing, no torch): the opening line, the warnings
where a user walks into a wall, and the closing block. The runner builds them from what it knows;
the command line (`fastprompt.train`) or any other `log` / `warn` callback prints them."""
from __future__ import annotations

from pathlib import Path

#: datasets drawn in memory, the domain the built-in tiny backbone was pretrained for
GENERATED = ("builtin", "shapes_colour", "shapes_texture", "shapes_count")
#: the files of a run directory, in the order a user opens them
RUN_FILES = ("metrics.json", "curves.png", "log.jsonl", "split.json", "config.json",
             "adapter.safetensors", "checkpoint.safetensors")


def _n(count: int, noun: str, plural: str = "") -> str:
    return f"{count} {noun if count == 1 else plural or noun + 's'}"


def _num(x: float) -> str:
    """A learning rate as people write it: 0.0035, 1e-5."""
    return f"{x:g}".replace("e-0", "e-")


def _classes(names: list[str], most: int = 4) -> str:
    shown = ", ".join(names[:most])
    return shown + (f", ... ({len(names)} in all)" if len(names) > most else "")


def weights_text(model: str, pretrained: str | None, seed: int, quick_gelu: bool) -> str:
    weights = f"weights {pretrained}" if pretrained else f"random init (seed {seed})"
    return f"backbone {model}, {weights}, {'QuickGELU' if quick_gelu else 'GELU'}"


def opening_line(*, method: str, dataset: str, protocol: str, recipe, base: list[str],
                 novel: list[str] | None, images: int, backbone: str, device: str,
                 precision: str, out, prompts: list[str] | None = None) -> str:
    """One line: method; dataset, protocol (base-to-novel, or all classes) and the classes, shots
    and images trained on; backbone; the recipe (named by its release: base2novel, cross or
    fewshot) with its epochs, batch and lr; device and precision; the run directory."""
    if novel:
        classes = (f"{_n(len(base), 'base class', 'base classes')} (the other {len(novel)}, "
                   f"novel, held out for testing)")
    else:
        classes = f"all {len(base)} classes"
    if not recipe.trains:
        what = f"{dataset}: {classes}"
        schedule = "no training, prompt " + " + ".join(repr(p) for p in (prompts or [])[:2]) + (
            f" + {len(prompts) - 2} more" if prompts and len(prompts) > 2 else "")
    else:
        what = (f"{dataset}{', base-to-novel' if novel else ''}: {classes}, {recipe.shots} shots, "
                f"{images} training images")
        warm = f" ({recipe.warmup_epochs} warm-up at lr {_num(recipe.warmup_lr)})" if recipe.warmup_epochs else ""
        how = f", {recipe.optimizer_text()}" if recipe.optimizer_text() else ""
        schedule = (f"{protocol} recipe: {recipe.length_text()}{warm}, batch {recipe.batch_size}, "
                    f"lr {_num(recipe.lr)}{how}")
    return f"{method} on {what} | {backbone} | {schedule} | {device} {precision} | run dir {out}"


def walls(*, method: str, model: str, dataset: str, subsample: str, recipe, base: list[str],
          novel: list[str] | None) -> list[str]:
    """Warnings for settings that run but do not do what a user expects."""
    found = []
    if 0 < recipe.epochs <= recipe.warmup_epochs:
        found.append(
            f"--epochs {recipe.epochs} ends inside the warm-up ({_n(recipe.warmup_epochs, 'epoch')} at lr "
            f"{_num(recipe.warmup_lr)}, Dassl's schedule): the learning rate never reaches "
            f"{_num(recipe.lr)}, so {method} learns next to nothing; use --epochs "
            f"{recipe.warmup_epochs + 1} or more")
    if model == "tiny" and dataset not in GENERATED:
        found.append(
            f"--model tiny is the built-in toy CLIP (32x32 pixels, pretrained on generated shapes "
            f"only): on {dataset} images its accuracy means little; use a real backbone, e.g. "
            f"--model ViT-B-16 --pretrained openai")
    if dataset == "folder" and subsample == "base" and novel:
        found.append(
            f"--subsample base trains on {len(base)} of the {len(base) + len(novel)} classes "
            f"({_classes(base)}) and keeps {_classes(novel)} out of training, to test on as novel "
            f"classes; to train a classifier of every class use --subsample all")
    return found


def _row(label: str, sizes: dict | None, acc: float | None, ref: float | None, has_ref: bool) -> str:
    size = (f"({_n(sizes['classes'], 'class', 'classes')}, {_n(sizes['images'], 'image')})"
            if sizes else "")
    cells = f"{acc:9.2f}" if acc is not None else f"{'':9}"
    if has_ref:
        cells += f" {ref:10.2f}" if ref is not None else f" {'':10}"
    return f"  {label:<6} {size:<30} {cells}"


def closing_block(metrics: dict, run_dir=None) -> str:
    """The results (base / novel / HM, or acc, on the evaluation split, labelled), the zero-shot
    reference or why it was skipped, wall time, and where the files are."""
    split = metrics.get("eval_split", "test")
    sets = metrics.get("eval_sets", {})
    ref = metrics.get("zeroshot_ref") or {}
    has_ref = bool(ref)
    head = f"  {'':<6} {'':<30} {'this run':>9}" + (f" {'zero-shot':>10}" if has_ref else "")
    lines = [f"accuracy (%) on the {split} split, images never used in training:", head]
    keys = [("base", "base_acc"), ("novel", "novel_acc"), ("HM", "hm")] if "hm" in metrics \
        else [("all", "acc")]
    for label, key in keys:
        lines.append(_row(label, sets.get(label.lower()), metrics.get(key), ref.get(key), has_ref))
    for key, value in metrics.items():
        if key.startswith("acc_"):
            lines.append(_row(key[4:], sets.get(key[4:]), value, None, has_ref))
    if metrics.get("eval_unreadable_images"):
        lines.append(f"  ({metrics['eval_unreadable_images']} unreadable test images left out)")
    if not has_ref and metrics.get("zeroshot_ref_skipped"):
        lines.append(f"zero-shot reference skipped: {metrics['zeroshot_ref_skipped']}")
    wall = f"wall time {metrics['wall_s']:.1f} s" if "wall_s" in metrics else ""
    if metrics.get("train_wall_s"):
        rate = metrics["train_images_per_s"]
        wall += f" (training {metrics['train_wall_s']:.1f} s, {rate:.{0 if rate >= 10 else 1}f} images/s)"
    if wall:
        lines.append(wall)
    if run_dir is not None:
        present = [name for name in RUN_FILES if (Path(run_dir) / name).is_file()]
        lines.append(f"files in {run_dir}: {', '.join(present)}")
    return "\n".join(lines)
