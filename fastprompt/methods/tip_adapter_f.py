"""Tip-Adapter-F: Tip-Adapter's cache with its keys trained (gaopengcuhk/Tip-Adapter main.py
run_tip_adapter_F).

The keys K (the release's `adapter.weight` = cache_keys.t(), [N·K, E], rows not re-normalised
after a step) are trained with CE on Tip-Adapter's logits at the config's init α, β, the values
fixed, on fresh crops of the few-shot images every epoch whose features are computed without a
graph; then α, β are searched on the validation split as for Tip-Adapter. Recipe: AdamW (lr 1e-3,
eps 1e-4, torch's default weight decay 0.01), the cosine stepped per iteration to 0, batch 256,
20 epochs (EuroSAT 100), no warm-up. The last epoch is kept; with `select_on_test` the first
epoch whose logits score best on the validation split, the release's rule (it picks the epoch by
test accuracy).
"""
from __future__ import annotations

import torch

from ..errors import CheckpointError
from .base import register
from .tip_adapter import TipAdapter, tip_logits
from .tip_files import TIP_F_LAYOUT

#: description and recipe (methods.base.card; read by fastprompt.catalog without torch); the
#: per-dataset settings are Tip-Adapter's (tip_adapter.py), EuroSAT training 100 epochs
CARDS = {
    "tip_adapter_f": {
        "about": "Tip-Adapter's cache with its keys fine-tuned (Tip-Adapter-F)",
        "recipes": {"base2novel": {
            "epochs": 20, "warmup_epochs": 0, "batch_size": 256, "lr": 0.001, "optimizer": "adamw",
            "eps": 0.0001, "weight_decay": 0.01, "schedule": "iteration", "crop_scale": [0.5, 1.0],
            "source": "Tip-Adapter main.py run_tip_adapter_F + configs/<dataset>.yaml"}},
        "datasets": {
            "imagenet": {"options": {"search": False, "templates": [
                "itap of a {}.", "a bad photo of the {}.", "a origami {}.",
                "a photo of the large {}.", "a {} in a video game.", "art of the {}.",
                "a photo of the small {}."]},
                "source": "Tip-Adapter configs/imagenet.yaml, main_imagenet.py"},
            "caltech101": {"options": {"search_beta": 12.0, "search_alpha": 5.0, "alpha": 3.0},
                           "source": "Tip-Adapter configs/caltech101.yaml"},
            "dtd": {"options": {"search_beta": 13.0, "search_alpha": 13.0, "alpha": 2.0},
                    "source": "Tip-Adapter configs/dtd.yaml"},
            "eurosat": {"options": {"search_beta": 12.0, "search_alpha": 10.0, "alpha": 2.0},
                        "source": "Tip-Adapter configs/eurosat.yaml", "epochs": 100},
            "fgvc_aircraft": {"options": {"search_beta": 30.0, "search_alpha": 30.0, "alpha": 5.0},
                              "source": "Tip-Adapter configs/fgvc.yaml"},
            "food101": {"options": {"search_beta": 10.0, "search_alpha": 10.0},
                        "source": "Tip-Adapter configs/food101.yaml"},
            "oxford_flowers": {"options": {"search_beta": 50.0, "search_alpha": 50.0,
                                           "alpha": 10.0},
                               "source": "Tip-Adapter configs/oxford_flowers.yaml"},
            "oxford_pets": {"source": "Tip-Adapter configs/oxford_pets.yaml"},
            "stanford_cars": {"options": {"search_beta": 20.0, "search_alpha": 10.0, "alpha": 3.0},
                              "source": "Tip-Adapter configs/stanford_cars.yaml"},
            "sun397": {"options": {"search_beta": 12.0, "search_alpha": 10.0},
                       "source": "Tip-Adapter configs/sun397.yaml"},
            "ucf101": {"options": {"alpha": 3.0}, "source": "Tip-Adapter configs/ucf101.yaml"},
        },
    },
}


@register("tip_adapter_f")
class TipAdapterF(TipAdapter):
    """The keys trained; with `select_on_test`, the epoch whose tip logits (init α, β) score best
    on the validation split is kept (the release's rule, on its test split)."""

    original_layout = TIP_F_LAYOUT
    trains_keys = True
    _best = None  # (correct, epoch, keys) of the best epoch on the selection split

    def begin_training(self, context) -> None:
        super().begin_training(context)
        self._val, self._best = None, None
        if self.config.select_on_test and context.val:
            self.validation(context)

    @torch.no_grad()
    def end_epoch(self, epoch: int, epochs: int) -> None:
        if self._val is None:
            return
        f, y = self._val
        logits = tip_logits(f, self.text_features(), self.cache_keys, self.cache_values(),
                            self.config.alpha, self.config.beta)
        correct = float((logits.argmax(-1) == y).sum())
        if correct > (self._best[0] if self._best else 0.0):  # strictly better, as main.py
            self._best = (correct, epoch, self.cache_keys.detach().clone())

    def training_state(self) -> dict[str, torch.Tensor]:
        if not self._best:
            return {}
        correct, epoch, keys = self._best
        return {"best_keys": keys, "best": torch.tensor([correct, float(epoch)])}

    def load_training_state(self, tensors, path) -> None:
        if not tensors:
            return
        keys, best = tensors.get("best_keys"), tensors.get("best")
        if set(tensors) != {"best_keys", "best"} or keys.shape != self.cache_keys.shape or best.shape != (2,):
            raise CheckpointError(f"{path} holds training state {sorted(tensors)} that does not fit "
                                  f"this {self.name} model (best_keys {tuple(self.cache_keys.shape)}, "
                                  f"best [2]): a checkpoint of another run")
        correct, epoch = best.tolist()
        self._best = (correct, int(epoch), keys.to(self.cache_keys))

    def end_training(self, context) -> None:
        if self.config.select_on_test and self._val is not None:
            if self._best:
                self.cache_keys.data.copy_(self._best[2])
                self.notes.append(f"keys of epoch {self._best[1] + 1} kept (best on the selection split)")
            else:
                self.notes.append("no epoch scored above 0% on the selection split: the last "
                                  "epoch's keys are kept (the release would fail here)")
        super().end_training(context)
