"""`python -m fastprompt.pretrain`: reproduce the shipped tiny CLIP weights from their seed.

    python -m fastprompt.pretrain --out fastprompt/weights/tiny-shapes.safetensors

Defaults are those of the shipped file (see its .json record: seed, steps, wall time, torch
version, sha256). On a CPU with the same torch version and 2 threads the output is bit-for-bit
identical.
"""
from __future__ import annotations

import sys
from pathlib import Path

from ..cli import Parser, run_cli
from .train import PretrainConfig, pretrain


def main(argv=None) -> int:
    d = PretrainConfig()
    p = Parser(prog="python -m fastprompt.pretrain", description=__doc__)
    p.add_argument("--out", default="tiny-shapes.safetensors",
                   help="weights file to write (.safetensors; its .json record goes beside it)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the initialisation and corpus")
    p.add_argument("--steps", type=int, default=d.steps, help="optimisation steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="image-caption pairs per step (the contrastive loss's batch)")
    p.add_argument("--lr", type=float, default=d.lr,
                   help="peak AdamW learning rate (linear warm-up, then cosine: fastprompt.schedule)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="warm-up steps")
    p.add_argument("--threads", type=int, default=d.threads,
                   help="CPU threads (the shipped file: 2; bit-for-bit needs the same count)")
    a = p.parse_args(argv)
    return run_cli(lambda: _pretrain(a))


def _pretrain(a) -> int:
    import math

    from ..errors import InputError

    for flag, value, low in (("--seed", a.seed, 0), ("--steps", a.steps, 1),
                             ("--batch-size", a.batch_size, 2), ("--warmup", a.warmup, 0),
                             ("--threads", a.threads, 1)):
        if value < low:
            raise InputError(f"{flag} must be an integer >= {low}, got {value}")
    if not (math.isfinite(a.lr) and a.lr > 0):
        raise InputError(f"--lr must be a finite number > 0, got {a.lr}")
    if Path(a.out).is_dir():
        raise InputError(f"--out {a.out} is a directory: give a .safetensors file name")
    cfg = PretrainConfig(seed=a.seed, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
                         warmup=min(a.warmup, a.steps), threads=a.threads)
    rec = pretrain(cfg, a.out, log=lambda m: print(m, flush=True))
    print(f"wrote {a.out}  sha256 {rec['sha256']}  wall {rec['wall_s']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
