"""What a table is written as: markdown (one row per dataset and method, average rows), the
README between its markers, the per-seed JSON of --json and its reader (--from-json).

Two protocols, two tables: base-to-novel (base / novel / HM, the HM of the seed-averaged
accuracies, as the papers report it) between `<!-- table:begin -->` and `<!-- table:end -->`,
and few-shot over all classes (accuracy) between `<!-- table-fewshot:begin -->` and
`<!-- table-fewshot:end -->`.
"""
from __future__ import annotations

import math
from pathlib import Path

from .errors import InputError, first_line, short_repr

#: the README markers of each protocol's table
MARKERS = {"base2novel": ("<!-- table:begin -->", "<!-- table:end -->"),
           "fewshot": ("<!-- table-fewshot:begin -->", "<!-- table-fewshot:end -->")}
BEGIN, END = MARKERS["base2novel"]
#: the accuracies of a row, per protocol
COLUMNS = {"base2novel": ("base_acc", "novel_acc", "hm"), "fewshot": ("acc",)}
HEADS = {"base2novel": "| dataset | method | base | novel | HM |", "fewshot": "| dataset | method | accuracy |"}


def protocol_of(rows: dict) -> str:
    """The protocol whose accuracies the rows hold."""
    first = next(iter(rows.values()))[0]
    return "base2novel" if "hm" in first else "fewshot"


def chance(dataset: str, root=None) -> tuple[float, float]:
    """Chance accuracy (percent) on the base and on the novel half of `dataset` (under `root`,
    the --data-root, for the datasets that live on disk)."""
    from .data import load_dataset, split_base_novel

    base, novel = split_base_novel(load_dataset(dataset, root))
    return 100 / len(base.classnames), 100 / len(novel.classnames)


def chance_all(dataset: str, root=None) -> float:
    """Chance accuracy (percent) over every class of `dataset`."""
    from .data import load_dataset

    return 100 / len(load_dataset(dataset, root).classnames)


def summarize(rows: list[dict]) -> dict:
    """Seed-averaged base and novel accuracy, and the HM of those averages (as the papers report
    it: CoCoOp's 75.83 = HM(80.47, 71.69), not the mean of per-seed HMs); or the mean accuracy
    of few-shot rows."""
    from .scoring import harmonic_mean

    if "acc" in rows[0] and "hm" not in rows[0]:
        return {"acc": sum(r["acc"] for r in rows) / len(rows)}
    base = sum(r["base_acc"] for r in rows) / len(rows)
    novel = sum(r["novel_acc"] for r in rows) / len(rows)
    return {"base_acc": base, "novel_acc": novel, "hm": harmonic_mean(base, novel)}


def markdown(results: dict, seeds, root=None, missing: list | None = None) -> str:
    """The table: one row per (dataset, method) and, over several datasets, an average row per
    method (mean base, mean novel over datasets, HM of those means; or mean accuracy). `missing`:
    cells not computed (a row then averages the seeds it has, and the footer says so)."""
    protocol = protocol_of(results)
    columns = COLUMNS[protocol]
    lines = [HEADS[protocol], "|---|---|" + "---|" * len(columns)]
    summary = {key: summarize(rows) for key, rows in results.items()}
    datasets = list(dict.fromkeys(d for d, _ in results))
    rows = list(summary.items())
    if len(datasets) > 1:
        for method in dict.fromkeys(m for _, m in results):
            per = [summary[(d, method)] for d in datasets if (d, method) in summary]
            if len(per) == len(datasets):
                rows.append((("average", method), summarize(per)))
    for (dataset, method), m in rows:
        if not all(math.isfinite(m[k]) for k in columns):
            raise InputError(f"the {dataset} / {method} row is not finite ({m}): no table is written")
        lines.append(f"| {dataset} | {method} | " + " | ".join(f"{m[k]:.1f}" for k in columns) + " |")
    seeds_text = ", ".join(map(str, seeds))
    if protocol == "base2novel":
        odds = ", ".join(f"{d} {'/'.join(f'{c:.1f}' for c in chance(d, root))}" for d in datasets)
        foot = (f"Base and novel: mean over seeds {seeds_text}; HM of those means; average rows: "
                f"mean over datasets. Chance (base/novel, %): {odds}.")
    else:
        odds = ", ".join(f"{d} {chance_all(d, root):.1f}" for d in datasets)
        foot = (f"Accuracy over all classes: mean over seeds {seeds_text}; average rows: mean over "
                f"datasets. Chance (%): {odds}.")
    if missing:
        foot += (f" Missing cells ({len(missing)}), their rows average the seeds present: "
                 + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else "") + ".")
    return "\n".join(lines) + "\n\n" + foot


def readme_parts(path: Path, protocol: str = "base2novel") -> tuple[str, str]:
    """The text of `path` before the protocol's BEGIN marker and from its END marker on
    (InputError, one line, if the file is not UTF-8 text with BEGIN before END)."""
    begin_mark, end_mark = MARKERS[protocol]
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text: give the README (markdown) to write the "
                         f"table into") from None
    begin = text.find(begin_mark)
    end = text.find(end_mark, begin + len(begin_mark)) if begin >= 0 else -1
    if end < 0:
        raise InputError(f"{path} has no {begin_mark} followed by {end_mark}: put the two markers, "
                         f"in this order, where the table goes")
    return text[:begin], text[end:]


def write_readme(path: Path, table: str, protocol: str = "base2novel") -> None:
    """Replace the protocol's table between the markers of `path` (written atomically)."""
    from .files import write_text

    head, tail = readme_parts(path, protocol)
    write_text(path, head + MARKERS[protocol][0] + "\n" + table + "\n" + tail)


def read_results(path: Path) -> dict:
    """{(dataset, method): rows} from a file written by --json (InputError, one line, if not):
    each row's accuracies are numbers from 0 to 100 (base/novel/HM, or acc), its seed an integer."""
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
            for k in COLUMNS["base2novel" if "acc" not in r else "fewshot"]:
                v = r.get(k)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 100:
                    raise bad(f"'{k}' of {key[:60]!r} is {short_repr(v)}, not a percentage")
            if "seed" in r and (isinstance(r["seed"], bool) or not isinstance(r["seed"], int)):
                raise bad(f"'seed' of {key[:60]!r} is {short_repr(r['seed'])}, not an integer")
        results[name] = [dict(r) for r in rows]
    if len({protocol_of({k: v}) for k, v in results.items()}) > 1:
        raise bad("it mixes base-to-novel rows (base_acc, novel_acc, hm) with few-shot rows (acc)")
    return results
