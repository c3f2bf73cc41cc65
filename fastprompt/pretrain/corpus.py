"""A procedurally generated image–caption corpus for pretraining the `tiny` CLIP, offline.

A scene is 1–3 objects of one kind: a colour (10), a shape (10), a texture (plain or striped) and,
for single objects, a size (small or large), drawn at random positions on a noisy background of
random tone. Its caption composes those attributes ("two striped red triangles", "a large plain
blue circle") in one of several templates. Some colour–shape pairs (`HELD_OUT`) never appear in
the corpus: downstream datasets (`fastprompt.pretrain.datasets`) use them to test composition.

Every sample is drawn from its own NumPy generator seeded with ``(seed, stream, index)``, so the
corpus is identical on every machine and independent of batch size or worker count.
"""
from __future__ import annotations

import math

import numpy as np

from ..data.builtin import _outline

COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (240, 220, 40),
    "purple": (140, 40, 180), "orange": (245, 140, 20), "pink": (245, 120, 190),
    "brown": (130, 80, 35), "black": (15, 15, 15), "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "ring", "hexagon", "heart",
          "arrow")
PLURAL = {s: s + ("es" if s.endswith(("s", "x", "ch")) else "s") for s in SHAPES}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
SIZES = {"small": (0.17, 0.24), "large": (0.32, 0.42)}
TEXTURES = ("plain", "striped")
#: colour–shape pairs never shown in pretraining (one per colour, no shape twice)
HELD_OUT = tuple((c, SHAPES[(3 * i + 2) % len(SHAPES)]) for i, c in enumerate(COLOURS))
TEMPLATES = ("a photo of a {}.", "a {}.", "{}", "an image of a {}.", "a drawing of a {}.",
             "a picture of {}.", "there is a {}.", "a rendering of a {}.")
IMAGE_SIZE = 32


def describe(colour: str, shape: str, count: int = 1, texture: str | None = None,
             size: str | None = None, count_word: bool | None = None) -> str:
    """The noun phrase of a scene: '[count] [size] [texture] colour shape(s)'."""
    words = []
    if count > 1 or count_word:
        words.append(COUNT_WORDS[count])
    words += [w for w in (size, texture) if w]
    words += [colour, PLURAL[shape] if count > 1 else shape]
    return " ".join(words)


def render(rng: np.random.Generator, colour: str, shape: str, count: int = 1,
           texture: str = "plain", size: str = "large", image_size: int = IMAGE_SIZE):
    """Draw a scene (PIL RGB image): `count` objects, non-overlapping when possible."""
    from PIL import Image, ImageDraw

    s = image_size
    background = rng.integers(60, 200, size=3)
    pixels = background + rng.normal(0.0, 14.0, size=(s, s, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    lo, hi = SIZES["small"] if count > 1 else SIZES[size]
    if count > 1:
        lo, hi = 0.12, 0.16
    placed: list[tuple[float, float, float]] = []
    for _ in range(count):
        r = rng.uniform(lo, hi) * s
        for _try in range(20):
            cx, cy = rng.uniform(r, s - r, size=2)
            if all(math.hypot(cx - x, cy - y) > r + q + 1 for x, y, q in placed):
                break
        placed.append((cx, cy, r))
        fill = tuple(int(c) for c in np.clip(np.asarray(COLOURS[colour]) + rng.integers(-20, 21, 3),
                                             0, 255))
        mask = Image.new("L", (s, s), 0)
        _draw(ImageDraw.Draw(mask), rng, shape, cx, cy, r)
        layer = Image.new("RGB", (s, s), fill)
        if texture == "striped":
            dark = tuple(int(c * 0.25 + 255 * 0.05) if sum(fill) > 200 else 235 for c in fill)
            stripes = Image.new("RGB", (s, s), dark)
            period = 4
            angle = rng.integers(0, 2)
            yy, xx = np.mgrid[0:s, 0:s]
            on = ((xx if angle else yy) % period) < period // 2
            arr = np.where(on[..., None], np.asarray(fill), np.asarray(stripes))
            layer = Image.fromarray(arr.astype(np.uint8), "RGB")
        image.paste(layer, (0, 0), mask)
    return image


def _draw(draw, rng, shape: str, cx: float, cy: float, r: float) -> None:
    if shape in ("circle", "ring"):
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            draw.ellipse(box, fill=255)
        else:
            draw.ellipse(box, outline=255, width=max(2, int(r / 2.5)))
        return
    angle = rng.uniform(0, 2 * math.pi) if shape != "heart" else rng.uniform(-0.4, 0.4)
    cos, sin = math.cos(angle), math.sin(angle)
    draw.polygon([(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos))
                  for x, y in _outline(shape)], fill=255)


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
