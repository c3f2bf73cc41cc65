"""`python -m fastprompt.train`: tune a method with the published protocol, evaluate, save a run.

With no arguments: MaPLe, base-to-novel, on the generated dataset `shapes_colour` with the built-in
tiny backbone and its shipped pretrained weights (`--pretrained shapes`; `none` for random
init): offline, about 15 s of training on two CPU cores, printing base / novel / HM.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from .data import DataError
from .recipes import Recipe

EXPECTED_ERRORS = (DataError, ValueError, FileNotFoundError)
#: weights of `--model tiny` when --pretrained is not given (fastprompt/weights/tiny-shapes.*)
TINY_DEFAULT_WEIGHTS = "shapes"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastprompt.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="maple", help="one of fastprompt.list_methods()")
    p.add_argument("--model", default="tiny", help="backbone: tiny or an open_clip ViT name")
    p.add_argument("--pretrained", default=None,
                   help="open_clip tag, checkpoint file, or 'none' (random init); default: 'shapes' "
                        "for --model tiny (the shipped pretrained tiny CLIP), none otherwise")
    p.add_argument("--quick-gelu", action=argparse.BooleanOptionalAction, default=None,
                   help="build the backbone with QuickGELU (OpenAI's CLIP) or GELU; default: what "
                        "the weights say (open_clip tag config, OpenAI release file)")
    p.add_argument("--backbone-seed", type=int, default=0, help="seed of a random-init backbone")
    p.add_argument("--dataset", default=None, help="dataset name or folder (default shapes_colour, generated)")
    p.add_argument("--data-root", default=None, help="folder holding the dataset(s)")
    p.add_argument("--shots", type=int, default=None, help="images per class (default 16)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--subsample", choices=["base", "all"], default="base",
                   help="base: train on base classes, test base and novel (HM); all: every class")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--recipe", dest="recipe_name", choices=["base2novel", "cross"], default=None,
                   help="the released scripts' recipe: base2novel, or cross (train on all of "
                        "ImageNet for cross-dataset / domain generalisation: MaPLe lr 0.0026, 2 "
                        "epochs, depth 3); default: cross for --dataset imagenet --subsample all")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, e.g. --opt depth=3 (repeatable)")
    p.add_argument("--template", default=None,
                   help="zeroshot: prompt with {} for the class name (default: CoOp's template of "
                        "the dataset, e.g. 'a photo of a {}, a type of pet.' for oxford_pets)")
    p.add_argument("--ensemble", action="store_true",
                   help="zeroshot: prompt ensembling as CoOp's ZeroshotCLIP2 (7 ImageNet templates "
                        "+ the dataset's own, except on ImageNet)")
    p.add_argument("--config", default=None, help="YAML/JSON recipe: any of these flags + 'options'")
    p.add_argument("--plain", action="store_true",
                   help="turn every optimisation off (kernels, text shortcut, caches, CUDA graphs): "
                        "the original-style baseline")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="run the training step eagerly instead of replaying a captured CUDA graph")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    p.add_argument("--workers", type=int, default=None, help="data loader workers")
    p.add_argument("--on-error", choices=["skip", "raise"], default="skip",
                   help="unreadable images: skip them (counted) or stop")
    p.add_argument("--out", default=None, help="run directory (default runs/DATASET/METHOD/seedN)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--eval-only", action="store_true", help="evaluate the run in --run")
    p.add_argument("--run", default=None, help="run directory for --eval-only")
    p.add_argument("--eval-datasets", default=None, help="comma-separated datasets to also test on")
    p.add_argument("--eval-split", choices=["test", "val"], default="test")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.recipe = {}
    if args.config:
        _apply_config(p, args, argv)
    if args.pretrained is None and args.model == "tiny":
        args.pretrained = TINY_DEFAULT_WEIGHTS
    if isinstance(args.pretrained, str) and args.pretrained.lower() in ("none", "random"):
        args.pretrained = None
    return args


def _apply_config(parser, args, argv) -> None:
    """Values of --config FILE fill every flag not given on the command line."""
    path = Path(args.config)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml
        conf = yaml.safe_load(text) or {}
    else:
        conf = json.loads(text)
    options = conf.pop("options", {}) or {}
    recipe_fields = {f.name for f in dataclasses.fields(Recipe)} - {"options"}
    args.recipe = {k: conf.pop(k) for k in list(conf) if k in recipe_fields and not hasattr(args, k)}
    given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
    for key, value in conf.items():
        dest = key.replace("-", "_")
        if not hasattr(args, dest):
            raise ValueError(f"unknown key '{key}' in {path}; use the long flag names (e.g. "
                             f"batch_size), recipe fields (e.g. warmup_epochs) or 'options'")
        if f"--{dest.replace('_', '-')}" not in given:
            setattr(args, dest, value)
    args.opt = [f"{k}={json.dumps(v)}" for k, v in options.items()] + list(args.opt)


def parse_options(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--opt needs KEY=VALUE, got '{pair}'")
        key, value = pair.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv=None) -> int:
    return run_cli(lambda: run(parse_args(argv)))


def run_cli(body) -> int:
    """``body()``'s exit code; the expected failures (bad data, checkpoint, backbone, NaN loss,
    GPU out of memory, Ctrl-C) become one line on stderr and an exit code, not a traceback."""
    try:
        return body()
    except KeyboardInterrupt:
        print("interrupted: the last finished epoch is saved; --resume continues", file=sys.stderr)
        return 130
    except Exception as err:  # expected failures: one line, no traceback
        from .checkpoint import CheckpointError
        from .clip import BackboneError
        from .training import TrainingError
        import torch
        if isinstance(err, torch.OutOfMemoryError):
            print("error: GPU out of memory: lower --batch-size (or use --precision bf16); "
                  "finished epochs are saved, --resume continues", file=sys.stderr)
            return 3
        if isinstance(err, EXPECTED_ERRORS + (TrainingError, BackboneError, CheckpointError)):
            msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            print(f"error: {msg}", file=sys.stderr)
            return 2
        raise


def run(args) -> int:
    from .runner import evaluate_run, train_run

    t0 = time.perf_counter()
    if args.eval_only:
        metrics = evaluate_run(args)
    else:
        metrics = train_run(args)
    if metrics is None:  # a non-main DDP rank
        return 0
    metrics.setdefault("wall_s", time.perf_counter() - t0)
    print(format_metrics(metrics))
    return 0


def format_metrics(m: dict) -> str:
    keys = [k for k in ("base_acc", "novel_acc", "hm", "acc") if k in m]
    parts = [f"{k} {m[k]:.2f}" for k in keys]
    parts += [f"{k} {v:.2f}" for k, v in m.items() if k.startswith("acc_")]
    return "  ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
