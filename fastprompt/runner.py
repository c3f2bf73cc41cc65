"""What `python -m fastprompt.train` does with its arguments: data protocol, model, training,
evaluation, and the files of a run directory (config.json, adapter.safetensors, split.json,
checkpoint.safetensors, log.jsonl, curves.png, metrics.json)."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from .api import create, method_class
from .checkpoint import load, read_config
from .clip import load_clip
from .data import DataError, canonical_name, few_shot, load_dataset, split_base_novel
from .data.generated import DEFAULT_DATASET
from .errors import InputError
from .scoring import harmonic_mean, score
from .files import write_json
from .recipes import default_protocol, recipe_for, zero_shot_templates
from .rundir import check_resume, open_run_dir
from .train import parse_options
from .training import TrainEnv, init_distributed, train

SPLIT = "split.json"
#: `--zero-shot-ref auto` evaluates zero-shot CLIP as a reference below this many backbone
#: parameters (the tiny CLIP has 2.1M; ViT-B/16 150M)
ZERO_SHOT_REF_MAX_PARAMS = 30_000_000


def _quiet(message: str) -> None:
    """The default `log` / `warn` of the library entry points: they print nothing."""


def run_env(args) -> TrainEnv:
    """The TrainEnv (device, precision, workers, ...) of the train CLI's parsed `args`."""
    env = init_distributed(args.device)
    cuda = env.device.type == "cuda"
    env.precision = ("bf16" if cuda else "fp32") if args.precision == "auto" else args.precision
    env.workers = args.workers if args.workers is not None else (4 if cuda else 0)
    env.seed, env.on_error, env.progress = args.seed, args.on_error, not args.no_progress
    env.cuda_graphs = not (args.plain or args.no_cuda_graphs)
    return env


def _split_record(items) -> list:
    return [[d.source, d.label, d.classname] for d in items]


def _check_split(out: Path, record: dict, resume: bool) -> None:
    """A run keeps the images it was trained on: a resumed run must draw the same ones."""
    path = out / SPLIT
    if resume and path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise DataError(f"{path} is corrupt: delete it to resume with the images drawn "
                            f"now, or start a new run in another --out") from None
        if saved != record:
            raise DataError(f"the few-shot images differ from those recorded in {path}: resume "
                            f"with the same --dataset/--shots/--seed/--subsample")
    else:
        write_json(path, record, indent=None)


def _eval_sets(args, dataset: str, root):
    d = load_dataset(dataset, root)
    return d, (d.val if args.eval_split == "val" else d.test)


def train_run(args, log=None, warn=None, progress=None):
    """Train and evaluate as `python -m fastprompt.train` does; returns the metrics (None on a
    non-main DDP rank). `log` gets the opening line and one line per epoch, `warn` each setting
    that runs but will disappoint (`fastprompt.runlog.walls`), `progress` a line every few seconds
    while an epoch runs outside a terminal; each is a callable taking one string (default: silent)."""
    started = time.perf_counter()
    hooks = {"log": log or _quiet, "warn": warn or _quiet, "progress": progress}
    method_class(args.method)  # unknown method: fail before loading anything
    dataset = args.dataset or DEFAULT_DATASET
    env = run_env(args)
    protocol = getattr(args, "recipe_name", None) or default_protocol(dataset, args.subsample)
    recipe = recipe_for(args.method, canonical_name(dataset), protocol, epochs=args.epochs,
                        batch_size=args.batch_size, lr=args.lr, shots=args.shots,
                        **getattr(args, "recipe", {}))
    out = Path(args.out or f"runs/{dataset}/{args.method}/seed{args.seed}")
    with open_run_dir(out, args.resume, getattr(args, "overwrite", False), env.main):
        return _train_locked(args, started, dataset, env, recipe, out, hooks)


def _train_locked(args, started, dataset, env, recipe, out: Path, hooks: dict):
    """train_run's body, while this process holds the run directory (`fastprompt.rundir`)."""
    if args.resume:
        check_resume(out, {"method": args.method, "model": args.model, "dataset": dataset,
                           "seed": args.seed, "subsample": args.subsample, "shots": recipe.shots})
    data = few_shot(load_dataset(dataset, args.data_root), recipe.shots, seed=args.seed)
    if args.subsample == "base":
        train_split, novel = split_base_novel(data)
    else:
        train_split, novel = data, None
    out.mkdir(parents=True, exist_ok=True)
    if env.main:
        _check_split(out, {"train": _split_record(train_split.train),
                           "val": _split_record(train_split.val)}, args.resume)
    clip = load_clip(args.model, args.pretrained, seed=args.backbone_seed, device=env.device,
                     quick_gelu=getattr(args, "quick_gelu", None))
    options = method_options(args, dataset, recipe)
    torch.manual_seed(args.seed)  # the learnable parameters' init follows --seed (Dassl's rule)
    model = create(args.method, clip, train_split.classnames, **options)
    if args.plain:
        model.set_fast(False)
    extra = {"run": {"dataset": dataset, "data_root": args.data_root, "seed": args.seed,
                     "subsample": args.subsample, "recipe": dataclasses.asdict(recipe),
                     "novel_classnames": novel.classnames if novel else [],
                     "plain": args.plain, "precision": env.precision}}
    if env.main:
        _announce(args, dataset, recipe, clip, env, out, train_split, novel, options, hooks)
    stats = train(model, recipe, train_split.train, out, env, resume=args.resume, extra=extra,
                  log=hooks["log"], progress=hooks["progress"])
    if not env.main:
        return None
    metrics = evaluate_base_novel(model, args, env, train_split, novel)
    metrics.update(zero_shot_reference(args, args.method, clip, env, dataset, train_split, novel))
    metrics.update(stats)
    metrics["wall_s"] = time.perf_counter() - started
    return _finish(out, metrics)


def _announce(args, dataset, recipe, clip, env, out, base, novel, options, hooks) -> None:
    """The opening line (`log`) and the warnings (`warn`) of a training run (not repeated when
    it is resumed)."""
    from .runlog import opening_line, walls, weights_text

    protocol = getattr(args, "recipe_name", None) or default_protocol(dataset, args.subsample)
    hooks["log"](opening_line(
        method=args.method, dataset=dataset, protocol=protocol, recipe=recipe,
        base=base.classnames, novel=novel.classnames if novel else None, images=len(base.train),
        backbone=weights_text(args.model, args.pretrained, args.backbone_seed, clip.quick_gelu),
        device=str(env.device), precision=env.precision, out=out,
        prompts=options.get("templates")))
    if args.resume:  # the run's first start warned already
        return
    for line in walls(method=args.method, model=args.model, dataset=canonical_name(dataset),
                      subsample=args.subsample, recipe=recipe, base=base.classnames,
                      novel=novel.classnames if novel else None):
        hooks["warn"](line)


def zero_shot_reference(args, method: str, clip, env, dataset: str, base, novel) -> dict:
    """Zero-shot CLIP (the dataset's CoOp prompt) on the same evaluation images, as a reference:
    {"zeroshot_ref": {...}} when asked or cheap (`--zero-shot-ref`, default auto: a backbone under
    ZERO_SHOT_REF_MAX_PARAMS), else {"zeroshot_ref_skipped": why}; {} for a zero-shot run itself."""
    import argparse

    choice = getattr(args, "zero_shot_ref", "auto")
    if method == "zeroshot":
        return {}
    if choice == "never":
        return {"zeroshot_ref_skipped": "--zero-shot-ref never"}
    size = sum(p.numel() for p in clip.model.parameters())
    if choice == "auto" and size > ZERO_SHOT_REF_MAX_PARAMS:
        return {"zeroshot_ref_skipped": f"the backbone has {size / 1e6:.0f}M parameters; "
                                        f"--zero-shot-ref always adds it, or run --method zeroshot"}
    model = create("zeroshot", clip, base.classnames, templates=zero_shot_templates(dataset))
    ref = evaluate_base_novel(model, argparse.Namespace(**{**vars(args), "eval_datasets": None}),
                              env, base, novel)
    return {"zeroshot_ref": {k: v for k, v in ref.items() if k in ("base_acc", "novel_acc", "hm", "acc")}}


def method_options(args, dataset: str, recipe) -> dict:
    """The method's options: the recipe's, then --opt; LAMM's `shots` follows the run's; zero-shot
    prompts follow the dataset (CoOp's template) or --template / --ensemble."""
    options = {**recipe.options, **parse_options(args.opt)}
    fields = {f.name for f in dataclasses.fields(method_class(args.method).Config)}
    if "shots" in fields:
        options.setdefault("shots", recipe.shots)
    template, ensemble = getattr(args, "template", None), getattr(args, "ensemble", False)
    if "templates" in fields:
        options.setdefault("templates", zero_shot_templates(dataset, template, ensemble))
    elif template or ensemble:
        raise InputError(f"--template / --ensemble set the prompts of --method zeroshot; "
                         f"{args.method} starts from 'a photo of a {{}}.' (see its options)")
    return options


def evaluate_base_novel(model, args, env, base, novel) -> dict:
    """Accuracy of `model` on the base and novel halves (`args.eval_split`) and their HM."""
    unreadable: list = []
    sets: dict = {}

    def acc(names, items, label):
        result = score(model.classifier(names), items, env.device, workers=env.workers,
                       precision=env.precision, on_error=env.on_error)
        unreadable.extend(result.unreadable)  # left out of the accuracy, counted in metrics
        sets[label] = {"classes": len(names), "images": result.read}
        return result.acc

    pick = (lambda d: d.val) if args.eval_split == "val" else (lambda d: d.test)
    if novel is not None:
        b = acc(base.classnames, pick(base), "base")
        n = acc(novel.classnames, pick(novel), "novel")
        metrics = {"base_acc": b, "novel_acc": n, "hm": harmonic_mean(b, n)}
    else:
        metrics = {"acc": acc(base.classnames, pick(base), "all")}
    for name in filter(None, (args.eval_datasets or "").split(",")):
        d, items = _eval_sets(args, name.strip(), args.data_root)
        metrics[f"acc_{name.strip()}"] = acc(d.classnames, items, name.strip())
    metrics["eval_unreadable_images"] = len(unreadable)
    metrics["eval_split"], metrics["eval_sets"] = args.eval_split, sets
    return metrics


def _finish(out: Path, metrics: dict) -> dict:
    from .plot import plot_curves

    write_json(out / "metrics.json", metrics)
    plot_curves(out)
    return {**metrics, "run_dir": str(out)}


def evaluate_run(args, log=None, warn=None, progress=None):
    """--eval-only --run DIR: the saved model on its own protocol or on --dataset/--eval-datasets
    (with the zero-shot reference of `train_run`); `log` gets an opening line."""
    if not args.run:
        raise InputError("--eval-only needs --run RUN_DIR")
    run = Path(args.run)
    info = read_config(run).get("run", {})
    env = run_env(args)
    model = load(run, device=env.device).eval()
    dataset = args.dataset or info.get("dataset", DEFAULT_DATASET)
    root = args.data_root or info.get("data_root")
    if dataset == info.get("dataset") and info.get("subsample", "base") == "base":
        base, novel = split_base_novel(load_dataset(dataset, root))
        if base.classnames != model.classnames:
            raise DataError(f"the base classes of {dataset} differ from those of {run}: wrong --data-root?")
    else:
        base, novel = load_dataset(dataset, root), None
    from .runlog import weights_text

    clip = model.clip
    (log or _quiet)(f"evaluating {run} ({model.name}) on {dataset}, "
                    f"{'base and novel classes' if novel else f'all {len(base.classnames)} classes'}"
                    f" | {weights_text(clip.name, clip.pretrained, clip.seed, clip.quick_gelu)} | "
                    f"{env.device} {env.precision}")
    metrics = evaluate_base_novel(model, args, env, base, novel)
    metrics.update(zero_shot_reference(args, model.name, clip, env, dataset, base, novel))
    return metrics
