"""The training-curve figure of a run: loss and accuracy per epoch from log.jsonl."""
from __future__ import annotations

import json
from pathlib import Path


def plot_curves(run_dir: Path, log_name: str = "log.jsonl", out_name: str = "curves.png") -> Path | None:
    log = Path(run_dir) / log_name
    if not log.is_file():
        return None
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(epochs, [r["loss"] for r in rows], marker="o")
    ax1.set(xlabel="epoch", ylabel="training loss", title="loss")
    ax2.plot(epochs, [r["acc"] for r in rows], marker="o", color="tab:green")
    ax2.set(xlabel="epoch", ylabel="training accuracy (%)", title="accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(run_dir) / out_name
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
