"""python -m fastprompt.predict --model RUN_DIR|FILE.onnx|FILE.plan IMAGE_OR_DIR... [options]

Classifies images with a run (torch), an exported ONNX file (onnxruntime) or a TensorRT engine,
using evaluation's preprocessing (`test_transform` with the model's image size, mean and std).
Prints the top-k classes with softmax probabilities per image (`--json`: one JSON object a line).
Directories are searched recursively for image files. Unreadable images are skipped, each
reported on stderr (`warning: cannot read image PATH: reason; skipped`); when none can be read,
that is one `error:` line. The classifying is the library's (`model.predict`,
`fastprompt.classifier.top_classes`). Exit status: 0 when at least one image was classified, 1
when none could be read or the model failed while running, 2 for bad input (model not found,
unknown format, missing path), with one line on stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

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


class Unreadable:
    """The images predict cannot read: one `warning:` line each (the image is skipped) once some
    image was classified; held back until then, so that a run that classifies none says so in
    one line (`nothing_read`)."""

    def __init__(self):
        self.held: list[str] = []
        self.live = False

    def __call__(self, index: int, path, reason: str) -> None:
        line = f"cannot read image {path}: {reason}"
        if self.live:
            _skipped(line)
        else:
            self.held.append(line)

    def release(self) -> None:
        self.live = True
        for line in self.held:
            _skipped(line)
        self.held.clear()

    def nothing_read(self, count: int) -> str:
        if count == 1 and self.held:
            return self.held[0]
        first = f" (first: {self.held[0]})" if self.held else ""
        return f"none of the {count} images could be read{first}"


def _skipped(line: str) -> None:
    from fastprompt.cli import warning

    warning(f"{line}; skipped")


def format_line(path: str, top: list[tuple[str, float]]) -> str:
    return f"{path}: " + ", ".join(f"{name} {p:.3f}" for name, p in top)


def predict(runner, paths: list[str], topk: int = 5, batch_size: int = 32, as_json: bool = False,
            out=None) -> int:
    """Classify `paths` (`fastprompt.classifier.top_classes`, the library's own `predict`), print
    one result per readable image; return how many were classified. When none could be read,
    that is one `error:` line. A model output holding NaN/inf is a RunnerError, never printed."""
    from fastprompt.classifier import top_classes
    from fastprompt.cli import error

    out = sys.stdout if out is None else out
    unreadable = Unreadable()
    done = 0
    for i, top in top_classes(runner, paths, topk, batch_size, unreadable):
        unreadable.release()
        if as_json:
            print(json.dumps({"image": paths[i], "top": [{"class": c, "prob": round(p, 6)}
                                                         for c, p in top]}, allow_nan=False),
                  file=out)
        else:
            print(format_line(paths[i], top), file=out)
        done += 1
    if done == 0:
        error(unreadable.nothing_read(len(paths)))
    return done


def main(argv=None) -> int:
    """Exit status: see the module docstring; errors are one line (`fastprompt.cli.run_cli`),
    and a reader that closes the pipe early (`... | head -1`) ends the run quietly."""
    from fastprompt.cli import run_cli

    return run_cli(lambda: _main(argv))


def _main(argv) -> int:
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
    return 0 if predict(runner, paths, args.topk, args.batch_size, args.json) else 1


if __name__ == "__main__":
    sys.exit(main())
