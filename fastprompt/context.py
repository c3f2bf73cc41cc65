"""What a method's training hooks see (`Method.begin_training` / `end_training`): the run's
training and validation items, where and how it runs, its recipe, and frozen features of any
list of items, computed once and without a graph (heads on frozen features: Tip-Adapter's cache
and its alpha/beta search)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import test_transform, train_transform
from .recipes import Recipe
from .runtime import TrainEnv


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's data order and augmentation (and of one augmented feature pass)."""
    return seed * 100_003 + epoch


@dataclass
class TrainingContext:
    """What a method's training hooks may use: the run's training and validation items, where and
    how it runs, its recipe, and `features` (a frozen encoder over a list of items, without a graph)."""

    model: object
    train: list
    val: list
    env: TrainEnv
    recipe: Recipe

    @torch.no_grad()
    def features(self, encode, items: list, views: int = 0, batch_size: int = 256):
        """(encode(images) for each of `views` augmented passes over `items` stacked [views, N, ...],
        labels [N]); views=0: one pass at the test transform, [N, ...]. Augmented views use the
        recipe's crops, each pass seeded by (run seed, view): repeatable, and a resumed run sees the
        same views. Unreadable training images are replaced as in training."""
        from .scoring import encode_items

        clip = self.model.clip
        if views == 0:
            return encode_items(encode, items, test_transform(clip.image_size, clip.mean, clip.std),
                                self.env, batch_size, replace=False, image_size=clip.image_size)
        tf = train_transform(clip.image_size, clip.mean, clip.std, scale=self.recipe.crop_scale)
        passes, labels = [], None
        for view in range(views):
            torch.manual_seed(epoch_seed(self.env.seed, 10_000 + view))
            feats, labels = encode_items(encode, items, tf, self.env, batch_size, replace=True,
                                         image_size=clip.image_size)
            passes.append(feats)
        return torch.stack(passes), labels


