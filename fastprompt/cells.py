"""A table's cells: one (dataset, method, seed) run each, trained once, its result a file of its own.

    CELLS/cells/DATASET/METHOD/seedN.json   the cell's accuracies and the settings it was made with
    CELLS/runs/DATASET/METHOD/seedN/        its run directory (`fastprompt.fit`'s files)

The cells of a table are grouped into *units* fixed by the table alone: a method's cells in the
grid's order, `pack` at a time (one packed pass each, `fastprompt.sweep`), and the reference
method's one per dataset (it depends on no seed). A shard (`--shard I/N`, or Slurm's array task,
or torchrun's rank) takes every N-th unit, so two shards never train the same cell, and a cell is
computed in the same pack whichever shard runs it: a table merged from shards equals the table of
one process. A result file is written atomically as soon as its run ends; a cell that has one is
not run again, one whose run was cut short resumes from its last epoch, and a run that finished
before its file was written is reported by `fit` without training (`jobs.finished_metrics`).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

#: TrainConfig fields that say how a cell runs, not what it computes (left out of its settings)
RUNTIME_FIELDS = ("dataset", "method", "seed", "out", "resume", "overwrite", "device", "workers",
                  "progress", "cuda_graphs", "distributed", "plain", "zero_shot_ref")
METRICS = ("base_acc", "novel_acc", "hm", "acc")


@dataclass(frozen=True, order=True)
class Cell:
    dataset: str
    method: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.dataset}/{self.method}/seed{self.seed}"


def grid(methods: list[str], datasets: list[str], seeds: list[int], reference: str) -> list[Cell]:
    """Every cell of a table, dataset by dataset; the reference method once per dataset (the first
    seed: it depends on none)."""
    return [Cell(d, m, s) for d in datasets for m in methods
            for s in (seeds[:1] if m == reference else seeds)]


def units(cells: list[Cell], pack: int, reference: str) -> list[list[Cell]]:
    """The cells grouped into packs, by method in the grid's order, `pack` at a time; the
    reference method's cells one unit each."""
    out = []
    for method in dict.fromkeys(c.method for c in cells):
        mine = [c for c in cells if c.method == method]
        size = 1 if method == reference else max(1, pack)
        out += [mine[i:i + size] for i in range(0, len(mine), size)]
    return out


def shard_of(text: str | None, environ=os.environ) -> tuple[int, int]:
    """(index from 0, count) of this process's shard: `--shard I/N` (I from 1 to N), else Slurm's
    array task (SLURM_ARRAY_TASK_ID minus SLURM_ARRAY_TASK_MIN, of SLURM_ARRAY_TASK_COUNT), else
    torchrun's RANK of WORLD_SIZE, else the whole table (0, 1)."""
    from .readers import ascii_int

    def number(value, what):
        n = ascii_int(value)
        if n is None:
            raise InputError(f"{what} must be an integer, got {str(value)[:20]!r}")
        return n

    if text is not None:
        i, sep, n = str(text).partition("/")
        index, count = number(i, "--shard I/N's I"), number(n, "--shard I/N's N") if sep else 0
        if not 1 <= index <= count:
            raise InputError(f"--shard must be I/N with 1 <= I <= N, got {text!r}")
        return index - 1, count
    if "SLURM_ARRAY_TASK_ID" in environ and "SLURM_ARRAY_TASK_COUNT" in environ:
        index = number(environ["SLURM_ARRAY_TASK_ID"], "SLURM_ARRAY_TASK_ID") - number(
            environ.get("SLURM_ARRAY_TASK_MIN", "0"), "SLURM_ARRAY_TASK_MIN")
        count = number(environ["SLURM_ARRAY_TASK_COUNT"], "SLURM_ARRAY_TASK_COUNT")
    elif "RANK" in environ and "WORLD_SIZE" in environ:
        index, count = number(environ["RANK"], "RANK"), number(environ["WORLD_SIZE"], "WORLD_SIZE")
    else:
        return 0, 1
    if not 0 <= index < count:
        raise InputError(f"shard {index} of {count} from the environment: not a task of this array")
    return index, count


def settings(config) -> dict:
    """What a cell computes (its TrainConfig without the runtime fields), as JSON values."""
    import json

    values = {k: v for k, v in dataclasses.asdict(config).items() if k not in RUNTIME_FIELDS}
    return json.loads(json.dumps(values, default=str))


class CellStore:
    """The cells folder of a table: result files and run directories (module docstring)."""

    def __init__(self, root):
        self.root = Path(root)

    def result_path(self, cell: Cell) -> Path:
        return self.root / "cells" / cell.dataset / cell.method / f"seed{cell.seed}.json"

    def run_dir(self, cell: Cell) -> Path:
        return self.root / "runs" / cell.dataset / cell.method / f"seed{cell.seed}"

    def read(self, cell: Cell, want: dict | None = None) -> dict | None:
        """The cell's metrics, None if it has no result yet; InputError, one line, for a file
        that is not a cell's result or was made with other settings than `want`."""
        path = self.result_path(cell)
        if not path.is_file():
            return None
        record = read_record(path)
        if (record["dataset"], record["method"], record["seed"]) != (cell.dataset, cell.method, cell.seed):
            raise InputError(f"{path} holds the cell {record['dataset']}/{record['method']}/seed"
                             f"{record['seed']}, not {cell.name}: restore the folder")
        if want is not None and record["settings"] != want:
            key = next(k for k in sorted(set(want) | set(record["settings"]))
                       if want.get(k) != record["settings"].get(k))
            raise InputError(f"{path} was made with {key}={record['settings'].get(key)!r}, this "
                             f"table asks {want.get(key)!r}: give another --cells folder, or delete "
                             f"{self.root} to start over")
        return record["metrics"]

    def write(self, cell: Cell, metrics: dict, made_with: dict) -> Path:
        from .files import write_json

        path = self.result_path(cell)
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = {k: float(metrics[k]) for k in METRICS if k in metrics}
        return write_json(path, {"dataset": cell.dataset, "method": cell.method, "seed": cell.seed,
                                 "metrics": kept, "settings": made_with,
                                 "run_dir": metrics.get("run_dir"),
                                 "wall_s": float(metrics.get("wall_s", 0.0))})

    def every(self) -> dict[Cell, dict]:
        """{cell: metrics} of every result file in the folder."""
        found = {}
        for path in sorted((self.root / "cells").glob("*/*/seed*.json")):
            record = read_record(path)
            found[Cell(record["dataset"], record["method"], record["seed"])] = record["metrics"]
        return found


def read_record(path: Path) -> dict:
    """A cell's result file, checked (InputError naming the file and what is wrong)."""
    import math

    from .readers import loads

    try:
        record = loads(path.read_bytes())
    except (OSError, ValueError) as err:
        raise InputError(f"{path} is not a cell's result ({str(err)[:80]}): delete it to run the "
                         f"cell again") from None
    ok = (isinstance(record, dict) and isinstance(record.get("dataset"), str)
          and isinstance(record.get("method"), str) and type(record.get("seed")) is int
          and isinstance(record.get("metrics"), dict) and isinstance(record.get("settings"), dict)
          and record["metrics"] and all(
              type(v) in (int, float) and math.isfinite(v) and 0 <= v <= 100
              for v in record["metrics"].values()))
    if not ok:
        raise InputError(f"{path} is not a cell's result (dataset, method, seed, metrics 0..100, "
                         f"settings): delete it to run the cell again")
    return record
