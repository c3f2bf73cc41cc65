"""The figure of a run, `curves.png`: what the run did and what it reached.

Three panels over integer epochs, titled with method, dataset, seed and backbone:
training loss; the learning rate of each epoch (log scale: Dassl's 1e-5 warm-up and the cosine
after it); training accuracy (augmented training batches), with the run's final evaluation
(base / novel / HM, or acc, on the evaluation split) as solid reference lines and zero-shot CLIP on
the same images as dashed ones. Lines of the same kind at (nearly) the same height would hide each
other, so they are drawn in turns: each colour takes every n-th dash of the group (`line_styles`),
and all stay visible. Read from `log.jsonl`, `metrics.json` and `config.json`; a damaged or
missing file leaves its part out, never fails the run.
"""
from __future__ import annotations

import json
from pathlib import Path

from .files import atomic_write

#: metrics.json key -> (label, colour) of a reference line
_REFERENCES = {"base_acc": ("base", "tab:blue"), "novel_acc": ("novel", "tab:orange"),
               "hm": ("HM", "tab:green"), "acc": ("all classes", "tab:blue")}
#: line width, and the dash (on, gap) of a line of its own, for the run's lines and zero-shot's
_WIDTH = {False: 2.2, True: 1.4}
_DASH = {False: (6.0, 0.0), True: (3.0, 2.0)}
#: reference lines closer than this (accuracy points) would cover each other at the figure's size
_CLOSE = 1.0


def line_styles(values: list[tuple[float, bool]]) -> list:
    """A matplotlib linestyle per reference line (value, zero-shot?): solid (the run) or dashed
    (zero-shot) alone; a group of n lines of one kind within _CLOSE of each other shares one dash
    pattern in turns, line i drawing the i-th dash of every n, so each colour shows."""
    styles: list = [None] * len(values)
    for zero in (False, True):
        order = sorted((v, i) for i, (v, z) in enumerate(values) if z == zero)
        groups: list[list[int]] = []
        for k, (v, i) in enumerate(order):
            if k and v - order[k - 1][0] < _CLOSE:
                groups[-1].append(i)
            else:
                groups.append([i])
        on, gap = _DASH[zero]
        for group in groups:
            if len(group) == 1:
                styles[group[0]] = "-" if zero is False else (0, (on, gap))
                continue
            period = len(group) * (on + gap)
            for turn, i in enumerate(group):
                styles[i] = ((period - turn * (on + gap)) % period, (on, period - on))
    return styles


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _log_rows(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:  # a figure is a convenience: a damaged log line is left out, not fatal
            row = json.loads(line)
            rows.append({k: float(row[k]) for k in ("epoch", "loss", "acc")}
                        | {"lr": float(row["lr"]) if "lr" in row else None})
        except (ValueError, TypeError, KeyError):
            continue
    return rows


def title_of(config: dict) -> str:
    run, backbone = config.get("run") or {}, config.get("backbone") or {}
    parts = [f"{config.get('method', '?')} on {run.get('dataset', '?')}, seed {run.get('seed', '?')}"]
    if backbone:
        weights = backbone.get("pretrained")
        weights = Path(weights).name if weights and ("/" in weights or "\\" in weights) else weights
        parts.append(f"backbone {backbone.get('model', '?')}"
                     + (f" ({weights})" if weights else " (random init)"))
    shots = (run.get("recipe") or {}).get("shots")
    if shots:
        parts.append(f"{shots} shots, {run.get('subsample', 'base')} classes")
    return " | ".join(parts)


def plot_curves(run_dir: Path, log_name: str = "log.jsonl", out_name: str = "curves.png") -> Path | None:
    """Write `curves.png` into `run_dir` (atomically); None when the log has no epoch to show."""
    fig = make_figure(run_dir, log_name)
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    out = Path(run_dir) / out_name
    try:
        atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)
    return out


def make_figure(run_dir: Path, log_name: str = "log.jsonl"):
    """The matplotlib figure of `plot_curves` (module docstring), or None without epochs."""
    run_dir = Path(run_dir)
    log = run_dir / log_name
    rows = _log_rows(log) if log.is_file() else []
    if not rows:
        return None
    metrics, config = _read_json(run_dir / "metrics.json"), _read_json(run_dir / "config.json")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_lr, ax_acc) = plt.subplots(1, 3, figsize=(14, 4.2))
    ax_loss.plot(epochs, [r["loss"] for r in rows], marker="o", color="tab:red")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="training loss")
    lrs = [(r["epoch"], r["lr"]) for r in rows if r["lr"] is not None and r["lr"] > 0]
    if lrs:
        ax_lr.plot(*zip(*lrs), marker="o", color="tab:purple")
        ax_lr.set_yscale("log")
    ax_lr.set(xlabel="epoch", ylabel="learning rate (log scale)", title="learning rate per epoch")
    handles = ax_acc.plot(epochs, [r["acc"] for r in rows], marker="o", color="black",
                          label="training batches (augmented)")
    split = metrics.get("eval_split", "test")
    zero = metrics.get("zeroshot_ref") or {}
    lines = []  # (value, zero-shot?, colour, label)
    for key, (label, colour) in _REFERENCES.items():
        if isinstance(metrics.get(key), (int, float)):
            lines.append((metrics[key], False, colour, f"{split} {label} after training: {metrics[key]:.1f}"))
        if isinstance(zero.get(key), (int, float)):
            lines.append((zero[key], True, colour, f"{split} {label}, zero-shot CLIP: {zero[key]:.1f}"))
    for (value, is_zero, colour, label), style in zip(lines, line_styles([(v, z) for v, z, *_ in lines])):
        ax_acc.axhline(value, color=colour, lw=_WIDTH[is_zero], ls=style)
        # the legend shows each line's own colour and kind, not its share of a shared pattern
        handles.append(Line2D([], [], color=colour, lw=_WIDTH[is_zero], label=label,
                              ls=(0, _DASH[True]) if is_zero else "-"))
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy", ylim=(0, 101.5))
    ax_acc.legend(handles=handles, fontsize=7, loc="best")
    for ax in (ax_loss, ax_lr, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(epochs) == 1:
            ax.set_xlim(epochs[0] - 1, epochs[0] + 1)
    fig.suptitle(title_of(config))
    fig.tight_layout()
    return fig
