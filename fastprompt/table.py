"""`python -m fastprompt.table`: base-to-novel accuracy of every method on the generated datasets.

Trains each method with its default recipe (16 shots, base classes) on each generated dataset
(`fastprompt.data.generated`) with the shipped pretrained tiny CLIP, for a few seeds, and prints
the base / novel / HM table averaged over seeds (markdown). `--readme README.md` also rewrites
the table between the markers `<!-- table:begin -->` and `<!-- table:end -->` in that file.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("zeroshot", "coop", "cocoop", "maple", "ivlp", "mma", "lamm", "coop+lamm", "maple+lamm")
BEGIN, END = "<!-- table:begin -->", "<!-- table:end -->"


def run_one(method: str, dataset: str, seed: int, pretrained: str = "shapes", out=None,
            extra: list[str] | None = None) -> dict:
    """One base-to-novel run through the CLI's own code path; returns its metrics."""
    if method == "zeroshot":
        return zero_shot(dataset, pretrained)
    from .runner import train_run
    from .train import parse_args

    with tempfile.TemporaryDirectory() as tmp:
        argv = ["--method", method, "--dataset", dataset, "--seed", str(seed), "--pretrained",
                pretrained, "--device", "cpu", "--no-progress", "--out", str(out or Path(tmp) / "run")]
        return train_run(parse_args(argv + list(extra or [])))


def zero_shot(dataset: str, pretrained: str | None = "shapes", split: str = "test") -> dict:
    """Zero-shot CLIP ("a photo of a {}.") on the base and the novel classes of `dataset`."""
    import torch

    from .api import create
    from .clip import load_clip
    from .data import load_dataset, split_base_novel
    from .evaluate import accuracy, harmonic_mean

    clip = load_clip("tiny", pretrained)
    out = {}
    for key, half in zip(("base_acc", "novel_acc"), split_base_novel(load_dataset(dataset))):
        clf = create("zeroshot", clip, half.classnames).classifier()
        out[key] = accuracy(clf, getattr(half, split), torch.device("cpu"))
    out["hm"] = harmonic_mean(out["base_acc"], out["novel_acc"])
    return out


def collect(methods, datasets, seeds, pretrained="shapes", log=print) -> dict:
    results = {}
    for dataset in datasets:
        for method in methods:
            rows = []
            for seed in seeds:
                t0 = time.perf_counter()
                m = run_one(method, dataset, seed, pretrained)
                rows.append({"seed": seed, **{k: m[k] for k in ("base_acc", "novel_acc", "hm")}})
                if log:
                    log(f"{dataset} {method} seed {seed}: base {m['base_acc']:.1f} novel "
                        f"{m['novel_acc']:.1f} hm {m['hm']:.1f} ({time.perf_counter() - t0:.0f} s)")
            results[(dataset, method)] = rows
    return results


def chance(dataset: str) -> tuple[float, float]:
    """Chance accuracy (percent) on the base and on the novel half of `dataset`."""
    from .data import load_dataset, split_base_novel

    base, novel = split_base_novel(load_dataset(dataset))
    return 100 / len(base.classnames), 100 / len(novel.classnames)


def markdown(results: dict, seeds) -> str:
    lines = ["| dataset | method | base | novel | HM |", "|---|---|---|---|---|"]
    for (dataset, method), rows in results.items():
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("base_acc", "novel_acc", "hm")}
        lines.append(f"| {dataset} | {method} | {mean['base_acc']:.1f} | {mean['novel_acc']:.1f} "
                     f"| {mean['hm']:.1f} |")
    odds = ", ".join(f"{d} {'/'.join(f'{c:.1f}' for c in chance(d))}"
                     for d in dict.fromkeys(d for d, _ in results))
    return "\n".join(lines) + (f"\n\nMean over seeds {', '.join(map(str, seeds))}. "
                               f"Chance (base/novel, %): {odds}.")


def write_readme(path: Path, table: str) -> None:
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{path} has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    path.write_text(head + BEGIN + "\n" + table + "\n" + END + rest.split(END, 1)[1])


def main(argv=None) -> int:
    from .data.generated import GENERATED

    p = argparse.ArgumentParser(prog="python -m fastprompt.table", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--datasets", default=",".join(GENERATED))
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--pretrained", default="shapes")
    p.add_argument("--readme", default=None, help="rewrite the table in this file")
    p.add_argument("--json", default=None, help="also write the per-seed results here")
    p.add_argument("--from-json", default=None,
                   help="rebuild the table from a file written by --json instead of training")
    a = p.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    if a.from_json:
        saved = json.loads(Path(a.from_json).read_text())
        results = {tuple(key.rsplit("/", 1)): rows for key, rows in saved.items()}
        seeds = sorted({r["seed"] for rows in results.values() for r in rows if "seed" in r}) or seeds
    else:
        results = collect(a.methods.split(","), a.datasets.split(","), seeds, a.pretrained,
                          log=lambda m: print(m, flush=True))
    table = markdown(results, seeds)
    print(table)
    if a.json:
        Path(a.json).write_text(json.dumps({f"{d}/{m}": r for (d, m), r in results.items()}, indent=2))
    if a.readme:
        write_readme(Path(a.readme), table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
