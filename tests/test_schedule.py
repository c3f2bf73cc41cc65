"""fastprompt.schedule.warmup_cosine: one schedule for prompt learning and for pretraining."""
import math

import pytest

from fastprompt.pretrain.train import PretrainConfig, lr_at
from fastprompt.recipes import Recipe
from fastprompt.schedule import warmup_cosine


def test_dassl_constant_warmup_then_cosine_over_all_epochs():
    """MaPLe's recipe (lr 3.5e-3, 5 epochs, 1 warm-up epoch at 1e-5): the values recipes.py and
    Dassl's ConstantWarmupScheduler + CosineAnnealingLR(T_max=5) give."""
    got = [warmup_cosine(0.0035, e, 5, 1, warmup_lr=1e-5) for e in range(5)]
    want = [1e-5] + [0.0035 * (1 + math.cos(math.pi * k / 5)) / 2 for k in range(4)]
    assert got == want
    assert [round(v, 5) for v in got] == [1e-5, 0.0035, 0.00317, 0.00229, 0.00121]


@pytest.mark.parametrize("recipe", [Recipe(), Recipe(lr=0.0035, epochs=5),
                                    Recipe(lr=0.0015, epochs=5, warmup_epochs=0),
                                    Recipe(epochs=0, warmup_epochs=0), Recipe(epochs=1)],
                         ids=["default", "maple", "mma", "zero-epochs", "one-epoch"])
def test_recipe_lr_at_is_the_shared_schedule(recipe):
    for e in range(recipe.epochs + 2):
        assert recipe.lr_at(e) == warmup_cosine(recipe.lr, e, recipe.epochs, recipe.warmup_epochs,
                                                warmup_lr=recipe.warmup_lr)


def _pretrain_lr_before(step, cfg):
    """pretrain/train.py's own schedule before it used fastprompt.schedule (kept to prove the
    pretrained weights cannot move: the same floats, bit for bit)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * t))


@pytest.mark.parametrize("cfg", [PretrainConfig(), PretrainConfig(steps=10, warmup=3, lr=3e-4),
                                 PretrainConfig(steps=5, warmup=5)], ids=["default", "short", "all-warmup"])
def test_pretraining_schedule_is_bit_identical(cfg):
    assert all(lr_at(s, cfg) == _pretrain_lr_before(s, cfg) for s in range(cfg.steps))
    assert lr_at(cfg.warmup - 1, cfg) == cfg.lr  # the ramp ends at the full rate


def test_warmup_needs_a_kind_and_a_rate():
    with pytest.raises(ValueError, match="warmup_lr"):
        warmup_cosine(0.1, 0, 10, 2)  # constant warm-up without its rate
    with pytest.raises(ValueError, match="linear"):
        warmup_cosine(0.1, 5, 10, 2, warmup="exponential")
    assert warmup_cosine(0.1, 0, 10) == 0.1  # no warm-up: the cosine's start
