"""The library's jobs: `fit(config)` trains and evaluates a run, `evaluate(run)` scores a saved one.

`python -m fastprompt.train` and `python -m fastprompt.table` are thin layers over these. `fit`
follows the data protocol (Dassl's few-shot draw, the base/novel split), builds the method over the
backbone, trains it (`fastprompt.training`) and evaluates it, and leaves a run directory:

    config.json          what rebuilds the model (method, options, backbone, class names) + "run":
                         dataset, data root, seed, subsample, recipe, novel class names
    adapter.safetensors  the trained tensors          checkpoint.safetensors  + momentum, epoch
    split.json           the few-shot images           log.jsonl               one line per epoch
    metrics.json         accuracies, throughput, and how the run executed (device, precision, plain)
    curves.png           the training curves

Both print nothing themselves: `log`, `warn` and `progress` are callables taking one line.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from .config import TrainConfig

SPLIT = "split.json"
#: `zero_shot_ref="auto"` evaluates zero-shot CLIP as a reference below this many backbone
#: parameters (the tiny CLIP has 2.1M; ViT-B/16 150M)
ZERO_SHOT_REF_MAX_PARAMS = 30_000_000
#: the few-shot record of a resumed run must match the new draw: these settings define it
RESUME_KEYS = ("method", "model", "dataset", "seed", "subsample", "shots")


def _quiet(message: str) -> None:
    """The default `log` / `warn`: nothing is printed."""


def fit(config: TrainConfig, log=None, warn=None, progress=None) -> dict | None:
    """Train and evaluate the run `config` describes; returns its metrics (None on a non-main
    DDP rank). `log` gets the opening line and one line per epoch, `warn` each setting that runs
    but will disappoint (`fastprompt.runlog.walls`), `progress` a line every few seconds while an
    epoch runs outside a terminal (default: silent)."""
    from .api import method_class
    from .clip import check_weights
    from .recipes import recipe_for
    from .rundir import open_run_dir
    from .runtime import runtime_env

    started = time.perf_counter()
    config.validate()
    hooks = {"log": log or _quiet, "warn": warn or _quiet, "progress": progress}
    method_class(config.method)  # unknown method: fail before loading anything
    check_weights(config.model, config.weights)  # in seconds, before the run directory is touched
    env = runtime_env(config)
    recipe = recipe_for(config.method, _canonical(config.dataset_name), protocol(config),
                        epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                        shots=config.shots, **config.recipe_overrides)
    config = with_absolute_root(config)
    inputs = _prepare(config, env, recipe)  # every input is checked before --out is touched
    out = Path(config.run_dir)
    with open_run_dir(out, config.resume, config.overwrite, env.main) as work:
        return _fit_locked(config, started, env, recipe, out, work, inputs, hooks)


def with_absolute_root(config: TrainConfig) -> TrainConfig:
    """`config` with its data root absolute, as config.json records it (a run evaluates from
    any directory)."""
    import os

    if not config.data_root:
        return config
    return dataclasses.replace(config, data_root=os.path.abspath(os.path.expanduser(config.data_root)))


def protocol(config: TrainConfig) -> str:
    """The recipe set of the run: named, or chosen by the protocol (`recipes.default_protocol`)."""
    from .recipes import default_protocol

    return config.recipe or default_protocol(config.dataset_name, config.subsample)


def _canonical(dataset: str) -> str:
    from .data import canonical_name

    return canonical_name(dataset)


def _prepare(config: TrainConfig, env, recipe) -> dict:
    """What the run is made of, each input checked on the way: the data (the few-shot draw; a
    run that trains nothing needs no --shots images), the halves, the --eval-datasets, the
    backbone, and the method built over it with its options."""
    import torch

    from .api import create, split_options
    from .clip import load_clip
    from .data import few_shot, load_dataset, split_base_novel

    data = few_shot(load_dataset(config.dataset_name, config.data_root), recipe.shots,
                    seed=config.seed, strict=recipe.trains)
    base, novel = split_base_novel(data) if config.subsample == "base" else (data, None)
    evals = {name: load_dataset(name, config.data_root) for name in config.eval_datasets}
    options = method_options(config, recipe)
    split_options(config.method, options)  # option names and values, before the backbone loads
    clip = load_clip(config.model, config.weights, seed=config.backbone_seed, device=env.device,
                     quick_gelu=config.quick_gelu)
    torch.manual_seed(config.seed)  # the learnable parameters' init follows the seed (Dassl's rule)
    model = create(config.method, clip, base.classnames, **options)
    if config.plain:
        model.set_fast(False)
    return {"base": base, "novel": novel, "evals": evals, "options": options, "clip": clip,
            "model": model}


def _fit_locked(config: TrainConfig, started: float, env, recipe, out: Path, work: Path,
                inputs: dict, hooks: dict):
    """fit's body, while this process holds the run directory `out` (`fastprompt.rundir`);
    the run's files go to `work` (`out` itself, or beside the old run for --overwrite)."""
    from .rundir import check_resume
    from .training import train

    base, novel, clip, model = inputs["base"], inputs["novel"], inputs["clip"], inputs["model"]
    dataset = config.dataset_name
    if config.resume:
        settings = {**dataclasses.asdict(config), "dataset": dataset, "shots": recipe.shots}
        check_resume(out, {k: settings[k] for k in RESUME_KEYS})
        check_resumed_backbone(out, clip)
    if env.main:
        _check_split(work, {"train": _split_record(base.train), "val": _split_record(base.val)},
                     config.resume)
    extra = {"run": {"dataset": dataset, "data_root": config.data_root, "seed": config.seed,
                     "subsample": config.subsample, "recipe": dataclasses.asdict(recipe),
                     "novel_classnames": novel.classnames if novel else []}}
    if env.main:
        _announce(config, recipe, clip, env, out, base, novel, inputs["options"], hooks)
    stats = train(model, recipe, base.train, work, env, resume=config.resume, extra=extra,
                  log=hooks["log"], progress=hooks["progress"], val=base.val)
    if not env.main:
        return None
    metrics = evaluate_base_novel(model, config, env, base, novel, inputs["evals"])
    metrics.update(zero_shot_reference(config, config.method, clip, env, base, novel))
    metrics.update(stats)
    metrics["runtime"] = {"device": str(env.device), "precision": env.precision,
                          "plain": config.plain, "world_size": env.world_size}
    metrics["wall_s"] = time.perf_counter() - started
    return _finish(work, out, metrics)


def check_resumed_backbone(out: Path, clip) -> None:
    """A resumed run continues on the backbone weights it was started with (the fingerprint in its
    config.json), not on a replaced file or another init seed."""
    from .checkpoint import CONFIG, check_fingerprint, read_config

    if (out / CONFIG).is_file():
        check_fingerprint(read_config(out)["backbone"], clip, out)


def _split_record(items) -> list:
    return [[d.source, d.label, d.classname] for d in items]


def _check_split(out: Path, record: dict, resume: bool) -> None:
    """A run keeps the images it was trained on: a resumed run must draw the same ones."""
    from .data import DataError
    from .files import write_json

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


def _announce(config: TrainConfig, recipe, clip, env, out, base, novel, options, hooks) -> None:
    """The opening line (`log`) and the warnings (`warn`) of a run (not repeated on resume)."""
    from .runlog import opening_line, walls, weights_text

    dataset = config.dataset_name + (f" ({config.data_root})" if config.data_root else "")
    hooks["log"](opening_line(
        method=config.method, dataset=dataset, protocol=protocol(config), recipe=recipe,
        base=base.classnames, novel=novel.classnames if novel else None, images=len(base.train),
        backbone=weights_text(config.model, config.weights, config.backbone_seed, clip.quick_gelu),
        device=str(env.device), precision=env.precision, out=out,
        prompts=options.get("templates")))
    for line in env.notes:
        hooks["warn"](line)
    if config.resume:  # the run's first start warned already
        return
    for line in walls(method=config.method, model=config.model,
                      dataset=_canonical(config.dataset_name), subsample=config.subsample,
                      recipe=recipe, base=base.classnames, novel=novel.classnames if novel else None):
        hooks["warn"](line)


def method_options(config: TrainConfig, recipe) -> dict:
    """The method's options: the recipe's, then the config's; a method with a `shots` option
    (LAMM's parameter-term weight) gets the run's shots; one with `templates` (zero-shot) the
    dataset's CoOp prompt, or the config's template / ensemble; and what the method takes from the
    dataset (`Method.dataset_options`: KgCoOp's teacher prompt) unless given."""
    from .api import method_class
    from .errors import InputError, setting
    from .recipes import zero_shot_templates

    options = {**recipe.options, **config.options}
    cls = method_class(config.method)
    for key, value in cls.dataset_options(_canonical(config.dataset_name)).items():
        options.setdefault(key, value)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    if "shots" in fields:
        options.setdefault("shots", recipe.shots)
    if "templates" in fields:
        options.setdefault("templates", zero_shot_templates(config.dataset_name, config.template,
                                                            config.ensemble))
    elif config.template or config.ensemble:
        raise InputError(f"{setting('--template')} / {setting('--ensemble')} set the prompts of "
                         f"zero-shot CLIP; {config.method} starts from 'a photo of a {{}}.' (see its options)")
    return options


def zero_shot_reference(config: TrainConfig, method: str, clip, env, base, novel) -> dict:
    """Zero-shot CLIP (the dataset's CoOp prompt) on the same evaluation images, as a reference:
    {"zeroshot_ref": {...}} when asked or cheap (`zero_shot_ref`, default auto: a backbone under
    ZERO_SHOT_REF_MAX_PARAMS), else {"zeroshot_ref_skipped": why}; {} for a zero-shot run itself."""
    from .methods import reference_method

    reference = reference_method()
    if method == reference:
        return {}
    if config.zero_shot_ref == "never":
        return {"zeroshot_ref_skipped": "--zero-shot-ref never"}
    size = sum(p.numel() for p in clip.model.parameters())
    if config.zero_shot_ref == "auto" and size > ZERO_SHOT_REF_MAX_PARAMS:
        return {"zeroshot_ref_skipped": f"the backbone has {size / 1e6:.0f}M parameters; "
                                        f"--zero-shot-ref always adds it, or run --method {reference}"}
    ref = zero_shot_scores(dataclasses.replace(config, eval_datasets=()), clip, env, base, novel)
    return {"zeroshot_ref": {k: v for k, v in ref.items() if k in ("base_acc", "novel_acc", "hm", "acc")}}


def zero_shot_scores(config: TrainConfig, clip, env, base, novel) -> dict:
    """`evaluate_base_novel` of zero-shot CLIP (the reference method) prompted as `config` says:
    its template / ensemble, else CoOp's template of the dataset."""
    from .api import create
    from .methods import reference_method
    from .recipes import zero_shot_templates

    model = create(reference_method(), clip, base.classnames,
                   templates=zero_shot_templates(config.dataset_name, config.template, config.ensemble))
    return evaluate_base_novel(model, config, env, base, novel)


def evaluate_base_novel(model, config: TrainConfig, env, base, novel, loaded=None) -> dict:
    """Accuracy of `model` on the base and novel halves (`config.eval_split`) and their HM, and
    on each of `config.eval_datasets` (`loaded`: those already loaded, by name)."""
    from .data import load_dataset
    from .scoring import harmonic_mean, score

    unreadable: list = []
    sets: dict = {}

    def acc(names, items, label):
        result = score(model.classifier(names), items, env.device, workers=env.workers,
                       precision=env.precision, on_error=env.on_error)
        unreadable.extend(result.unreadable)  # left out of the accuracy, counted in metrics
        sets[label] = {"classes": len(names), "images": result.read}
        return result.acc

    pick = (lambda d: d.val) if config.eval_split == "val" else (lambda d: d.test)
    if novel is not None:
        b = acc(base.classnames, pick(base), "base")
        n = acc(novel.classnames, pick(novel), "novel")
        metrics = {"base_acc": b, "novel_acc": n, "hm": harmonic_mean(b, n)}
    else:
        metrics = {"acc": acc(base.classnames, pick(base), "all")}
    for name in config.eval_datasets:
        d = (loaded or {}).get(name) or load_dataset(name, config.data_root)
        metrics[f"acc_{name}"] = acc(d.classnames, pick(d), name)
    metrics["eval_unreadable_images"] = len(unreadable)
    metrics["eval_split"], metrics["eval_sets"] = config.eval_split, sets
    return metrics


def _finish(work: Path, out: Path, metrics: dict) -> dict:
    from .files import write_json
    from .plot import plot_curves

    write_json(work / "metrics.json", metrics)
    plot_curves(work)
    return {**metrics, "run_dir": str(out)}


def evaluate(run, config: TrainConfig | None = None, log=None, warn=None, **settings) -> dict:
    """Accuracy of the saved run `run` on its own protocol (base and novel classes of its dataset)
    or on `dataset` (all classes), plus `eval_datasets`, with the zero-shot reference of `fit`.
    Settings (dataset, data_root, eval_datasets, eval_split, device, precision, workers, on_error,
    zero_shot_ref) come from `config` and then the keywords; `log` gets an opening line, `warn`
    each setting changed to run (e.g. --workers above the CPUs)."""
    from .checkpoint import load, read_config
    from .data import DataError, load_dataset, split_base_novel
    from .errors import setting
    from .runlog import weights_text
    from .runtime import runtime_env

    config = with_absolute_root(dataclasses.replace(config or TrainConfig(), **settings).validate())
    run = Path(run)
    info = read_config(run).get("run", {})
    env = runtime_env(config)
    dataset = config.dataset or info.get("dataset", config.dataset_name)
    root = config.data_root or info.get("data_root")
    config = dataclasses.replace(config, dataset=dataset, data_root=root)
    if dataset == info.get("dataset") and info.get("subsample", "base") == "base":
        base, novel = split_base_novel(load_dataset(dataset, root))
    else:
        base, novel = load_dataset(dataset, root), None
    evals = {name: load_dataset(name, root) for name in config.eval_datasets}
    model = load(run, device=env.device).eval()
    if novel is not None and base.classnames != model.classnames:
        raise DataError(f"the base classes of {dataset} differ from those of {run}: wrong "
                        f"{setting('--data-root')}?")
    for line in env.notes:
        (warn or _quiet)(line)
    clip = model.clip
    (log or _quiet)(f"evaluating {run} ({model.name}) on {dataset}"
                    f"{f' ({root})' if root else ''}, "
                    f"{'base and novel classes' if novel else f'all {len(base.classnames)} classes'}"
                    f" | {weights_text(clip.name, clip.pretrained, clip.seed, clip.quick_gelu)} | "
                    f"{env.device} {env.precision}")
    metrics = evaluate_base_novel(model, config, env, base, novel, evals)
    metrics.update(zero_shot_reference(config, model.name, clip, env, base, novel))
    return metrics
