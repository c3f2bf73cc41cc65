"""`python -m fastprompt.table`: the accuracy of every method over datasets and seeds.

Trains each method with its default recipe (16 shots) on each dataset, by default the generated
ones (`fastprompt.data.generated`) with the shipped pretrained tiny CLIP on the CPU, for a few
seeds, and prints the table averaged over seeds (markdown): base / novel / HM (`--protocol
base2novel`, the default) or the accuracy over all classes (`--protocol fewshot`). `--readme
README.md` also rewrites the table between its markers in that file (`<!-- table:begin -->` ...,
`<!-- table-fewshot:begin -->` ...).

Each (dataset, method, seed) is a cell with a result file of its own under `--cells DIR`
(`fastprompt.cells`): runs of one method train `--pack N` at a time in one packed pass, a cell
already computed is not computed again (a killed table picks up where it stopped), and
`--shard I/N` (or a Slurm array task, or a torchrun rank) computes the I-th of N disjoint parts;
`--merge DIR...` builds the table from the cells present, saying which are missing.

Every other flag goes to `python -m fastprompt.train` (see its --help) for each run, so real
datasets in the CoOp layout work as they do there, e.g.

    python -m fastprompt.table --datasets oxford_pets,dtd --data-root ~/data \\
        --model ViT-B-16 --pretrained openai --device cuda --methods coop,maple

The table sets --method, --dataset, --seed, --out and --subsample itself (use --methods /
--datasets / --seeds / --protocol).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import sys
import tempfile
import time
from pathlib import Path

from .config import TrainConfig
from .errors import InputError, first_line
from .files import write_json
from .tablefile import (BEGIN, COLUMNS, END, chance, markdown, read_results,  # noqa: F401
                        readme_parts, summarize, write_readme)

SUBSAMPLE = {"base2novel": "base", "fewshot": "all"}
#: train-CLI settings that the table decides for each run (dest -> the table's own flag)
RESERVED = {"method": "--methods", "dataset": "--datasets", "seed": "--seeds", "out": None,
            "resume": None, "eval_only": None, "run": None, "subsample": None, "overwrite": None}


def table_methods() -> list[str]:
    """Every registered method, in the registry's order (zero-shot first)."""
    from .methods import METHODS

    return list(METHODS)


def cell_config(method: str, dataset: str, seed: int = 1, pretrained: str | None = "shapes",
                out=None, base: TrainConfig | None = None, protocol: str = "base2novel") -> TrainConfig:
    """The TrainConfig of one table run: `base` (the train flags passed through; default: the
    CPU, no progress lines) for `method` on `dataset`, base-to-novel (or all classes, `fewshot`).
    `pretrained` None is random init."""
    base = base or TrainConfig(device="cpu", progress=False)
    return dataclasses.replace(base, method=method, dataset=dataset, seed=seed,
                               subsample=SUBSAMPLE[protocol], pretrained=pretrained or "none",
                               out=None if out is None else str(out), resume=False, overwrite=False,
                               distributed=False)  # under torchrun each rank is a shard, alone


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
              base: TrainConfig | None = None, protocol: str = "base2novel") -> dict:
    """Zero-shot CLIP (CoOp's prompt of the dataset) on the base and the novel classes of
    `dataset` (all classes: `fewshot`), with the backbone, data and evaluation settings of `base`;
    no run directory."""
    from .clip import load_clip
    from .data import load_dataset, split_base_novel
    from .jobs import zero_shot_scores
    from .methods import reference_method
    from .runtime import runtime_env

    config = dataclasses.replace(cell_config(reference_method(), dataset, 1, pretrained, base=base,
                                             protocol=protocol), eval_split=split)
    env = runtime_env(config)
    clip = load_clip(config.model, config.weights, seed=config.backbone_seed, device=env.device,
                     quick_gelu=config.quick_gelu)
    data = load_dataset(dataset, config.data_root)
    halves = split_base_novel(data) if protocol == "base2novel" else (data, None)
    return zero_shot_scores(config, clip, env, *halves)


def collect(methods, datasets, seeds, pretrained: str | None = "shapes", log=print,
            base: TrainConfig | None = None, cells=None, pack: int = 8, shard=(0, 1),
            protocol: str = "base2novel") -> tuple[dict, list[str]]:
    """Compute this shard's cells of the table (`fastprompt.cells`) and read every cell present:
    ({(dataset, method): [per-seed metrics]}, names of the cells still missing). `base`: the
    train settings of every run; `cells`: the cells folder (default: a temporary one)."""
    from .cells import CellStore, grid, units
    from .methods import reference_method

    reference = reference_method()
    every = grid(list(methods), list(datasets), list(seeds), reference)
    with contextlib.ExitStack() as stack:
        if cells is None:
            cells = stack.enter_context(tempfile.TemporaryDirectory(prefix="fastprompt-table-"))
        store = CellStore(cells)
        configs = {c: cell_config(c.method, c.dataset, c.seed, pretrained, store.run_dir(c), base,
                                  protocol) for c in every}
        index, count = shard
        for unit in units(every, pack, reference)[index::count]:
            _compute(unit, store, configs, reference, protocol, log)
        present = {c: store.read(c, _settings(configs[c])) for c in every}
    found = {c: m for c, m in present.items() if m is not None}
    return _rows(found, methods, datasets, seeds, reference, protocol)


def _cell(dataset, method, seed):
    from .cells import Cell

    return Cell(dataset, method, seed)


def _settings(config) -> dict:
    from .cells import settings

    return settings(config)


def _compute(unit: list, store, configs: dict, reference: str, protocol: str, log) -> None:
    """The unit's cells that have no result yet: the reference method evaluated, the others
    trained in one packed pass (`fastprompt.fit_many`); each result written when its run ends.
    A cell whose run was cut short resumes; one that failed is said and left without a result."""
    from .sweep import fit_many

    todo = [c for c in unit if store.read(c, _settings(configs[c])) is None]
    if not todo:
        return
    t0 = time.perf_counter()

    def done(i, metrics):
        cell = todo[i]
        if isinstance(metrics, BaseException):
            log(f"{cell.name}: failed ({first_line(metrics)}); run the table again to retry it")
            return
        store.write(cell, metrics, _settings(configs[cell]))
        shown = ", ".join(f"{k.replace('_acc', '')} {metrics[k]:.1f}" for k in COLUMNS[protocol])
        log(f"{cell.name}: {shown} ({time.perf_counter() - t0:.0f} s)")

    if todo[0].method == reference:
        for i, cell in enumerate(todo):
            config = configs[cell]
            done(i, zero_shot(cell.dataset, config.pretrained, base=config, protocol=protocol))
        return
    runs = []
    for cell in todo:
        run_dir = store.run_dir(cell)
        cut_short = (run_dir / "checkpoint.safetensors").is_file() and not (run_dir / "metrics.json").is_file()
        runs.append(dataclasses.replace(configs[cell], resume=cut_short))
    fit_many(runs, pack=len(runs), on_done=done)


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
    p.add_argument("--methods", default=None,
                   help="comma-separated methods (default: every method the protocol applies to)")
    p.add_argument("--datasets", default=",".join(GENERATED_DATASETS),
                   help="comma-separated datasets (see python -m fastprompt.train --help)")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated seeds; the table shows their mean")
    p.add_argument("--protocol", choices=["base2novel", "fewshot"], default="base2novel",
                   help="base2novel: train on the base half, test base and novel (HM); fewshot: "
                        "train and test on every class")
    p.add_argument("--cells", default=None, metavar="DIR",
                   help="keep each cell's run and result here (runs/, cells/): a cell with a result "
                        "is not computed again, a cut-short one resumes (default: a temporary "
                        "folder, nothing kept; needed with --shard)")
    p.add_argument("--pack", type=int, default=8, metavar="N",
                   help="train up to N runs of a method together, one pass over the frozen "
                        "backbone (1: one after the other)")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="compute the I-th of N disjoint parts of the cells (1 <= I <= N); default: "
                        "a Slurm array task's (SLURM_ARRAY_TASK_ID/COUNT) or torchrun's "
                        "(RANK/WORLD_SIZE) part, else all")
    p.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                   help="build the table from the cells in these --cells folders (no training), "
                        "saying which are missing")
    p.add_argument("--readme", default=None, help="rewrite the table in this file")
    p.add_argument("--json", default=None, help="also write the per-seed results here")
    p.add_argument("--from-json", default=None,
                   help="rebuild the table from a file written by --json instead of training "
                        "(give --data-root too if its datasets live on disk: for the chance line)")
    a, extra = p.parse_known_args(argv)
    train = check_train_flags(p, extra)
    if a.readme:
        readme_parts(Path(a.readme), a.protocol)  # a README that cannot take the table: said first
    seeds = _ints(a.seeds, "--seeds")
    methods = a.methods.split(",") if a.methods else method_names(protocol=a.protocol)
    datasets = a.datasets.split(",")
    missing: list = []
    if a.pack < 1:
        raise InputError(f"--pack must be an integer >= 1, got {a.pack}")
    if a.from_json:
        results = read_results(Path(a.from_json))
        seeds = sorted({r["seed"] for rows in results.values() for r in rows if "seed" in r}) or seeds
    elif a.merge:
        results, missing = merged(a.merge, methods, datasets, seeds, train, a.protocol)
    else:
        from .cells import shard_of

        shard = shard_of(a.shard)
        if shard[1] > 1 and a.cells is None:
            raise InputError("--shard needs --cells DIR: where this part's cells are kept for "
                             "--merge (a folder every shard can reach, or one per shard)")
        results, missing = collect(methods, datasets, seeds, train.weights,
                                   log=lambda m: print(m, flush=True), base=train, cells=a.cells,
                                   pack=a.pack, shard=shard, protocol=a.protocol)
        if shard[1] > 1:
            print(f"shard {shard[0] + 1}/{shard[1]} done; {len(missing)} cells of the table are "
                  f"missing here: python -m fastprompt.table --merge {a.cells} [other folders] "
                  f"builds it", flush=True)
            if missing:
                return 0
    if missing:
        print(f"warning: {len(missing)} cells missing: {', '.join(missing[:10])}"
              f"{' ...' if len(missing) > 10 else ''}", file=sys.stderr, flush=True)
    if not results:
        raise InputError("no cell of this table has a result: nothing to show")
    table = markdown(results, seeds, train.data_root, missing)
    print(table)
    if a.json:
        write_json(Path(a.json), {f"{d}/{m}": r for (d, m), r in results.items()})
    if a.readme:
        write_readme(Path(a.readme), table, a.protocol)
    return 0


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise InputError(f"{flag} must be comma-separated integers, got {text!r}") from None


def merged(folders: list, methods, datasets, seeds, base, protocol) -> tuple[dict, list[str]]:
    """The table's rows from the cells found in `folders` (the --cells folders of its shards),
    each made with this table's settings; a cell found in two folders must hold the same
    accuracies. Also: the names of the cells found nowhere."""
    from .cells import CellStore, grid
    from .methods import reference_method

    stores = []
    for folder in folders:
        if not Path(folder).is_dir():
            raise InputError(f"--merge {folder}: no such folder")
        stores.append(CellStore(folder))
    reference = reference_method()
    found: dict = {}
    for cell in grid(list(methods), list(datasets), list(seeds), reference):
        want = _settings(cell_config(cell.method, cell.dataset, cell.seed, base.weights, None, base,
                                     protocol))
        for store in stores:
            m = store.read(cell, want)
            if m is not None and found.setdefault(cell, m) != m:
                raise InputError(f"{cell.name} has other accuracies in {store.root} than in "
                                 f"another --merge folder: cells of two different tables")
    return _rows(found, methods, datasets, seeds, reference, protocol)


def _rows(found: dict, methods, datasets, seeds, reference, protocol) -> tuple[dict, list[str]]:
    """({(dataset, method): per-seed rows}, missing cell names) from {cell: metrics}."""
    results, missing = {}, []
    for dataset in datasets:
        for method in methods:
            rows = []
            for seed in seeds:
                m = found.get(_cell(dataset, method, seeds[0] if method == reference else seed))
                if m is None:
                    missing.append(f"{dataset}/{method}/seed{seed}")
                else:
                    rows.append({"seed": seed, **{k: m[k] for k in COLUMNS[protocol]}})
            if rows:
                results[(dataset, method)] = rows
    return results, missing


if __name__ == "__main__":
    sys.exit(main())
