"""`python -m fastprompt.convert`: a checkpoint of the authors' code -> a fastprompt run directory.

    python -m fastprompt.convert --original maple output/base2new/train_base/dtd/seed1 \\
        --model ViT-B-16 --pretrained openai --dataset dtd --data-root DATA --subsample base \\
        [--original-config configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml] --out runs/maple-dtd

CHECKPOINT is a `model.pth.tar-N` / `model-best.pth.tar` file or the original output directory
(newest epoch). The class names come from --classnames FILE (one per line, or a JSON list) or from
--dataset/--data-root (CoOp layouts; --subsample base takes the base half, as the original
DATASET.SUBSAMPLE_CLASSES). The run directory works with `export`, `predict` and `--eval-only`.
An --out that already holds a run is refused unless --overwrite, which replaces it only once the
new run is written. Bad input: one line on stderr, exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from .errors import InputError, first_line


def parse_args(argv=None) -> argparse.Namespace:
    from .catalog import method_names
    from .cli import Parser

    p = Parser("python -m fastprompt.convert", __doc__)
    p.add_argument("--original", nargs=2, required=True, metavar=("METHOD", "CHECKPOINT"),
                   help=f"fastprompt method name ({', '.join(method_names(trained=True))}) and the "
                        f"original checkpoint file or output directory")
    p.add_argument("--model", default="ViT-B-16", help="backbone the checkpoint was trained on")
    p.add_argument("--pretrained", default="openai",
                   help="its weights: open_clip tag or file ('none': random init from --backbone-seed)")
    p.add_argument("--backbone-seed", type=int, default=0, help="seed of a random-init backbone")
    names = p.add_mutually_exclusive_group(required=True)
    names.add_argument("--classnames", help="file: one class name per line, or a JSON list")
    names.add_argument("--dataset", help="dataset whose class names the checkpoint was trained on")
    p.add_argument("--data-root", default=None, help="folder holding the dataset")
    p.add_argument("--subsample", choices=["all", "base"], default=None,
                   help="classes of --dataset: all, or the base half (default: the config's "
                        "DATASET.SUBSAMPLE_CLASSES, else all)")
    p.add_argument("--original-config", default=None, help="the original trainer YAML")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (the old run stays until the new one "
                        "is written)")
    return p.parse_args(argv)


def read_classnames(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise InputError(f"class-name file not found: {file}")
    try:
        text = file.read_text(encoding="utf-8")
        names = json.loads(text) if file.suffix == ".json" else \
            [line.strip() for line in text.splitlines() if line.strip()]
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise InputError(f"{file} is not a UTF-8 list of class names ({first_line(err)})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise InputError(f"{file} must hold a JSON list of class names")
    if not names:
        raise InputError(f"{file} holds no class names")
    return names


def _subsample(args) -> str:
    if args.subsample:
        return args.subsample
    if args.original_config and Path(args.original_config).is_file():
        from .train import read_config_file

        conf = read_config_file(Path(args.original_config))
        dataset = conf.get("DATASET") or {}
        value = str(dataset.get("SUBSAMPLE_CLASSES", "all") if isinstance(dataset, dict)
                    else "?").lower()
        if value in ("all", "base"):
            return value
        raise InputError(f"DATASET.SUBSAMPLE_CLASSES={value!r} in {args.original_config}: a "
                         f"checkpoint is trained on 'base' or 'all' classes; pass --subsample")
    return "all"


def run(args) -> Path:
    """Convert as `args` say; every input is read and checked before --out is touched, and an
    --overwrite keeps the old run until the new one is written (`fastprompt.rundir`)."""
    import fastprompt as fp
    from .rundir import open_run_dir

    model, extra = convert(args)
    with open_run_dir(args.out, overwrite=args.overwrite) as work:  # never over a run unasked
        fp.save(model, work, extra=extra)
    return Path(args.out)


def convert(args) -> tuple:
    """(the fastprompt model of the original checkpoint, what config.json records beside it)."""
    import os

    import fastprompt as fp
    from .original import OriginalCheckpointWarning, find_checkpoint, load_original

    method, checkpoint = args.original
    extra: dict = {}
    if args.original_config:  # unreadable or bad YAML: one line, before anything is loaded
        from .train import read_config_file
        read_config_file(Path(args.original_config))
    if args.classnames:
        classnames = read_classnames(args.classnames)
    else:
        from .data import load_dataset, split_base_novel
        data, subsample = load_dataset(args.dataset, args.data_root), _subsample(args)
        base, novel = split_base_novel(data) if subsample == "base" else (data, None)
        classnames = base.classnames
        root = os.path.abspath(os.path.expanduser(args.data_root)) if args.data_root else None
        extra["run"] = {"dataset": args.dataset, "data_root": root, "subsample": subsample,
                        "novel_classnames": novel.classnames if novel else []}
    file = find_checkpoint(method, checkpoint)
    from .config import resolve_weights

    clip = fp.load_clip(args.model, resolve_weights(args.model, args.pretrained or None),
                        seed=args.backbone_seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", OriginalCheckpointWarning)
        model = load_original(method, file, clip, classnames, config=args.original_config)
    from .cli import warning

    for w in caught:
        warning(w.message)
    extra["original"] = {"method": method, "checkpoint": os.path.abspath(file),
                         "config": os.path.abspath(args.original_config) if args.original_config
                         else None}
    return model, extra


def main(argv=None) -> int:
    """Bad input: one line on stderr, exit status 2 (`fastprompt.cli.run_cli`)."""
    from .cli import run_cli

    args = parse_args(argv)
    return run_cli(lambda: _convert(args))


def _convert(args) -> int:
    out = run(args)
    print(f"wrote {out} ({args.original[0]} from {args.original[1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
