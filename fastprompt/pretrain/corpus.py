"""A procedurally generated image–caption corpus for pretraining the `tiny` CLIP, offline.

A scene is 1–3 objects of one kind: a colour (10), a shape (10), a texture (plain or striped) and,
for single objects, a size (small or large), drawn at random positions on a noisy background of
random tone. Its caption composes those attributes ("two striped red triangles", "a large plain
blue circle") in one of several templates. Some colour–shape pairs (`HELD_OUT`) never appear in
the corpus: downstream datasets (`fastprompt.data.generated`) use them to test composition.
The vocabulary and the renderer are `fastprompt.data.shapes`, shared with those datasets.

Every sample is drawn from its own NumPy generator seeded with ``(seed, stream, index)``, so the
corpus is identical on every machine and independent of batch size or worker count.
"""
from __future__ import annotations

import numpy as np

from ..data.shapes import (COLOURS, COUNT_WORDS, HELD_OUT, PLURAL, SHAPES, SIZES,  # noqa: F401
                           TEXTURES, describe, render)

TEMPLATES = ("a photo of a {}.", "a {}.", "{}", "an image of a {}.", "a drawing of a {}.",
             "a picture of {}.", "there is a {}.", "a rendering of a {}.")
IMAGE_SIZE = 32


def sample_scene(rng: np.random.Generator) -> dict:
    """Random scene attributes, never a held-out colour–shape pair."""
    colours = list(COLOURS)
    while True:
        colour = colours[int(rng.integers(len(colours)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        if (colour, shape) not in HELD_OUT:
            break
    count = int(rng.choice([1, 2, 3], p=[0.6, 0.2, 0.2]))
    texture = TEXTURES[int(rng.integers(2))]
    size = list(SIZES)[int(rng.integers(2))]
    return {"colour": colour, "shape": shape, "count": count, "texture": texture, "size": size}


def caption(rng: np.random.Generator, scene: dict) -> str:
    """A caption of the scene; optional words (size, 'plain', 'one') are sometimes dropped."""
    count = scene["count"]
    size = scene["size"] if count == 1 and rng.random() < 0.7 else None
    texture = scene["texture"]
    if texture == "plain" and rng.random() < 0.4:
        texture = None
    phrase = describe(scene["colour"], scene["shape"], count, texture, size,
                      count_word=count == 1 and rng.random() < 0.3)
    return TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(phrase)


def sample(seed: int, index: int, stream: int = 0, image_size: int = IMAGE_SIZE):
    """Sample `index` of the corpus: (PIL image, caption). Pure function of its arguments."""
    rng = np.random.default_rng([seed, 7919 + stream, index])
    scene = sample_scene(rng)
    image = render(rng, scene["colour"], scene["shape"], scene["count"], scene["texture"],
                   scene["size"], image_size)
    return image, caption(rng, scene)


def batch(seed: int, start: int, size: int, stream: int = 0, image_size: int = IMAGE_SIZE,
          mean=None, std=None):
    """Samples start..start+size as (float images [B, 3, H, W] normalised, captions)."""
    import torch

    from ..clip import OPENAI_MEAN, OPENAI_STD

    mean = torch.tensor(mean or OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(std or OPENAI_STD).view(1, 3, 1, 1)
    images, texts = [], []
    for i in range(start, start + size):
        im, text = sample(seed, i, stream, image_size)
        images.append(np.asarray(im))
        texts.append(text)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return (x - mean) / std, texts
