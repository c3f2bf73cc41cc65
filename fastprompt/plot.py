"""The training-curve figure of a run: loss and accuracy per epoch from log.jsonl."""
from __future__ import annotations

import json
from pathlib import Path

from .files import atomic_write


def plot_curves(run_dir: Path, log_name: str = "log.jsonl", out_name: str = "curves.png") -> Path | None:
    log = Path(run_dir) / log_name
    if not log.is_file():
        return None
    rows = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        try:  # a figure is a convenience: a damaged log line is left out, not fatal
            row = json.loads(line)
            rows.append((float(row["epoch"]), float(row["loss"]), float(row["acc"])))
        except (ValueError, TypeError, KeyError):
            continue
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r[0] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(epochs, [r[1] for r in rows], marker="o")
    ax1.set(xlabel="epoch", ylabel="training loss", title="loss")
    ax2.plot(epochs, [r[2] for r in rows], marker="o", color="tab:green")
    ax2.set(xlabel="epoch", ylabel="training accuracy (%)", title="accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(run_dir) / out_name
    try:
        atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)
    return out
