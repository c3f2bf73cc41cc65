"""The learning-rate schedule: a warm-up, then a half-cosine decay.

One pure function serves both schedules of the project:

- prompt learning (`recipes.Recipe.lr_at`, per epoch): Dassl's ``ConstantWarmupScheduler``
  (``warmup_lr`` for the first ``warmup_epochs`` epochs) wrapping ``CosineAnnealingLR(T_max =
  epochs)``, whose count starts after the warm-up (Dassl.pytorch ``dassl/optim/lr_scheduler.py``;
  see `fastprompt.recipes`): ``cosine_steps = epochs``, so the cosine never reaches 0;
- CLIP-LoRA and Tip-Adapter-F (`recipes.Recipe.lr_at_step`, per optimiser step): torch's
  ``CosineAnnealingLR(T_max = all steps, eta_min = min_lr)`` stepped after every step;
- pretraining the tiny CLIP (`pretrain.train`, per step): a linear ramp to ``lr`` over the
  warm-up steps, then a cosine over the remaining ``steps - warmup`` steps.

    lr(s) = warmup_lr                                  s < warmup, warmup="constant"
          = lr * (s + 1) / warmup                      s < warmup, warmup="linear"
          = min_lr + (lr - min_lr) * (1 + cos(pi * (s - warmup) / cosine_steps)) / 2   otherwise
"""
from __future__ import annotations

import math

WARMUPS = ("constant", "linear")


def warmup_cosine(lr: float, step: int, cosine_steps: int, warmup_steps: int = 0,
                  warmup: str = "constant", warmup_lr: float | None = None,
                  min_lr: float = 0.0) -> float:
    """The learning rate of 0-indexed `step` (see the module docstring); `cosine_steps` below 1
    counts as 1; the cosine ends at `min_lr` (torch's CosineAnnealingLR `eta_min`)."""
    if warmup not in WARMUPS or (warmup == "constant" and warmup_steps > 0 and warmup_lr is None):
        raise ValueError(f"warm-up {warmup!r} with warmup_lr={warmup_lr!r}: use warmup='linear', "
                         f"or warmup='constant' with a warmup_lr")
    if step < warmup_steps:
        return warmup_lr if warmup == "constant" else lr * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, cosine_steps)
    if min_lr == 0.0:  # the plain expression: the same floats as before min_lr existed
        return lr * 0.5 * (1.0 + math.cos(math.pi * t))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
