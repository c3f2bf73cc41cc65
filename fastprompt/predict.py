"""python -m fastprompt.predict --model RUN_DIR|FILE.onnx|FILE.plan IMAGE_OR_DIR... [options]

Classifies images with a run (torch), an exported ONNX file (onnxruntime) or a TensorRT engine,
using evaluation's preprocessing (`test_transform` with the model's image size, mean and std).
Prints the top-k classes with softmax probabilities per image (`--json`: one JSON object a line).
Directories are searched recursively for image files. Unreadable images are reported by path on
stderr and skipped. Exit status: 0 when at least one image was classified, 1 when none could be
read or the model failed while running, 2 for bad input (model not found, unknown format, missing
path), with one line on stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterator

from fastprompt.errors import InputError  # noqa: F401 - also importable from here, as before

PROG = "python -m fastprompt.predict"


def parser() -> argparse.ArgumentParser:
    from fastprompt.cli import Parser

    p = Parser(PROG, "Classify images with a fastprompt run, ONNX file or TensorRT engine.")
    p.add_argument("--model", required=True, help="run directory, .onnx file or .plan engine")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR",
                   help="image files and folders (searched recursively)")
    p.add_argument("--topk", type=int, default=5, help="classes to print per image (default %(default)s)")
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default %(default)s)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda for a TensorRT engine, cpu otherwise")
    return p


def image_paths(inputs: list[str]) -> list[str]:
    """Files as given, directories expanded recursively to their image files."""
    from fastprompt.data.folder import image_files
    from fastprompt.data.images import IMAGE_EXTENSIONS

    paths = []
    for item in inputs:
        if os.path.isdir(item):
            found = image_files(item)
            if not found:
                raise InputError(f"no image files under {item} (extensions: {' '.join(IMAGE_EXTENSIONS)})")
            paths.extend(found)
        elif os.path.exists(item):
            paths.append(item)
        else:
            raise InputError(f"no such file or directory: {item}")
    return paths


def read_image(path: str, image_size: int | None = None):
    """8-bit RGB PIL image as training and evaluation read it (`fastprompt.data.decode`: 16-bit
    and palette images, bounded work per image), or None after reporting the path on stderr."""
    from fastprompt.data.decode import ImageReadError, open_rgb

    try:
        return open_rgb(path, image_size)
    except ImageReadError as err:
        print(f"{PROG}: cannot read image {path}: {err}", file=sys.stderr)
        return None


def batches(paths: list[str], transform, size: int,
            image_size: int | None = None) -> Iterator[tuple[list[str], object]]:
    """(paths, image tensor [B, 3, S, S]) batches of the readable images."""
    import torch

    names, tensors = [], []
    for path in paths:
        img = read_image(path, image_size)
        if img is None:
            continue
        names.append(path)
        tensors.append(transform(img))
        if len(names) == size:
            yield names, torch.stack(tensors)
            names, tensors = [], []
    if names:
        yield names, torch.stack(tensors)


def format_line(path: str, top: list[tuple[str, float]]) -> str:
    return f"{path}: " + ", ".join(f"{name} {p:.3f}" for name, p in top)


def predict(runner, paths: list[str], topk: int = 5, batch_size: int = 32, as_json: bool = False,
            out=None) -> int:
    """Classify `paths`, print one result per readable image; return how many were classified.
    A model output holding NaN/inf is a RunnerError (the model is broken), never printed."""
    import torch

    from fastprompt.export.runners import RunnerError
    from fastprompt.scoring import non_finite_rows

    out = sys.stdout if out is None else out
    from fastprompt.data import test_transform

    transform = test_transform(runner.image_size, runner.mean, runner.std)
    k = max(1, min(topk, len(runner.classnames)))
    done = 0
    for names, x in batches(paths, transform, batch_size, runner.image_size):
        if runner.device == "cuda":
            x = x.cuda()
        logits = runner.run(x).float().cpu()
        bad = non_finite_rows(logits)
        if bad:
            raise RunnerError(f"the model's output for {names[bad[0]]} holds NaN/inf: the model is "
                              f"broken; train or export it again")
        probs = torch.softmax(logits, dim=-1)
        values, index = probs.topk(k, dim=-1)
        for path, vals, idx in zip(names, values.tolist(), index.tolist()):
            top = [(runner.classnames[i], v) for i, v in zip(idx, vals)]
            if as_json:
                print(json.dumps({"image": path, "top": [{"class": c, "prob": round(p, 6)}
                                                         for c, p in top]}, allow_nan=False),
                      file=out)
            else:
                print(format_line(path, top), file=out)
            done += 1
    return done


def main(argv=None) -> int:
    """Exit status: see the module docstring; errors are one line (`fastprompt.cli.run_cli`),
    and a reader that closes the pipe early (`... | head -1`) ends the run quietly."""
    from fastprompt.cli import run_cli

    return run_cli(lambda: _main(argv))


def _main(argv) -> int:
    from fastprompt.cli import error

    args = parser().parse_args(argv)  # before any torch import: --help answers at once
    from fastprompt.export.runners import open_runner

    if args.topk < 1 or args.batch_size < 1:
        raise InputError("--topk and --batch-size must be at least 1")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise InputError("--device cuda: torch sees no CUDA device")
    paths = image_paths(args.images)
    runner = open_runner(args.model, args.device)
    if runner.output != "logits":
        raise InputError(f"{args.model} outputs image features, not class logits: export it "
                         f"without --features to classify")
    done = predict(runner, paths, args.topk, args.batch_size, args.json)
    if done == 0:
        error(f"none of the {len(paths)} images could be read")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
