"""`python -m fastprompt.train`: tune a method with the published protocol, evaluate, save a run.

With no arguments: MaPLe, base-to-novel, on the generated dataset `shapes_colour` with the built-in
tiny backbone and its shipped pretrained weights (`--pretrained shapes`; `none` for random
init): offline, about 29 s (18 s of it training) on two busy CPU cores, printing base / novel /
HM.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .config import MAX_SEED, TINY_DEFAULT_WEIGHTS, TrainConfig  # noqa: F401 (importable: as before)
from .errors import ConfigError, InputError, first_line


def parser() -> argparse.ArgumentParser:
    """The train CLI's flags; builds without torch, so that --help answers at once."""
    from .catalog import datasets_help, methods_help
    from .cli import Parser

    p = Parser("python -m fastprompt.train", __doc__)
    default = TrainConfig  # the flags' defaults are the library's (its dataclass fields)
    p.add_argument("--method", default=default.method, help=methods_help())
    p.add_argument("--model", default=default.model,
                   help="backbone: 'tiny' (built in, a toy for generated shapes) or an open_clip ViT "
                        "name such as ViT-B-16 (with --pretrained openai), or hf-hub:ORG/REPO")
    p.add_argument("--pretrained", default=None,
                   help="open_clip tag, checkpoint file, or 'none' (random init); default: 'shapes' "
                        "for --model tiny (the shipped pretrained tiny CLIP), none otherwise")
    p.add_argument("--quick-gelu", action=argparse.BooleanOptionalAction, default=None,
                   help="build the backbone with QuickGELU (OpenAI's CLIP) or GELU; default: what "
                        "the weights say (open_clip tag config, OpenAI release file)")
    p.add_argument("--backbone-seed", type=int, default=default.backbone_seed,
                   help="seed of a random-init backbone")
    p.add_argument("--dataset", default=None, help=datasets_help())
    p.add_argument("--data-root", default=None,
                   help="folder holding the dataset(s); not needed for the generated ones")
    p.add_argument("--shots", type=int, default=None,
                   help="training images per class (default 16; every class needs that many)")
    p.add_argument("--seed", type=int, default=default.seed,
                   help="seed of the few-shot draw, the learned parameters' init and the data order")
    p.add_argument("--subsample", choices=["base", "all"], default=default.subsample,
                   help="base: train on the first half of the classes, test on them (base) and on "
                        "the other half (novel, never trained on) and report the HM; all: train "
                        "and test on every class")
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs, the warm-up included (default: the method's recipe)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the method's recipe")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate after the warm-up (default: the method's recipe)")
    p.add_argument("--recipe", dest="recipe_name", choices=["base2novel", "cross", "fewshot"],
                   default=None,
                   help="the released scripts' recipe: base2novel, cross (train on all of "
                        "ImageNet for cross-dataset / domain generalisation: MaPLe lr 0.0026, 2 "
                        "epochs, depth 3) or fewshot (all classes of one dataset); default: cross "
                        "for --dataset imagenet --subsample all, fewshot for --subsample all "
                        "elsewhere (a method without its own uses its base2novel recipe)")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, e.g. --opt depth=3 (repeatable)")
    p.add_argument("--template", default=None,
                   help="zeroshot: prompt with {} for the class name (default: CoOp's template of "
                        "the dataset, e.g. 'a photo of a {}, a type of pet.' for oxford_pets)")
    p.add_argument("--ensemble", action="store_true",
                   help="zeroshot: prompt ensembling as CoOp's ZeroshotCLIP2 (7 ImageNet templates "
                        "+ the dataset's own, except on ImageNet)")
    p.add_argument("--zero-shot-ref", choices=["auto", "always", "never"], default=default.zero_shot_ref,
                   help="also evaluate zero-shot CLIP on the same test images, as a reference in "
                        "the summary and curves.png; auto: when the backbone is small "
                        "(default: %(default)s)")
    p.add_argument("--config", default=None, help="YAML/JSON recipe: any of these flags + 'options'")
    p.add_argument("--plain", action="store_true",
                   help="turn every optimisation off (kernels, text shortcut, caches, CUDA graphs): "
                        "the original-style baseline")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="run the training step eagerly instead of replaying a captured CUDA graph")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default=default.precision,
                   help="auto: bf16 autocast on CUDA, fp32 on the CPU")
    p.add_argument("--workers", type=int, default=None,
                   help="data loader worker processes (default: 4 on CUDA, 0 on the CPU; at most "
                        "the CPUs this process may use)")
    p.add_argument("--on-error", choices=["skip", "raise"], default=default.on_error,
                   help="unreadable images: skip them (counted) or stop")
    p.add_argument("--out", default=None, help="run directory (default runs/DATASET/METHOD/seedN)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out: the new run is built beside it and "
                        "replaces it when it is done (interrupted, the old run stays)")
    p.add_argument("--eval-only", action="store_true", help="evaluate the run in --run")
    p.add_argument("--run", default=None, help="run directory for --eval-only")
    p.add_argument("--eval-datasets", default=None, help="comma-separated datasets to also test on")
    p.add_argument("--eval-split", choices=["test", "val"], default=default.eval_split,
                   help="the split the reported accuracies are measured on")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (on a terminal) or progress lines (in a log)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (and --config FILE's values for flags not given) as a Namespace; the
    numbers are checked when it becomes a TrainConfig (`config_from_args`)."""
    p = parser()
    args = p.parse_args(argv)
    args.recipe = {}
    if args.config:
        _apply_config(p, args, argv)
    return args


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed train flags (validated: bad numbers are one line naming the flag)."""
    config = TrainConfig(
        method=args.method, options=parse_options(args.opt), template=args.template,
        ensemble=args.ensemble, model=args.model, pretrained=args.pretrained,
        quick_gelu=args.quick_gelu, backbone_seed=args.backbone_seed, dataset=args.dataset,
        data_root=args.data_root, shots=args.shots, seed=args.seed, subsample=args.subsample,
        eval_datasets=tuple(n.strip() for n in (args.eval_datasets or "").split(",") if n.strip()),
        eval_split=args.eval_split, on_error=args.on_error, recipe=args.recipe_name,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, recipe_overrides=dict(args.recipe),
        device=args.device, precision=args.precision, workers=args.workers, plain=args.plain,
        cuda_graphs=not args.no_cuda_graphs, progress=not args.no_progress,
        zero_shot_ref=args.zero_shot_ref, out=args.out, resume=args.resume, overwrite=args.overwrite)
    return config.validate(recipe_source=args.config)


def read_config_file(path: Path) -> dict:
    """The mapping of a YAML/JSON recipe file (ConfigError, one line, if it cannot be read)."""
    from .readers import load_yaml, loads

    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text: give a YAML or JSON file") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            conf = load_yaml(text)  # no aliases: a few bytes of them could expand without end
        except ValueError as err:
            raise ConfigError(f"{path} is {first_line(err)}") from None
    else:
        try:
            conf = loads(text)
        except ValueError as err:
            raise ConfigError(f"{path} is not valid JSON: {first_line(err)}") from None
    if conf is None:
        return {}
    if not isinstance(conf, dict):
        raise ConfigError(f"{path} must hold a mapping of flag names to values, not a "
                          f"{type(conf).__name__}")
    return conf


def _flag_value(action: argparse.Action, key: str, value, path: Path):
    """A config-file value for `action`'s flag, coerced like the command line would."""
    from .options import coerce

    label = f"'{key}' in {path}"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return coerce("", key, bool, value, label)
    if isinstance(action, argparse._AppendAction):
        raise ConfigError(f"'{key}' in {path}: give method options under 'options:'")
    if value is None:
        return None
    kind = action.type if action.type in (int, float) else str
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # e.g. "dataset: 101" or "pretrained: 2023"
    value = coerce("", key, kind, value, label)
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"'{key}' in {path} must be one of {', '.join(map(str, action.choices))}, "
                          f"got {value!r}")
    return value


def _option_text(value) -> str:
    """A YAML/JSON option value as the text `--opt KEY=TEXT` would give (then coerced by type)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (int, float, str)):
        return str(value)
    return json.dumps(value, default=str)  # a list or mapping: no option takes one, from_options says so


def _apply_config(parser, args, argv) -> None:
    """Values of --config FILE fill every flag not given on the command line, each coerced by
    the flag's own type (recipe fields by the Recipe's, options by the method config's)."""
    from .options import coerce, field_types
    from .recipes import Recipe

    path = Path(args.config)
    conf = dict(read_config_file(path))
    options = conf.pop("options", None) or {}
    if not isinstance(options, dict):
        raise ConfigError(f"'options' in {path} must be a mapping of option names to values")
    actions = {a.dest: a for a in parser._actions}
    recipe_types = {k: v for k, v in field_types(Recipe).items() if k != "options"}
    args.recipe = {k: coerce("", k, recipe_types[k], conf.pop(k), f"'{k}' in {path}")
                   for k in list(conf) if k in recipe_types and k not in actions}
    given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
    for key, value in conf.items():
        dest = str(key).replace("-", "_")
        if dest not in actions or dest in ("help", "config"):
            raise ConfigError(f"unknown key '{key}' in {path}; use the long flag names (e.g. "
                              f"batch_size), recipe fields (e.g. warmup_epochs) or 'options'")
        if f"--{dest.replace('_', '-')}" not in given:
            setattr(args, dest, _flag_value(actions[dest], str(key), value, path))
    args.opt = [f"{k}={_option_text(v)}" for k, v in options.items()] + list(args.opt)


def parse_options(pairs: list[str]) -> dict:
    """--opt KEY=VALUE pairs -> {KEY: VALUE text}; the method's config coerces each by its
    field's type (`fastprompt.options`). A JSON string literal ("...") is unquoted."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise InputError(f"--opt needs KEY=VALUE, got '{pair}'")
        key, value = pair.split("=", 1)
        if len(value) >= 2 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        out[key.strip()] = value
    return out


def main(argv=None) -> int:
    return run_cli(lambda: run(parse_args(argv)))


def run_cli(body) -> int:
    """``body()``'s exit code through the shared CLI handler (`fastprompt.cli.run_cli`): the
    expected failures become one line on stderr, Ctrl-C says how to resume."""
    from .cli import run_cli as handle

    return handle(body, interrupted="interrupted: the last finished epoch is saved (--resume "
                                    "continues; an --overwrite keeps the old run instead)")


def _warn(message: str) -> None:
    from .cli import warning

    warning(message)


def _say(line: str) -> None:
    print(line, flush=True)


def run(args) -> int:
    """Train (`fastprompt.fit`) or --eval-only (`fastprompt.evaluate`) and print what the run
    does: an opening line, one line per epoch, progress lines where stderr is no terminal (where it
    is, tqdm's bar), warnings on stderr, and a closing block (`fastprompt.runlog`), then the metrics
    on one line for scripts (`format_metrics`). Progress lines go to stdout with the epoch lines."""
    from .jobs import evaluate, fit
    from .runlog import closing_block

    t0 = time.perf_counter()
    config = config_from_args(args)
    if args.eval_only:
        if not args.run:
            raise InputError("--eval-only needs --run RUN_DIR")
        metrics = evaluate(args.run, config, log=_say, warn=_warn)
    else:
        metrics = fit(config, log=_say, warn=_warn, progress=_say)
    if metrics is None:  # a non-main DDP rank
        return 0
    metrics.setdefault("wall_s", time.perf_counter() - t0)
    print(closing_block(metrics, metrics.get("run_dir")))
    print(format_metrics(metrics))
    return 0


def format_metrics(m: dict) -> str:
    keys = [k for k in ("base_acc", "novel_acc", "hm", "acc") if k in m]
    parts = [f"{k} {m[k]:.2f}" for k in keys]
    parts += [f"{k} {v:.2f}" for k, v in m.items() if k.startswith("acc_")]
    return "  ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
