"""`python -m fastprompt.table`: base-to-novel accuracy of every method over datasets and seeds.

Trains each method with its default recipe (16 shots, base classes) on each dataset, by default the
generated ones (`fastprompt.data.generated`) with the shipped pretrained tiny CLIP on the CPU, for a
few seeds, and prints the base / novel / HM table averaged over seeds (markdown). `--readme
README.md` also rewrites the table between the markers `<!-- table:begin -->` and
`<!-- table:end -->` in that file.

Every other flag goes to `python -m fastprompt.train` (see its --help) for each run, so real
datasets in the CoOp layout work as they do there, e.g.

    python -m fastprompt.table --datasets oxford_pets,dtd --data-root ~/data \\
        --model ViT-B-16 --pretrained openai --device cuda --methods coop,maple

The table sets --method, --dataset, --seed and --out itself (use --methods / --datasets /
--seeds) and always trains base-to-novel (--subsample base).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import math
import sys
import tempfile
import time
from pathlib import Path

from .config import TrainConfig
from .errors import InputError, first_line, short_repr
from .files import write_json

BEGIN, END = "<!-- table:begin -->", "<!-- table:end -->"
#: train-CLI settings that the table decides for each run (dest -> the table's own flag)
RESERVED = {"method": "--methods", "dataset": "--datasets", "seed": "--seeds", "out": None,
            "resume": None, "eval_only": None, "run": None, "subsample": None, "overwrite": None}


def table_methods() -> list[str]:
    """Every registered method, in the registry's order (zero-shot first)."""
    from .methods import METHODS

    return list(METHODS)


def cell_config(method: str, dataset: str, seed: int = 1, pretrained: str | None = "shapes",
                out=None, base: TrainConfig | None = None) -> TrainConfig:
    """The TrainConfig of one table run: `base` (the train flags passed through; default: the
    CPU, no progress lines) for `method` on `dataset`, base-to-novel. `pretrained` None is random
    init."""
    base = base or TrainConfig(device="cpu", progress=False)
    return dataclasses.replace(base, method=method, dataset=dataset, seed=seed, subsample="base",
                               pretrained=pretrained or "none", out=None if out is None else str(out),
                               resume=False, overwrite=False)


def run_one(method: str, dataset: str, seed: int, pretrained: str | None = "shapes", out=None,
            base: TrainConfig | None = None) -> dict:
    """One base-to-novel run through the library's training job (`fastprompt.fit`); the
    reference method (zero-shot) is evaluated without a run directory (`zero_shot`)."""
    from .jobs import fit
    from .methods import reference_method

    if method == reference_method():
        return zero_shot(dataset, pretrained, base=base)
    with tempfile.TemporaryDirectory() as tmp:
        return fit(cell_config(method, dataset, seed, pretrained, out or Path(tmp) / "run", base))


def zero_shot(dataset: str, pretrained: str | None = "shapes", split: str = "test",
              base: TrainConfig | None = None) -> dict:
    """Zero-shot CLIP (CoOp's prompt of the dataset) on the base and the novel classes of
    `dataset`, with the backbone, data and evaluation settings of `base`; no run directory."""
    from .clip import load_clip
    from .data import load_dataset, split_base_novel
    from .jobs import zero_shot_scores
    from .methods import reference_method
    from .runtime import runtime_env

    config = dataclasses.replace(cell_config(reference_method(), dataset, 1, pretrained, base=base),
                                 eval_split=split)
    env = runtime_env(config)
    clip = load_clip(config.model, config.weights, seed=config.backbone_seed, device=env.device,
                     quick_gelu=config.quick_gelu)
    return zero_shot_scores(config, clip, env, *split_base_novel(load_dataset(dataset, config.data_root)))


def collect(methods, datasets, seeds, pretrained: str | None = "shapes", log=print,
            base: TrainConfig | None = None) -> dict:
    """{(dataset, method): [per-seed metrics]}; `base`: the train settings of every run. The
    reference method (zero-shot) does not depend on the seed: it is evaluated once per dataset and
    repeated for each seed."""
    from .methods import reference_method

    results = {}
    for dataset in datasets:
        for method in methods:
            rows = []
            for seed in seeds:
                t0 = time.perf_counter()
                if method == reference_method() and rows:
                    m = rows[0]
                else:
                    m = run_one(method, dataset, seed, pretrained, base=base)
                rows.append({"seed": seed, **{k: m[k] for k in ("base_acc", "novel_acc", "hm")}})
                if log:
                    log(f"{dataset} {method} seed {seed}: base {m['base_acc']:.1f} novel "
                        f"{m['novel_acc']:.1f} hm {m['hm']:.1f} ({time.perf_counter() - t0:.0f} s)")
            results[(dataset, method)] = rows
    return results


def chance(dataset: str, root=None) -> tuple[float, float]:
    """Chance accuracy (percent) on the base and on the novel half of `dataset` (under `root`,
    the --data-root, for the datasets that live on disk)."""
    from .data import load_dataset, split_base_novel

    base, novel = split_base_novel(load_dataset(dataset, root))
    return 100 / len(base.classnames), 100 / len(novel.classnames)


def summarize(rows: list[dict]) -> dict:
    """Seed-averaged base and novel accuracy, and the HM of those averages (as the papers report
    it: CoCoOp's 75.83 = HM(80.47, 71.69), not the mean of per-seed HMs)."""
    from .scoring import harmonic_mean

    base = sum(r["base_acc"] for r in rows) / len(rows)
    novel = sum(r["novel_acc"] for r in rows) / len(rows)
    return {"base_acc": base, "novel_acc": novel, "hm": harmonic_mean(base, novel)}


def markdown(results: dict, seeds, root=None) -> str:
    """The table: one row per (dataset, method) and, over several datasets, an average row per
    method (mean base, mean novel over datasets, HM of those means)."""
    lines = ["| dataset | method | base | novel | HM |", "|---|---|---|---|---|"]
    summary = {key: summarize(rows) for key, rows in results.items()}
    datasets = list(dict.fromkeys(d for d, _ in results))
    rows = list(summary.items())
    if len(datasets) > 1:
        for method in dict.fromkeys(m for _, m in results):
            per = [summary[(d, method)] for d in datasets if (d, method) in summary]
            if len(per) == len(datasets):
                rows.append((("average", method), summarize(per)))
    for (dataset, method), m in rows:
        if not all(math.isfinite(m[k]) for k in ("base_acc", "novel_acc", "hm")):
            raise InputError(f"the {dataset} / {method} row is not finite ({m}): no table is written")
        lines.append(f"| {dataset} | {method} | {m['base_acc']:.1f} | {m['novel_acc']:.1f} "
                     f"| {m['hm']:.1f} |")
    odds = ", ".join(f"{d} {'/'.join(f'{c:.1f}' for c in chance(d, root))}" for d in datasets)
    return "\n".join(lines) + (f"\n\nBase and novel: mean over seeds {', '.join(map(str, seeds))}; "
                               f"HM of those means; average rows: mean over datasets. "
                               f"Chance (base/novel, %): {odds}.")


def readme_parts(path: Path) -> tuple[str, str]:
    """The text of `path` before its BEGIN marker and from its END marker on (InputError, one
    line, if the file is not UTF-8 text with BEGIN before END)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text: give the README (markdown) to write the "
                         f"table into") from None
    begin = text.find(BEGIN)
    end = text.find(END, begin + len(BEGIN)) if begin >= 0 else -1
    if end < 0:
        raise InputError(f"{path} has no {BEGIN} followed by {END}: put the two markers, in this "
                         f"order, where the table goes")
    return text[:begin], text[end:]


def write_readme(path: Path, table: str) -> None:
    """Replace the table between the markers of `path` (written atomically)."""
    from .files import write_text

    head, tail = readme_parts(path)
    write_text(path, head + BEGIN + "\n" + table + "\n" + tail)


def read_results(path: Path) -> dict:
    """{(dataset, method): rows} from a file written by --json (InputError, one line, if not):
    each row's accuracies are numbers from 0 to 100, its seed an integer."""
    from .readers import loads

    def bad(why: str):
        return InputError(f"{path} is not a table written by --json: {why}")

    try:
        saved = loads(path.read_bytes())
    except ValueError as err:  # not UTF-8, not JSON, NaN, too deep
        raise bad(first_line(err)[:80]) from None
    if not isinstance(saved, dict) or not saved:
        raise bad("no 'dataset/method' rows")
    results = {}
    for key, rows in saved.items():
        name = tuple(key.rsplit("/", 1))
        if len(name) != 2 or not all(name) or not isinstance(rows, list) or not rows:
            raise bad(f"entry {key[:60]!r} is not 'dataset/method' with a list of rows")
        for r in rows:
            if not isinstance(r, dict):
                raise bad(f"a row of {key[:60]!r} is {short_repr(r)}, not an object")
            for k in ("base_acc", "novel_acc", "hm"):
                v = r.get(k)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 100:
                    raise bad(f"'{k}' of {key[:60]!r} is {short_repr(v)}, not a percentage")
            if "seed" in r and (isinstance(r["seed"], bool) or not isinstance(r["seed"], int)):
                raise bad(f"'seed' of {key[:60]!r} is {short_repr(r['seed'])}, not an integer")
        results[name] = [dict(r) for r in rows]
    return results


def check_train_flags(parser: argparse.ArgumentParser, extra: list[str]) -> TrainConfig:
    """The TrainConfig of the train flags passed through (the train CLI's own parser, so its
    errors and --config apply; the CPU and no progress lines unless given), refusing those the
    table sets for each run."""
    from .train import config_from_args, parse_args

    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):  # the train parser's usage would mislead here
            given = parse_args(extra)
    except SystemExit:
        parser.error(errors.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1])
    default = vars(parse_args([]))
    for dest, own in RESERVED.items():
        if getattr(given, dest) != default[dest]:
            flag = "--" + dest.replace("_", "-")
            parser.error(f"{flag} is set by the table for each run" + (f": use {own}" if own else ""))
    given.device, given.no_progress = given.device or "cpu", True
    return config_from_args(given)


def main(argv=None) -> int:
    from .train import run_cli

    return run_cli(lambda: _main(argv))  # the train CLI's one-line errors


def _main(argv) -> int:
    from .catalog import GENERATED_DATASETS, method_names  # no torch before --help is handled
    from .cli import Parser

    p = Parser("python -m fastprompt.table", __doc__,
               allow_abbrev=False)  # a prefix must not swallow a train flag
    p.add_argument("--methods", default=",".join(method_names()), help="comma-separated methods")
    p.add_argument("--datasets", default=",".join(GENERATED_DATASETS),
                   help="comma-separated datasets (see python -m fastprompt.train --help)")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated seeds; the table shows their mean")
    p.add_argument("--readme", default=None, help="rewrite the table in this file")
    p.add_argument("--json", default=None, help="also write the per-seed results here")
    p.add_argument("--from-json", default=None,
                   help="rebuild the table from a file written by --json instead of training "
                        "(give --data-root too if its datasets live on disk: for the chance line)")
    a, extra = p.parse_known_args(argv)
    train = check_train_flags(p, extra)
    if a.readme:
        readme_parts(Path(a.readme))  # a README that cannot take the table: said before any run
    try:
        seeds = [int(s) for s in a.seeds.split(",")]
    except ValueError:
        raise InputError(f"--seeds must be comma-separated integers, got {a.seeds!r}") from None
    if a.from_json:
        results = read_results(Path(a.from_json))
        seeds = sorted({r["seed"] for rows in results.values() for r in rows if "seed" in r}) or seeds
    else:
        results = collect(a.methods.split(","), a.datasets.split(","), seeds, train.weights,
                          log=lambda m: print(m, flush=True), base=train)
    table = markdown(results, seeds, train.data_root)
    print(table)
    if a.json:
        write_json(Path(a.json), {f"{d}/{m}": r for (d, m), r in results.items()})
    if a.readme:
        write_readme(Path(a.readme), table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
